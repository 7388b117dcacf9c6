"""Readers and writers of the INT4 checkpoint formats, each converting to or from the canonical :class:`Int4Weight`.

::

    format               weight                         zero points                      scales
    compressed-tensors   weight_packed int32 [out,in/8]  weight_zero_point int32          weight_scale [1] /
                         (K packed, sequential)         [out/8, G] (packed along out;    [out, 1] / [out, G]
                         + weight_shape [2]             tensor strategy: int8 [1])
    GPTQ (v1 / v2)       qweight int32 [in/8, out]      qzeros int32 [G, out/8]          scales [G, out]
                         (K packed, sequential)         (v1 stores zero - 1)
    AWQ GEMM             qweight int32 [in, out/8]      qzeros int32 [G, out/8]          scales [G, out]
                         (N packed, interleaved)        (same interleave)
    uint8 (seed)         weight uint8 [out, in/2]       unpacked, as given               [1] / [out] / [out, G]

The stored nibble ``u`` is the canonical one in every format: ``q = u - 8`` for compressed-tensors' signed values
and for GPTQ / AWQ's unsigned ``u``, whose zero points ``z`` become ``zp = z - 8`` (``(u - z) = (q - zp)``). So the
conversions move nibbles between layouts but never change a value. Bit layouts: FORMATS.md. The nibble order and
the group rule come from :mod:`int4lora_train.quant.layout` only.

Modules are recognised by their tensors (parameters or buffers), never by importing the libraries that made them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from int4lora_train.errors import Int4FormatError, UnsupportedFormatError
from int4lora_train.quant.layout import (
    NIBBLE_OFFSET,
    Int4Weight,
    infer_group_size,
    int32_to_packed,
    num_groups,
    pack_int32_along_rows,
    pack_nibbles,
    packed_to_int32,
    unpack_int32_along_rows,
    unpack_nibbles,
)

logger = logging.getLogger(__name__)

COMPRESSED_TENSORS = "compressed-tensors"
GPTQ = "gptq"
AWQ = "awq"
UINT8 = "uint8"
FORMAT_NAMES = (COMPRESSED_TENSORS, GPTQ, AWQ, UINT8)

CT_TENSOR_NAMES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
QUANT_LINEAR_TENSOR_NAMES = ("qweight", "qzeros", "scales", "g_idx")

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""AutoAWQ's interleave: nibble slot ``i`` of ``qweight[k, c]`` holds output column ``8c + AWQ_ORDER[i]``."""
AWQ_REVERSE_ORDER = tuple(sorted(range(8), key=AWQ_ORDER.__getitem__))
"""Its inverse, ``[0, 4, 1, 5, 2, 6, 3, 7]``: output column ``8c + j`` sits in slot ``AWQ_REVERSE_ORDER[j]``."""

GPTQ_V1_ZERO_OFFSET = 1
"""GPTQ v1 (``checkpoint_format: gptq``) stores ``zero - 1``; v2 (``gptq_v2``) stores ``zero``."""

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


# ------------------------------------------------------------------------------------------------ compressed-tensors


