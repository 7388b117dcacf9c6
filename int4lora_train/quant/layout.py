"""The canonical INT4 weight: one layout that every checkpoint format is converted into, once, at load time.

::

    packed       uint8 [out, P]   P >= ceil(in/2); column 2b in the LOW nibble of byte b, column 2b+1 in the HIGH
                                  nibble; stored nibble u = q + 8 with q in [-8, 7]. This is compressed-tensors'
                                  int32 ``weight_packed`` viewed as bytes on a little-endian host (zero copy), so P is
                                  4 * ceil(in/8) for weights that came from compressed-tensors.
    scales       float [out, G]   fp16 / bf16 / fp32. Per-channel: G = 1. Per-tensor: a [1, 1] tensor expanded to
                                  [out, 1] (a stride-0 view, no copy).
    zero_points  int8 [out, G]    optional (asymmetric). q - zp; zp is in [-8, 7] (GPTQ v1 can reach 8).
    g_idx        int32 [in]       optional activation-order group of every column; otherwise column // group_size.

    W[r, c] = (q[r, c] - zp[r, grp(c)]) * scales[r, grp(c)]

computed in fp32 (exact: |q - zp| <= 16 needs 5 bits, a fp16/bf16 scale at most 11) and rounded once to the
scale's dtype, which makes the result bit-identical to compressed-tensors' own dequantization in that dtype.

The nibble order lives in :func:`unpack_nibbles` / :func:`pack_nibbles`, the ``+8`` offset in
:func:`signed_to_nibbles` / :func:`nibbles_to_signed` and the group rule in :func:`group_index`; nothing else in the
toolkit may know any of them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch

from int4lora_train.errors import Int4FormatError

NIBBLE_OFFSET = 8
"""Stored nibble = signed value + 8 (compressed-tensors' ``1 << (num_bits - 1)``)."""

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

INT4_TENSOR_NAMES = ("packed", "scales", "zero_points", "g_idx")
"""The canonical weight's tensors, by the names :class:`Int4Weight` and ``Int4Linear``'s buffers use."""

INT4_INTEGER_DTYPES = {"packed": torch.uint8, "zero_points": torch.int8, "g_idx": torch.int32}
"""The integer tensors of the canonical weight and their dtypes (``scales`` are floating point)."""


def signed_to_nibbles(values: torch.Tensor) -> torch.Tensor:
    """Signed INT4 values in [-8, 7] (any integer dtype) -> stored nibbles uint8 in 0..15 (``q + 8``)."""
    return (values.to(torch.int16) + NIBBLE_OFFSET).to(torch.uint8)


def nibbles_to_signed(nibbles: torch.Tensor) -> torch.Tensor:
    """Stored nibbles (0..15, any integer dtype) -> signed int8 values in [-8, 7] (``u - 8``)."""
    return (nibbles.to(torch.int16) - NIBBLE_OFFSET).to(torch.int8)


def int32_words(values: int) -> int:
    """How many int32 words hold ``values`` INT4 values, 8 to a word: ``ceil(values / 8)``."""
    return -(-values // 8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[out, P]`` -> uint8 ``[out, 2P]`` of stored nibbles (0..15); column 2b = low nibble of byte b."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)


def pack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 ``[out, in]`` of stored nibbles (0..15) -> uint8 ``[out, 4*ceil(in/8)]`` (zero padded).

    The width is padded to whole int32 words so that ``result.view(torch.int32)`` is compressed-tensors'
    ``weight_packed`` (see :func:`packed_to_int32`).
    """
    out_features, in_features = nibbles.shape
    padded = 8 * int32_words(in_features)
    if padded != in_features:
        nibbles = torch.nn.functional.pad(nibbles, (0, padded - in_features))
    pairs = nibbles.reshape(out_features, padded // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def _little_endian_bytes(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[..., n]`` -> uint8 ``[..., 4n]`` in little-endian byte order, whatever the host's order."""
    if words.dim() and words.stride(-1) != 1:
        # contiguous() keeps a size-1 last dim's odd stride (e.g. a transposed [n, 1]); view() needs stride 1.
        words = words.clone(memory_format=torch.contiguous_format)
    as_bytes = words.contiguous().view(torch.uint8)
    if sys.byteorder == "big":  # pragma: no cover - no big-endian CI machine
        as_bytes = as_bytes.reshape(*words.shape, 4).flip(-1).reshape(*words.shape[:-1], -1).contiguous()
    return as_bytes


def int32_to_packed(words: torch.Tensor) -> torch.Tensor:
    """compressed-tensors int32 ``weight_packed [out, ceil(in/8)]`` -> canonical uint8 ``[out, 4*ceil(in/8)]``.

    Zero copy on a little-endian host: nibble slot i of word j is column 8j + i, which is byte 4j + i//2.
    """
    return _little_endian_bytes(words)


def packed_to_int32(packed: torch.Tensor) -> torch.Tensor:
    """Canonical uint8 ``[out, 4k]`` -> compressed-tensors int32 ``weight_packed [out, k]``."""
    if packed.shape[1] % 4:
        packed = torch.nn.functional.pad(packed, (0, 4 - packed.shape[1] % 4))
    packed = packed.contiguous()
    if sys.byteorder == "big":  # pragma: no cover
        packed = packed.reshape(packed.shape[0], -1, 4).flip(-1).reshape(packed.shape[0], -1).contiguous()
    return packed.view(torch.int32)


def unpack_int32_along_rows(words: torch.Tensor, rows: int) -> torch.Tensor:
    """int32 ``[ceil(rows/8), G]`` packed along dim 0 (compressed-tensors zero points) -> uint8 ``[rows, G]``.

    Row r sits in word ``r // 8``, nibble slot ``r % 8`` (bits 4*(r%8) .. 4*(r%8)+3).
    """
    as_bytes = _little_endian_bytes(words.t().contiguous())  # [G, 4*ceil(rows/8)]
    return unpack_nibbles(as_bytes)[:, :rows].t().contiguous()


def pack_int32_along_rows(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 ``[rows, G]`` of stored nibbles -> int32 ``[ceil(rows/8), G]`` packed along dim 0."""
    return packed_to_int32(pack_nibbles(nibbles.t().contiguous())).t().contiguous()


def group_index(in_features: int, group_size: int, g_idx: torch.Tensor | None, device=None) -> torch.Tensor:
    """The group of every input column, int64 ``[in]``: ``g_idx`` when given, else ``column // group_size``."""
    if g_idx is not None:
        return g_idx.to(device=device if device is not None else g_idx.device, dtype=torch.long)
    return torch.arange(in_features, device=device) // group_size


def num_groups(in_features: int, group_size: int) -> int:
    """G = ceil(in / group_size), the number of scale columns for a grouped weight."""
    return -(-in_features // group_size)


def infer_group_size(in_features: int, groups: int, name: str = "weight") -> int:
    """The group size that gives ``groups`` scale columns over ``in_features`` columns, when only one plausibly does.

    Every ``gs`` in ``[ceil(in/G), floor((in-1)/(G-1))]`` gives ``ceil(in/gs) == G`` (e.g. in=200, G=2: 100 and
    128 both fit), so G alone does not determine the group size. Writers use group sizes that divide ``in`` or are
    powers of two; that range holds at most one of each (it lies within ``[L, 2L)``). When they coincide or only one
    exists the answer is unambiguous; otherwise this raises and asks for the checkpoint's group size.
    """
    if groups == 1:
        return in_features
    low = -(-in_features // groups)
    high = (in_features - 1) // (groups - 1) if groups > 1 else 0
    if groups < 1 or low > high:
        raise Int4FormatError(
            f"{name}: no group size splits in_features={in_features} into {groups} groups; the scales do not "
            "match the weight."
        )
    if low == high:
        return low
    plausible = set()
    if in_features % groups == 0:
        plausible.add(in_features // groups)
    power_of_two = 1 << (low - 1).bit_length()
    if power_of_two <= high:
        plausible.add(power_of_two)
    if len(plausible) == 1:
        return plausible.pop()
    raise Int4FormatError(
        f"{name}: cannot tell the group size from the scales alone: in_features={in_features} with {groups} groups "
        f"fits every group size from {low} to {high} (e.g. {sorted(plausible) or [low, high]}); pass group_size (the "
        "checkpoint's quantization_config / quantization scheme has it)."
    )


@dataclass(frozen=True)
class Int4Weight:
    """One linear layer's INT4 weight in the canonical layout (see the module docstring)."""

    packed: torch.Tensor
    scales: torch.Tensor
    in_features: int
    group_size: int
    zero_points: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None

    @classmethod
    def create(
        cls,
        packed: torch.Tensor,
        scales: torch.Tensor,
        in_features: int,
        group_size: int | None = None,
        zero_points: torch.Tensor | None = None,
        g_idx: torch.Tensor | None = None,
        name: str = "weight",
    ) -> Int4Weight:
        """Build and validate a weight, normalising per-tensor / per-channel scales and zero points to ``[out, G]``.

        ``group_size`` may be omitted: it is then inferred from the scales (``ceil(in / G)``; ``in`` for G = 1).
        ``name`` is used in error messages (e.g. ``model.layers.0.self_attn.q_proj``).
        """
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
            raise Int4FormatError(
                f"{name}: packed INT4 weight must be a 2-D uint8 tensor [out, in/2], got "
                f"{_describe(packed)}; convert int32 compressed-tensors words with int32_to_packed()."
            )
        out_features = packed.shape[0]
        if not isinstance(scales, torch.Tensor):
            raise Int4FormatError(f"{name}: the weight scale is missing (got {scales!r}); every INT4 weight needs one.")
        if scales.dtype not in FLOAT_DTYPES:
            raise Int4FormatError(f"{name}: scales must be float16, bfloat16 or float32, got {_describe(scales)}.")
        scales = _as_rows_by_groups(scales, out_features, name, "scales")
        if zero_points is not None:
            if zero_points.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
                raise Int4FormatError(
                    f"{name}: zero points must be an integer tensor (unpacked, in [-8, 7]), got "
                    f"{_describe(zero_points)}."
                )
            zero_points = _as_rows_by_groups(zero_points, out_features, name, "zero_points").to(torch.int8)
        if group_size is None or group_size <= 0:
            groups = scales.shape[1]
            # With a g_idx the group size does not affect the values, so an ambiguous one is harmless.
            group_size = (
                num_groups(in_features, groups) if g_idx is not None else infer_group_size(in_features, groups, name)
            )
        weight = cls(
            packed=packed,
            scales=scales,
            in_features=int(in_features),
            group_size=int(group_size),
            zero_points=zero_points,
            g_idx=None if g_idx is None else g_idx.to(torch.int32),
        )
        weight.validate(name)
        return weight

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def num_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the reference library dequantizes into: the scale's."""
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def shape(self) -> torch.Size:
        """The dense weight's shape ``[out, in]``."""
        return torch.Size((self.out_features, self.in_features))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The non-None tensors by canonical name (for buffers, byte counts and fingerprints)."""
        items = {name: getattr(self, name) for name in INT4_TENSOR_NAMES}
        return {k: v for k, v in items.items() if v is not None}

    def zero_points_or_zeros(self) -> torch.Tensor:
        """int8 ``[out, G]``: the zero points, or zeros for a symmetric weight (for formats that always store them)."""
        if self.zero_points is not None:
            return self.zero_points
        return torch.zeros(self.scales.shape, dtype=torch.int8, device=self.device)

    @property
    def nbytes(self) -> int:
        """Bytes actually stored (stride-0 expanded scales count once)."""
        return sum(_stored_bytes(t) for t in self.tensors().values())

    def to(self, device=None) -> Int4Weight:
        return replace(self, **{k: v.to(device) for k, v in self.tensors().items()})

    def validate(self, name: str = "weight") -> None:
        """Raise :class:`Int4FormatError` naming the tensor, its shape and what was expected."""
        out_features, in_features = self.out_features, self.in_features
        if in_features <= 0:
            raise Int4FormatError(f"{name}: in_features must be positive, got {in_features}.")
        needed = -(-in_features // 2)
        if self.packed.shape[1] < needed:
            raise Int4FormatError(
                f"{name}: packed weight {tuple(self.packed.shape)} holds {2 * self.packed.shape[1]} columns but "
                f"in_features is {in_features}; expected at least [{out_features}, {needed}] uint8."
            )
        if self.group_size <= 0:
            raise Int4FormatError(f"{name}: group_size must be positive, got {self.group_size}.")
        groups = self.scales.shape[1]
        if self.g_idx is None:
            expected = num_groups(in_features, self.group_size)
            if groups != expected:
                raise Int4FormatError(
                    f"{name}: scales {tuple(self.scales.shape)} have {groups} groups, but in_features={in_features} "
                    f"with group_size={self.group_size} needs {expected}; check the checkpoint's group_size."
                )
        else:
            if self.g_idx.shape != (in_features,):
                raise Int4FormatError(
                    f"{name}: g_idx has shape {tuple(self.g_idx.shape)}, expected [{in_features}] (one group per "
                    "input column)."
                )
            if self.g_idx.numel() and (int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= groups):
                raise Int4FormatError(
                    f"{name}: g_idx values must lie in [0, {groups - 1}] (scales {tuple(self.scales.shape)}), got "
                    f"[{int(self.g_idx.min())}, {int(self.g_idx.max())}]; -1 means the g_idx was never filled."
                )
        if self.zero_points is not None:
            if self.zero_points.shape != self.scales.shape:
                raise Int4FormatError(
                    f"{name}: zero_points {tuple(self.zero_points.shape)} must match scales {tuple(self.scales.shape)}."
                )
            if self.zero_points.numel() and (
                int(self.zero_points.min()) < -NIBBLE_OFFSET or int(self.zero_points.max()) > NIBBLE_OFFSET
            ):
                raise Int4FormatError(
                    f"{name}: zero_points {tuple(self.zero_points.shape)} range over [{int(self.zero_points.min())}, "
                    f"{int(self.zero_points.max())}], expected signed INT4 values in [-8, 7] (8 only from GPTQ v1); "
                    "were they passed still packed, or unsigned (0..15) without subtracting 8?"
                )
        if not torch.isfinite(self.scales).all():
            bad = (~torch.isfinite(self.scales)).nonzero()[0].tolist()
            raise Int4FormatError(
                f"{name}: scales {tuple(self.scales.shape)} contain NaN or inf (first at {bad}); the checkpoint is "
                "corrupt or was quantized from a diverged model."
            )


def _as_rows_by_groups(t: torch.Tensor, out_features: int, name: str, what: str) -> torch.Tensor:
    """Normalise a per-tensor ``[1]``, per-channel ``[out]`` / ``[out, 1]`` or grouped ``[out, G]`` tensor."""
    if t.numel() == 1:
        return t.reshape(1, 1).expand(out_features, 1)
    if t.dim() == 1 and t.shape[0] == out_features:
        return t.reshape(out_features, 1)
    if t.dim() == 2 and t.shape[0] == out_features:
        return t
    raise Int4FormatError(
        f"{name}: {what} has shape {tuple(t.shape)}; expected [1] (per tensor), [{out_features}] or "
        f"[{out_features}, 1] (per channel) or [{out_features}, G] (grouped) for a weight with {out_features} rows."
    )


def _stored_bytes(t: torch.Tensor) -> int:
    """Bytes of distinct elements: a stride-0 (expanded) dimension counts once."""
    distinct = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            distinct *= size
    return distinct * t.element_size()


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return repr(type(t).__name__)