def from_compressed_tensors(
    tensors: Mapping[str, torch.Tensor],
    name: str = "weight",
    group_size: int | None = None,
    strategy: str | None = None,
) -> Int4Weight:
    """compressed-tensors ``pack-quantized`` tensors -> canonical (zero copy for ``weight_packed``).

    ``tensors`` holds the module-local names ``weight_packed`` int32 ``[out, ceil(in/8)]``, ``weight_shape`` int
    ``[2]``, ``weight_scale`` ``[1] / [out, 1] / [out, G]``, and optionally ``weight_zero_point`` (int32
    ``[ceil(out/8), G]`` packed along the output axis, or int8 ``[1]`` for the tensor strategy, or already unpacked
    int8 ``[out, G]``) and ``weight_g_idx`` int32 ``[in]``. ``group_size`` should come from the quantization scheme;
    it is inferred from the scales only when that is unambiguous. ``name`` (the module) is used in errors.
    """
    words = _require(tensors, "weight_packed", name, "compressed-tensors")
    if words.dtype == torch.uint8:
        raise UnsupportedFormatError(
            f"{name}.weight_packed is {_describe(words)}: uint8 weight_packed is compressed-tensors' FP4 layout "
            "(nvfp4 / mxfp4-pack-quantized), which is not supported; only INT4 pack-quantized (int32) is."
        )
    _check_tensor(words, f"{name}.weight_packed", (torch.int32,), 2, "[out, ceil(in/8)] int32")
    scale = _require(tensors, "weight_scale", name, "compressed-tensors")
    shape = _require(tensors, "weight_shape", name, "compressed-tensors")
    _check_tensor(shape, f"{name}.weight_shape", _INT_DTYPES, None, "[2] integer tensor holding [out, in]")
    if shape.numel() != 2:
        raise Int4FormatError(f"{name}.weight_shape is {_describe(shape)} = {shape.tolist()}; expected [out, in].")
    out_features, in_features = (int(v) for v in shape.reshape(-1).tolist())
    if out_features != words.shape[0] or in_features <= 0:
        raise Int4FormatError(
            f"{name}.weight_shape says [{out_features}, {in_features}] but weight_packed is {_describe(words)}; "
            f"expected weight_packed [{out_features}, {-(-max(in_features, 1) // 8)}]."
        )
    if words.shape[1] != -(-in_features // 8):
        _raise_bit_width(name, words, in_features)
    _check_scales(scale, f"{name}.weight_scale")
    if (global_scale := tensors.get("weight_global_scale")) is not None:
        raise UnsupportedFormatError(
            f"{name}.weight_global_scale ({_describe(global_scale)}) marks an FP4 (nvfp4) weight; only INT4 is "
            "supported."
        )

    groups = 1 if scale.numel() == 1 or scale.dim() == 1 else scale.shape[1]
    g_idx = tensors.get("weight_g_idx")
    if g_idx is not None:
        g_idx = _check_g_idx(g_idx, in_features, f"{name}.weight_g_idx")
    group_size = _resolve_group_size(group_size, strategy, in_features, groups, g_idx, name)
    zero_points = tensors.get("weight_zero_point")
    if zero_points is not None:
        zero_points = _ct_zero_points(zero_points, out_features, groups, name)
    return Int4Weight.create(
        int32_to_packed(words), scale, in_features, group_size, zero_points=zero_points, g_idx=g_idx, name=name
    )


def to_compressed_tensors(weight: Int4Weight, strategy: str | None = None) -> dict[str, torch.Tensor]:
    """Canonical -> exactly the tensors compressed-tensors' ``PackedQuantizationCompressor.compress`` writes.

    ``strategy`` (``"group"`` / ``"channel"`` / ``"tensor"``) only matters for the tensor strategy (scale ``[1]``
    and an unpacked int8 ``[1]`` zero point); by default it is detected from a per-tensor (stride-0) scale.
    """
    out_features, in_features = weight.shape
    is_tensor = strategy == "tensor" or (strategy is None and out_features > 1 and weight.scales.stride(0) == 0)
    tensors = {"weight_packed": packed_to_int32(_canonical_bytes(weight))}
    if is_tensor:
        _require_per_tensor(weight)
        tensors["weight_scale"] = weight.scales[:1, 0].clone()
    else:
        tensors["weight_scale"] = weight.scales.contiguous()
    tensors["weight_shape"] = torch.tensor([out_features, in_features], dtype=torch.int64, device=weight.device)
    if weight.zero_points is not None:
        _check_zero_point_range(weight.zero_points, -NIBBLE_OFFSET, NIBBLE_OFFSET - 1, "compressed-tensors")
        if is_tensor:
            tensors["weight_zero_point"] = weight.zero_points[:1, 0].to(torch.int8).clone()
        else:
            nibbles = (weight.zero_points.to(torch.int16) + NIBBLE_OFFSET).to(torch.uint8)
            tensors["weight_zero_point"] = pack_int32_along_rows(nibbles)
    if weight.g_idx is not None:
        tensors["weight_g_idx"] = weight.g_idx.to(torch.int32).contiguous()
    return tensors


def _ct_zero_points(zero_points: torch.Tensor, out_features: int, groups: int, name: str) -> torch.Tensor:
    """Packed int32 ``[ceil(out/8), G]`` -> int8 ``[out, G]``; unpacked (tensor strategy) ones pass through."""
    label = f"{name}.weight_zero_point"
    if zero_points.dtype not in _INT_DTYPES:
        raise Int4FormatError(f"{label} is {_describe(zero_points)}; expected an int32 packed or int8 tensor.")
    if zero_points.dtype == torch.int32 and zero_points.dim() == 2:
        expected = (-(-out_features // 8), groups)
        if tuple(zero_points.shape) != expected:
            raise Int4FormatError(
                f"{label} is {_describe(zero_points)}; a zero point packed along the output axis for {out_features} "
                f"rows and {groups} groups must be int32 {list(expected)}."
            )
        return (unpack_int32_along_rows(zero_points, out_features).to(torch.int8) - NIBBLE_OFFSET).to(torch.int8)
    return zero_points


def _raise_bit_width(name: str, words: torch.Tensor, in_features: int) -> None:
    # W8A16 is the other width llm-compressor packs; any other mismatch is more likely a corrupt tensor.
    if words.shape[1] == -(-in_features // 4):
        raise UnsupportedFormatError(
            f"{name}.weight_packed is {_describe(words)} for in_features={in_features}: that is 8-bit packing; "
            "only 4-bit weights are supported."
        )
    raise Int4FormatError(
        f"{name}.weight_packed is {_describe(words)} but weight_shape has in_features={in_features}; expected "
        f"[{words.shape[0]}, {-(-in_features // 8)}] int32 (8 INT4 values per word)."
    )


# ------------------------------------------------------------------------------------------------------------ GPTQ


def from_gptq(
    tensors: Mapping[str, torch.Tensor],
    name: str = "weight",
    group_size: int | None = None,
    checkpoint_format: str = "gptq",
    in_features: int | None = None,
) -> Int4Weight:
    """GPTQ ``qweight`` int32 ``[in/8, out]``, ``qzeros`` int32 ``[G, out/8]``, ``scales`` ``[G, out]``, optional
    ``g_idx`` int32 ``[in]`` -> canonical.

    ``checkpoint_format`` ``"gptq"`` (v1) stores ``zero - 1``, ``"gptq_v2"`` stores ``zero``. ``group_size`` -1
    means per channel. All zero points 8 (symmetric GPTQ) give ``zero_points=None``; a ``g_idx`` equal to
    ``column // group_size`` (what GPTQ writes without act-order) is dropped.
    """
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise UnsupportedFormatError(
            f"{name}: GPTQ checkpoint_format {checkpoint_format!r} is not supported; use 'gptq' (v1) or 'gptq_v2'."
        )
    qweight = _require(tensors, "qweight", name, "GPTQ")
    qzeros = _require(tensors, "qzeros", name, "GPTQ")
    scales = _require(tensors, "scales", name, "GPTQ")
    _check_tensor(qweight, f"{name}.qweight", (torch.int32,), 2, "[in/8, out] int32")
    _check_scales(scales, f"{name}.scales", dims=2, expected="[G, out]")
    out_features = qweight.shape[1]
    if scales.shape[1] != out_features:
        raise Int4FormatError(
            f"{name}.scales is {_describe(scales)} but qweight {_describe(qweight)} has {out_features} output "
            f"columns; expected scales [G, {out_features}] (is this an AWQ module?)."
        )
    groups = scales.shape[0]
    _check_tensor(qzeros, f"{name}.qzeros", (torch.int32,), 2, f"[{groups}, {-(-out_features // 8)}] int32")
    if tuple(qzeros.shape) != (groups, -(-out_features // 8)):
        raise Int4FormatError(
            f"{name}.qzeros is {_describe(qzeros)}; expected [{groups}, {-(-out_features // 8)}] int32 (groups x "
            "out/8, packed along the output axis)."
        )
    g_idx = tensors.get("g_idx")
    if in_features is None:
        in_features = g_idx.numel() if g_idx is not None else 8 * qweight.shape[0]
    if qweight.shape[0] != -(-in_features // 8):
        raise Int4FormatError(
            f"{name}.qweight is {_describe(qweight)} for in_features={in_features}; expected "
            f"[{-(-in_features // 8)}, {out_features}] int32 (8 INT4 values per word along the input axis)."
        )
    if g_idx is not None:
        g_idx = _check_g_idx(g_idx, in_features, f"{name}.g_idx")
    group_size = _resolve_group_size(group_size, None, in_features, groups, g_idx, name)
    if g_idx is not None and torch.equal(
        g_idx.to(torch.long), torch.arange(in_features, device=g_idx.device) // group_size
    ):
        g_idx = None

    # qweight.T is compressed-tensors' weight_packed bit for bit (both pack K sequentially with u = q + 8).
    packed = int32_to_packed(qweight.t().contiguous())
    stored = unpack_int32_along_rows(qzeros.t().contiguous(), out_features).to(torch.int16)
    zero = stored + (GPTQ_V1_ZERO_OFFSET if checkpoint_format == "gptq" else 0)
    zero_points = (zero - NIBBLE_OFFSET).to(torch.int8)
    if bool((zero_points == 0).all()):
        zero_points = None
    return Int4Weight.create(
        packed, scales.t().contiguous(), in_features, group_size, zero_points=zero_points, g_idx=g_idx, name=name
    )


def to_gptq(weight: Int4Weight, checkpoint_format: str = "gptq", name: str = "weight") -> dict[str, torch.Tensor]:
    """Canonical -> GPTQ ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx`` (``g_idx`` always written, as GPTQ does).

    Needs ``in % 8 == 0``. Symmetric weights get zero 8 everywhere (v1 words ``0x77777777``). v1 cannot store a
    zero of 0 (it would be -1: AutoGPTQ's overflow bug), v2 cannot store 16: both raise.
    """
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise UnsupportedFormatError(
            f"{name}: GPTQ checkpoint_format must be 'gptq' or 'gptq_v2', got {checkpoint_format!r}."
        )
    out_features, in_features = weight.shape
    if in_features % 8:
        raise UnsupportedFormatError(
            f"{name}: GPTQ packs 8 input columns per int32 word; in_features={in_features} is not a multiple of 8. "
            "Use the compressed-tensors format instead."
        )
    qweight = packed_to_int32(_canonical_bytes(weight)).t().contiguous()
    zero_points = weight.zero_points
    if zero_points is None:
        zero_points = torch.zeros(weight.scales.shape, dtype=torch.int8, device=weight.device)
    offset = GPTQ_V1_ZERO_OFFSET if checkpoint_format == "gptq" else 0
    stored = zero_points.to(torch.int16) + NIBBLE_OFFSET - offset
    if int(stored.min()) < 0 or int(stored.max()) > 15:
        raise UnsupportedFormatError(
            f"{name}: zero points in [{int(zero_points.min())}, {int(zero_points.max())}] cannot be stored as "
            f"GPTQ {checkpoint_format} (stored zero{' - 1' if offset else ''} must lie in 0..15); use "
            f"{'gptq_v2' if offset else 'gptq'} or compressed-tensors."
        )
    qzeros = pack_int32_along_rows(stored.to(torch.uint8)).t().contiguous()
    g_idx = weight.g_idx
    if g_idx is None:
        g_idx = torch.arange(in_features, device=weight.device) // weight.group_size
    return {
        "qweight": qweight,
        "qzeros": qzeros,
        "scales": weight.scales.t().contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


# ------------------------------------------------------------------------------------------------------------- AWQ


def awq_permute(nibbles: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """uint8 ``[rows, 8C]`` -> ``[rows, 8C]`` with column ``8c + i`` taken from column ``8c + order[i]``.

    ``awq_permute(natural, AWQ_ORDER)`` gives the nibble slots AutoAWQ writes; ``awq_permute(slots,
    AWQ_REVERSE_ORDER)`` undoes it.
    """
    rows, columns = nibbles.shape
    index = torch.tensor(order, device=nibbles.device)
    return nibbles.reshape(rows, columns // 8, 8).index_select(2, index).reshape(rows, columns)


def from_awq(tensors: Mapping[str, torch.Tensor], name: str = "weight", group_size: int | None = None) -> Int4Weight:
    """AutoAWQ GEMM ``qweight`` int32 ``[in, out/8]``, ``qzeros`` int32 ``[G, out/8]`` (both interleaved along the
    output axis), ``scales`` ``[G, out]`` -> canonical. Zero points are unsigned (no -1 offset); all-8 -> None."""
    qweight = _require(tensors, "qweight", name, "AWQ")
    qzeros = _require(tensors, "qzeros", name, "AWQ")
    scales = _require(tensors, "scales", name, "AWQ")
    _check_tensor(qweight, f"{name}.qweight", (torch.int32,), 2, "[in, out/8] int32")
    _check_scales(scales, f"{name}.scales", dims=2, expected="[G, out]")
    in_features, out_features = qweight.shape[0], scales.shape[1]
    if out_features != 8 * qweight.shape[1]:
        raise Int4FormatError(
            f"{name}.scales is {_describe(scales)} but qweight {_describe(qweight)} packs {8 * qweight.shape[1]} "
            f"output columns; expected scales [G, {8 * qweight.shape[1]}]."
        )
    groups = scales.shape[0]
    _check_tensor(qzeros, f"{name}.qzeros", (torch.int32,), 2, f"[{groups}, {qweight.shape[1]}] int32")
    if tuple(qzeros.shape) != (groups, qweight.shape[1]):
        raise Int4FormatError(
            f"{name}.qzeros is {_describe(qzeros)}; expected [{groups}, {qweight.shape[1]}] int32 (groups x out/8)."
        )
    if "g_idx" in tensors and tensors["g_idx"] is not None:
        raise UnsupportedFormatError(f"{name}: AWQ GEMM has no g_idx, but one was given; is this a GPTQ module?")
    group_size = _resolve_group_size(group_size, None, in_features, groups, None, name)
    natural = awq_permute(unpack_nibbles(int32_to_packed(qweight)), AWQ_REVERSE_ORDER)  # [in, out]
    packed = pack_nibbles(natural.t().contiguous())
    zero = awq_permute(unpack_nibbles(int32_to_packed(qzeros)), AWQ_REVERSE_ORDER)  # [G, out]
    zero_points = (zero.t().to(torch.int16) - NIBBLE_OFFSET).to(torch.int8).contiguous()
    if bool((zero_points == 0).all()):
        zero_points = None
    return Int4Weight.create(
        packed, scales.t().contiguous(), in_features, group_size, zero_points=zero_points, name=name
    )


def to_awq(weight: Int4Weight, name: str = "weight") -> dict[str, torch.Tensor]:
    """Canonical -> AutoAWQ GEMM ``qweight`` / ``qzeros`` / ``scales``. Needs ``out % 8 == 0``, contiguous groups
    that divide ``in`` and no ``g_idx``; symmetric weights get zero 8."""
    out_features, in_features = weight.shape
    if out_features % 8:
        raise UnsupportedFormatError(
            f"{name}: AWQ packs 8 output columns per word; out_features={out_features} is not a multiple of 8."
        )
    if weight.g_idx is not None:
        raise UnsupportedFormatError(f"{name}: AWQ has no activation order (g_idx); use GPTQ or compressed-tensors.")
    if weight.num_groups > 1 and in_features % weight.group_size:
        raise UnsupportedFormatError(
            f"{name}: AWQ needs group_size to divide in_features, got {weight.group_size} and {in_features}."
        )
    zero_points = weight.zero_points
    if zero_points is None:
        zero_points = torch.zeros(weight.scales.shape, dtype=torch.int8, device=weight.device)
    _check_zero_point_range(zero_points, -NIBBLE_OFFSET, NIBBLE_OFFSET - 1, "AWQ")
    natural = unpack_nibbles(weight.packed)[:, :in_features].t().contiguous()  # [in, out]
    qweight = packed_to_int32(pack_nibbles(awq_permute(natural, AWQ_ORDER)))
    zero = (zero_points.to(torch.int16) + NIBBLE_OFFSET).to(torch.uint8).t().contiguous()  # [G, out]
    qzeros = packed_to_int32(pack_nibbles(awq_permute(zero, AWQ_ORDER)))
    return {"qweight": qweight, "qzeros": qzeros, "scales": weight.scales.t().contiguous()}


# ----------------------------------------------------------------------------------------------------------- uint8


def from_uint8(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None = None,
    group_size: int | None = None,
    name: str = "weight",
    in_features: int | None = None,
) -> Int4Weight:
    """The seed ``INT4Unpacker`` layout: uint8 ``[out, in/2]`` (even column in the low nibble), scales ``[1] /
    [out] / [out, G]``, zero points unpacked as given (``[1] / [out] / [out, G]``; integral floats are accepted)."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        hint = (
            " (int32 compressed-tensors words: use from_compressed_tensors)"
            if isinstance(packed, torch.Tensor) and packed.dtype == torch.int32
            else ""
        )
        raise Int4FormatError(
            f"{name}.weight is {_describe(packed)}; expected uint8 [out, in/2] with two INT4 values per byte{hint}."
        )
    if scales is None:
        raise Int4FormatError(
            f"{name}.weight_scale is missing; an INT4 weight needs its scales ([1], [out] or [out, G])."
        )
    _check_scales(scales, f"{name}.weight_scale")
    in_features = in_features or 2 * packed.shape[1]
    if zero_points is not None and zero_points.is_floating_point():
        if not bool(torch.isfinite(zero_points).all()) or not torch.equal(zero_points, zero_points.round()):
            raise Int4FormatError(
                f"{name}.weight_zero_point is {_describe(zero_points)} with non-integer values; INT4 zero points "
                "must be integers in [-8, 7]."
            )
        zero_points = zero_points.to(torch.int16)
    groups = 1 if scales.numel() == 1 or scales.dim() == 1 else scales.shape[1]
    group_size = _resolve_group_size(group_size, None, in_features, groups, None, name)
    return Int4Weight.create(packed, scales, in_features, group_size, zero_points=zero_points, name=name)


# ----------------------------------------------------------------------------------------------- detection, modules


def detect_format(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """``"compressed-tensors"``, ``"gptq"``, ``"awq"``, ``"uint8"`` or None, from the tensors' names and shapes.

    GPTQ and AWQ share names; ``qweight [in/8, out]`` with ``scales [G, out]`` is GPTQ, ``qweight [in, out/8]`` with
    ``scales [G, 8 * qweight.shape[1]]`` is AWQ.
    """
    if tensors.get("weight_packed") is not None:
        return COMPRESSED_TENSORS
    qweight, scales = tensors.get("qweight"), tensors.get("scales")
    if qweight is not None and scales is not None and qweight.dim() == 2 and scales.dim() == 2:
        if qweight.shape[1] == scales.shape[1]:
            return GPTQ
        if scales.shape[1] == 8 * qweight.shape[1]:
            return AWQ
        return None
    weight = tensors.get("weight")
    if weight is not None and weight.dtype == torch.uint8 and tensors.get("weight_scale") is not None:
        return UINT8
    return None


def read_int4_weight(tensors: Mapping[str, torch.Tensor], name: str = "weight", scheme=None) -> Int4Weight:
    """Any supported tensor set (module-local names) -> canonical. ``scheme``: a
    :class:`~int4lora_train.quant.checkpoint_config.WeightScheme` or a compressed-tensors ``QuantizationScheme`` /
    ``QuantizationArgs`` (for the group size, strategy and GPTQ version)."""
    fmt = detect_format(tensors)
    params = _scheme_params(scheme, name)
    if fmt is None:
        raise Int4FormatError(
            f"{name}: tensors {_describe_all(tensors)} are not a known INT4 layout; expected compressed-tensors "
            "(weight_packed, weight_scale, weight_shape), GPTQ / AWQ (qweight, qzeros, scales) or uint8 weight + "
            "weight_scale."
        )
    if fmt == COMPRESSED_TENSORS:
        return from_compressed_tensors(tensors, name, params["group_size"], params["strategy"])
    if fmt == GPTQ:
        return from_gptq(
            tensors, name, params["group_size"], params["checkpoint_format"] or "gptq", params["in_features"]
        )
    if fmt == AWQ:
        return from_awq(tensors, name, params["group_size"])
    return from_uint8(
        tensors["weight"], tensors["weight_scale"], tensors.get("weight_zero_point"), params["group_size"], name
    )


def read_module_int4_weight(module: torch.nn.Module, name: str = "module", scheme=None) -> Int4Weight | None:
    """The canonical INT4 weight held by ``module``, or None when it holds none.

    Recognised by tensors (parameters or buffers) and attributes, never by class: ``nn.Linear`` modules with
    compressed-tensors parameters (transformers 5.x with compressed-tensors >= 0.15), the older ``CompressedLinear``
    (``module.quantization_scheme`` gives the group size), GPTQ / AWQ quant-linear modules (``qweight``, ``qzeros``,
    ``scales`` [, ``g_idx``]; ``bits`` / ``w_bit``, ``group_size``, ``infeatures`` / ``in_features`` attributes
    when present) and a uint8 ``weight`` with ``weight_scale``. A quantized module of another bit width raises
    :class:`UnsupportedFormatError`; a malformed one :class:`Int4FormatError`.
    """
    tensors = module_tensors(module)
    fmt = detect_format(tensors)
    scheme = scheme if scheme is not None else getattr(module, "quantization_scheme", None)
    params = _scheme_params(scheme, name)
    bits = _module_bits(module, params)
    if fmt is None:
        _reject_other_quantized(module, tensors, name, bits)
        return None
    if bits not in (None, 4):
        raise UnsupportedFormatError(
            f"{name}: {type(module).__name__} is a {bits}-bit {fmt} module; only 4-bit weights are supported."
        )
    if fmt in (GPTQ, AWQ):
        if params["group_size"] is None:
            group_size = getattr(module, "group_size", None)
            params["group_size"] = group_size if isinstance(group_size, int) else None
        if params["in_features"] is None:
            for attr in ("infeatures", "in_features"):
                value = getattr(module, attr, None)
                if isinstance(value, int):
                    params["in_features"] = value
                    break
        if fmt == GPTQ:
            params["checkpoint_format"] = _gptq_zero_convention(module, params["checkpoint_format"])
    if fmt == GPTQ:
        return from_gptq(
            tensors, name, params["group_size"], params["checkpoint_format"] or "gptq", params["in_features"]
        )
    if fmt == AWQ:
        return from_awq(tensors, name, params["group_size"])
    if fmt == COMPRESSED_TENSORS:
        if params["symmetric"] and tensors.get("weight_zero_point") is not None:
            # A symmetric scheme's zero point is an initialised-but-unused parameter (compressed-tensors drops it
            # when it compresses); reading it would shift every value.
            tensors = {k: v for k, v in tensors.items() if k != "weight_zero_point"}
        return from_compressed_tensors(tensors, name, params["group_size"], params["strategy"])
    return from_uint8(
        tensors["weight"], tensors["weight_scale"], tensors.get("weight_zero_point"), params["group_size"], name
    )


def is_int4_module(module: torch.nn.Module) -> bool:
    """True when ``module`` holds an INT4 weight in a supported layout (by tensor names and bit width; a malformed
    one is still True, and :func:`read_module_int4_weight` then says what is wrong)."""
    tensors = module_tensors(module)
    fmt = detect_format(tensors)
    if fmt is None:
        return False
    try:
        bits = _module_bits(module, _scheme_params(getattr(module, "quantization_scheme", None), "module"))
    except UnsupportedFormatError:
        return False
    if bits not in (None, 4):
        return False
    if fmt == COMPRESSED_TENSORS:
        return tensors["weight_packed"].dtype == torch.int32
    return True


def module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's own parameters and buffers (not its children's) by local name."""
    tensors = {key: value.data for key, value in module.named_parameters(recurse=False) if value is not None}
    tensors.update({key: value for key, value in module.named_buffers(recurse=False) if value is not None})
    return tensors


def _gptq_zero_convention(module: torch.nn.Module, from_scheme: str | None) -> str | None:
    """The zero-point convention of a GPTQ module's tensors as they are in memory.

    GPTQModel converts v1 checkpoints to v2 when it loads them and reports which one a module holds through
    ``qzero_format()`` (1 or 2); that beats the checkpoint's config, which describes the file. Otherwise the
    scheme, then a ``checkpoint_format`` / ``format`` attribute, decide; None means v1 (AutoGPTQ keeps v1).
    """
    qzero_format = getattr(module, "qzero_format", None)
    if callable(qzero_format):
        try:
            version = qzero_format()
        except TypeError:  # a different signature: not GPTQModel's accessor
            version = None
        if version in (1, 2):
            return "gptq" if version == 1 else "gptq_v2"
    if from_scheme is not None:
        return from_scheme
    attribute = getattr(module, "checkpoint_format", None) or getattr(module, "format", None)
    return attribute if attribute in ("gptq", "gptq_v2") else None


def _module_bits(module: torch.nn.Module, params: dict) -> int | None:
    for attr in ("bits", "w_bit"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return params["num_bits"]


def _reject_other_quantized(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], name: str, bits) -> None:
    """A module that is quantized, but not in an INT4 layout, is an error rather than 'not INT4'."""
    weight = tensors.get("weight")
    if weight is not None and not weight.is_floating_point() and tensors.get("weight_scale") is not None:
        raise UnsupportedFormatError(
            f"{name}: {type(module).__name__} holds a {_describe(weight)} weight with weight_scale (an 8-bit "
            "int-quantized / FP8 layout); only INT4 weights are supported."
        )
    if (
        weight is not None
        and weight.is_floating_point()
        and weight.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    ):
        raise UnsupportedFormatError(f"{name}: weight is {_describe(weight)} (FP8); only INT4 weights are supported.")
    if tensors.get("qweight") is not None:
        raise Int4FormatError(
            f"{name}: {type(module).__name__} has qweight {_describe(tensors['qweight'])} but its scales "
            f"({_describe(tensors.get('scales'))}) match neither GPTQ [G, out] nor AWQ [G, 8*qweight.shape[1]]."
        )
    if bits not in (None, 4) and weight is None:
        raise UnsupportedFormatError(f"{name}: a {bits}-bit quantized module; only 4-bit weights are supported.")


# --------------------------------------------------------------------------------------------------------- helpers


def _scheme_params(scheme, name: str) -> dict:
    """Group size, strategy, bit width and GPTQ version from a WeightScheme, a compressed-tensors
    QuantizationScheme (``.weights``) / QuantizationArgs, or None."""
    params = {
        "group_size": None,
        "strategy": None,
        "num_bits": None,
        "checkpoint_format": None,
        "in_features": None,
        "symmetric": None,
    }
    if scheme is None:
        return params
    args = getattr(scheme, "weights", scheme)
    if args is None:  # a compressed-tensors scheme that quantizes only activations
        return params
    num_bits = getattr(args, "num_bits", None)
    kind = getattr(args, "type", "int")
    kind = getattr(kind, "value", kind)
    if kind not in (None, "int"):
        raise UnsupportedFormatError(
            f"{name}: the quantization scheme has {num_bits}-bit {kind} weights; only INT4 is supported."
        )
    strategy = getattr(args, "strategy", None)
    strategy = getattr(strategy, "value", strategy)
    group_size = getattr(args, "group_size", None)
    if strategy in ("channel", "tensor") or group_size in (-1, 0):
        group_size = -1
    symmetric = getattr(args, "symmetric", None)
    params.update(group_size=group_size, strategy=strategy, num_bits=num_bits, symmetric=symmetric)
    fmt = getattr(args, "checkpoint_format", None)
    if fmt in ("gptq", "gptq_v2"):
        params["checkpoint_format"] = fmt
    return params


def _resolve_group_size(
    group_size: int | None, strategy: str | None, in_features: int, groups: int, g_idx, name: str
) -> int:
    """The group size to build the weight with: the scheme's (-1 = whole row), else inferred from the scales."""
    if strategy in ("channel", "tensor") or group_size == -1:
        if groups != 1:
            raise Int4FormatError(
                f"{name}: the scheme is per {'channel' if strategy != 'tensor' else 'tensor'} but the scales have "
                f"{groups} groups; expected one scale per row (or one in all)."
            )
        return in_features
    if group_size is not None:
        if group_size <= 0:
            raise Int4FormatError(f"{name}: group_size must be positive or -1 (per channel), got {group_size}.")
        # With or without a g_idx, a writer makes ceil(in / group_size) groups.
        if num_groups(in_features, group_size) != groups:
            raise Int4FormatError(
                f"{name}: the scales have {groups} groups, but in_features={in_features} with group_size="
                f"{group_size} needs {num_groups(in_features, group_size)}; the checkpoint's group_size does not "
                "match its scales."
            )
        return group_size
    if g_idx is not None:
        return num_groups(in_features, groups)
    return infer_group_size(in_features, groups, name)


def _canonical_bytes(weight: Int4Weight) -> torch.Tensor:
    """uint8 ``[out, 4*ceil(in/8)]`` with the padding nibbles beyond ``in`` zero, as compressed-tensors pads."""
    in_features = weight.in_features
    width = 4 * -(-in_features // 8)
    if weight.packed.shape[1] == width and in_features % 8 == 0:
        return weight.packed
    return pack_nibbles(unpack_nibbles(weight.packed)[:, :in_features])


def _require_per_tensor(weight: Int4Weight) -> None:
    if weight.num_groups != 1 or not bool((weight.scales == weight.scales[:1, :1]).all()):
        raise Int4FormatError("strategy 'tensor' needs a single scale, but the weight has per-row scales.")
    if weight.zero_points is not None and not bool((weight.zero_points == weight.zero_points[:1, :1]).all()):
        raise Int4FormatError("strategy 'tensor' needs a single zero point, but the weight has per-row zero points.")


def _check_zero_point_range(zero_points: torch.Tensor, low: int, high: int, fmt: str) -> None:
    if zero_points.numel() and (int(zero_points.min()) < low or int(zero_points.max()) > high):
        raise UnsupportedFormatError(
            f"zero points range over [{int(zero_points.min())}, {int(zero_points.max())}]; {fmt} stores [{low}, "
            f"{high}] (a GPTQ v1 zero of 16 has no {fmt} equivalent)."
        )


def _check_g_idx(g_idx: torch.Tensor, in_features: int, label: str) -> torch.Tensor:
    if g_idx.dtype not in _INT_DTYPES or g_idx.dim() != 1 or g_idx.shape[0] != in_features:
        raise Int4FormatError(
            f"{label} is {_describe(g_idx)}; expected an int32 [{in_features}] group per input column."
        )
    if g_idx.numel() and bool((g_idx == -1).all()):
        raise Int4FormatError(
            f"{label} is all -1: the activation-order index was never filled (compressed-tensors initialises it to "
            "-1 before GPTQ calibration); the checkpoint is incomplete."
        )
    return g_idx.to(torch.int32)


def _check_tensor(t, label: str, dtypes, dims: int | None, expected: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in dtypes or (dims is not None and t.dim() != dims):
        raise Int4FormatError(f"{label} is {_describe(t)}; expected {expected}.")


def _check_scales(scales, label: str, dims: int | None = None, expected: str = "[1], [out, 1] or [out, G]") -> None:
    if (
        not isinstance(scales, torch.Tensor)
        or scales.dtype not in (torch.float16, torch.bfloat16, torch.float32)
        or (dims is not None and scales.dim() != dims)
    ):
        raise Int4FormatError(f"{label} is {_describe(scales)}; expected float16 / bfloat16 / float32 {expected}.")
    if not bool(torch.isfinite(scales).all()):
        bad = (~torch.isfinite(scales)).nonzero()[0].tolist()
        raise Int4FormatError(
            f"{label} ({_describe(scales)}) contains NaN or inf (first at {bad}); the checkpoint is corrupt or was "
            "quantized from a diverged model."
        )


def _require(tensors: Mapping[str, torch.Tensor], key: str, name: str, fmt: str) -> torch.Tensor:
    value = tensors.get(key)
    if value is None:
        raise Int4FormatError(
            f"{name}.{key} is missing; a {fmt} INT4 module needs it (found {_describe_all(tensors)})."
        )
    return value


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} {list(t.shape)}"
    return "missing" if t is None else type(t).__name__


def _describe_all(tensors: Mapping[str, torch.Tensor]) -> str:
    return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in tensors.items()) + "}"
