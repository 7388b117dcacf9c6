"""GPTQ (AutoGPTQ / GPTQModel / optimum; ``quant_method: "gptq"``, v1 and v2; FORMATS.md §3).

::

    qweight  int32 [in/8, out]    K packed sequentially (qweight.T is compressed-tensors' weight_packed bit for bit)
    qzeros   int32 [G, out/8]     packed along the output axis; v1 (``gptq``) stores zero - 1, v2 (``gptq_v2``) zero
    scales   [G, out]
    g_idx    int32 [in]           always written; column // group_size unless act-order (desc_act)

Stored nibbles ``u`` and zeros ``z`` are unsigned: ``(u - z) = (q - zp)`` with ``q = u - 8``, ``zp = z - 8``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import torch

from int4lora_train.errors import Int4FormatError, UnsupportedFormatError
from int4lora_train.quant.formats.base import (
    QuantLinearFormat,
    ReadParams,
    check_g_idx,
    check_scales,
    check_tensor,
    describe,
    group_size_or_channel,
    none_if_all_zero,
    quant_linear_group_size,
    quant_linear_params,
    require,
    resolve_group_size,
    supported,
    word_aligned_bytes,
)
from int4lora_train.quant.layout import (
    Int4Weight,
    group_index,
    int32_to_packed,
    int32_words,
    nibbles_to_signed,
    pack_int32_along_rows,
    packed_to_int32,
    signed_to_nibbles,
    unpack_int32_along_rows,
)
from int4lora_train.quant.scheme import WeightScheme

GPTQ_FORMATS = ("gptq", "gptq_v2")
GPTQ_V1_ZERO_OFFSET = 1
"""GPTQ v1 (``checkpoint_format: gptq``) stores ``zero - 1``; v2 (``gptq_v2``) stores ``zero``."""


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
    if checkpoint_format not in GPTQ_FORMATS:
        raise UnsupportedFormatError(
            f"{name}: GPTQ checkpoint_format {checkpoint_format!r} is not supported; use 'gptq' (v1) or 'gptq_v2'."
        )
    qweight = require(tensors, "qweight", name, "GPTQ")
    qzeros = require(tensors, "qzeros", name, "GPTQ")
    scales = require(tensors, "scales", name, "GPTQ")
    check_tensor(qweight, f"{name}.qweight", (torch.int32,), 2, "[in/8, out] int32")
    check_scales(scales, f"{name}.scales", dims=2, expected="[G, out]")
    out_features = qweight.shape[1]
    if scales.shape[1] != out_features:
        raise Int4FormatError(
            f"{name}.scales is {describe(scales)} but qweight {describe(qweight)} has {out_features} output "
            f"columns; expected scales [G, {out_features}] (is this an AWQ module?)."
        )
    groups = scales.shape[0]
    zero_words = int32_words(out_features)
    check_tensor(qzeros, f"{name}.qzeros", (torch.int32,), 2, f"[{groups}, {zero_words}] int32")
    if tuple(qzeros.shape) != (groups, zero_words):
        raise Int4FormatError(
            f"{name}.qzeros is {describe(qzeros)}; expected [{groups}, {zero_words}] int32 (groups x "
            "out/8, packed along the output axis)."
        )
    g_idx = tensors.get("g_idx")
    if in_features is None:
        in_features = g_idx.numel() if g_idx is not None else 8 * qweight.shape[0]
    if qweight.shape[0] != int32_words(in_features):
        raise Int4FormatError(
            f"{name}.qweight is {describe(qweight)} for in_features={in_features}; expected "
            f"[{int32_words(in_features)}, {out_features}] int32 (8 INT4 values per word along the input axis)."
        )
    if g_idx is not None:
        g_idx = check_g_idx(g_idx, in_features, f"{name}.g_idx")
    group_size = resolve_group_size(group_size, None, in_features, groups, g_idx, name)
    if g_idx is not None and torch.equal(
        g_idx.to(torch.long), group_index(in_features, group_size, None, g_idx.device)
    ):
        g_idx = None

    # qweight.T is compressed-tensors' weight_packed bit for bit (both pack K sequentially with u = q + 8).
    packed = int32_to_packed(qweight.t().contiguous())
    stored = unpack_int32_along_rows(qzeros.t().contiguous(), out_features)
    zero_points = nibbles_to_signed(stored) + (GPTQ_V1_ZERO_OFFSET if checkpoint_format == "gptq" else 0)
    return Int4Weight.create(
        packed,
        scales.t().contiguous(),
        in_features,
        group_size,
        zero_points=none_if_all_zero(zero_points),
        g_idx=g_idx,
        name=name,
    )


def to_gptq(weight: Int4Weight, checkpoint_format: str = "gptq", name: str = "weight") -> dict[str, torch.Tensor]:
    """Canonical -> GPTQ ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx`` (``g_idx`` always written, as GPTQ does).

    Needs ``in % 8 == 0``. Symmetric weights get zero 8 everywhere (v1 words ``0x77777777``). v1 cannot store a
    zero of 0 (it would be -1: AutoGPTQ's overflow bug), v2 cannot store 16: both raise.
    """
    if checkpoint_format not in GPTQ_FORMATS:
        raise UnsupportedFormatError(
            f"{name}: GPTQ checkpoint_format must be 'gptq' or 'gptq_v2', got {checkpoint_format!r}."
        )
    out_features, in_features = weight.shape
    if in_features % 8:
        raise UnsupportedFormatError(
            f"{name}: GPTQ packs 8 input columns per int32 word; in_features={in_features} is not a multiple of 8. "
            "Use the compressed-tensors format instead."
        )
    qweight = packed_to_int32(word_aligned_bytes(weight)).t().contiguous()
    zero_points = weight.zero_points_or_zeros()
    offset = GPTQ_V1_ZERO_OFFSET if checkpoint_format == "gptq" else 0
    shifted = zero_points.to(torch.int16) - offset  # stored nibble = shifted + 8, in 0..15
    if int(shifted.min()) < -8 or int(shifted.max()) > 7:
        raise UnsupportedFormatError(
            f"{name}: zero points in [{int(zero_points.min())}, {int(zero_points.max())}] cannot be stored as "
            f"GPTQ {checkpoint_format} (stored zero{' - 1' if offset else ''} must lie in 0..15); use "
            f"{'gptq_v2' if offset else 'gptq'} or compressed-tensors."
        )
    qzeros = pack_int32_along_rows(signed_to_nibbles(shifted)).t().contiguous()
    g_idx = group_index(in_features, weight.group_size, weight.g_idx, weight.device)
    return {
        "qweight": qweight,
        "qzeros": qzeros,
        "scales": weight.scales.t().contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def _scheme_zero_convention(params: ReadParams) -> str | None:
    """The scheme's GPTQ zero-point convention, if it names one (a scheme of another format does not)."""
    return params.checkpoint_format if params.checkpoint_format in GPTQ_FORMATS else None


def _zero_convention(module: torch.nn.Module, from_scheme: str | None) -> str | None:
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
    return attribute if attribute in GPTQ_FORMATS else None


# ------------------------------------------------------------------------------------------- quantization_config


def gptq_config(
    group_size: int | None = 128,
    symmetric: bool = True,
    checkpoint_format: str = "gptq",
    desc_act: bool = False,
    ignore: Iterable[str] = (),
) -> dict:
    """A GPTQ block as GPTQModel writes it (both ``format`` and the legacy ``checkpoint_format`` keys)."""
    if checkpoint_format not in GPTQ_FORMATS:
        raise UnsupportedFormatError(
            f"GPTQ checkpoint_format must be one of {list(GPTQ_FORMATS)}, got {checkpoint_format!r}."
        )
    block = {
        "bits": 4,
        "group_size": group_size if group_size else -1,
        "desc_act": bool(desc_act),
        "sym": bool(symmetric),
        "true_sequential": True,
        "lm_head": False,
        "quant_method": "gptq",
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "pack_dtype": "int32",
    }
    extra = [name for name in ignore if name != "lm_head"]
    if extra:
        block["modules_to_not_convert"] = extra
    return block


def _parse_scheme(block: dict, source: str) -> tuple[WeightScheme, list[str]]:
    """``bits``, ``group_size``, ``desc_act``, ``sym``, ``checkpoint_format`` / ``format`` (``gptq`` = v1
    zero-minus-one, ``gptq_v2``), ``modules_to_not_convert``, ``lm_head``."""
    where = f"{source}: quantization_config (gptq)"
    bits = block.get("bits", 4)
    if bits != 4:
        raise UnsupportedFormatError(f"{where}: bits is {bits}, only 4-bit GPTQ is supported; {supported()}.")
    # GPTQModel / transformers 5 write "format"; AutoGPTQ / optimum wrote "checkpoint_format".
    fmt = block.get("format") or block.get("checkpoint_format") or "gptq"
    if fmt not in GPTQ_FORMATS:
        raise UnsupportedFormatError(
            f"{where}: format {fmt!r} is not supported (a Marlin / BitBLAS / other repacked layout); use "
            f"{list(GPTQ_FORMATS)}. {supported()}."
        )
    group_size = group_size_or_channel(block.get("group_size", 128), where)
    desc_act = bool(block.get("desc_act", False))
    scheme = WeightScheme(
        format="gptq",
        group_size=group_size,
        symmetric=bool(block.get("sym", True)),
        strategy="group" if group_size else "channel",
        actorder="group" if desc_act else None,
        checkpoint_format=fmt,
    )
    ignore = list(block.get("modules_to_not_convert") or [])
    if not block.get("lm_head", False):
        ignore.append("lm_head")  # GPTQ writers quantize the decoder blocks only unless told "lm_head": true
    return scheme, ignore


# ---------------------------------------------------------------------------------------------------- the format


class GPTQFormat(QuantLinearFormat):
    name = "gptq"
    quant_method = "gptq"
    summary = "GPTQ 4-bit (gptq / gptq_v2)"
    layout = "GPTQ (qweight [in/8, out], scales [G, out])"

    def shapes_match(self, qweight_shape, scales_shape):
        return qweight_shape[1] == scales_shape[1]

    def read(self, tensors, name, params: ReadParams):
        zero_convention = _scheme_zero_convention(params) or "gptq"
        return from_gptq(tensors, name, params.group_size, zero_convention, params.in_features)

    def read_module(self, module, tensors, name, params: ReadParams):
        params = quant_linear_params(module, params)
        zero_convention = _zero_convention(module, _scheme_zero_convention(params))
        return self.read(tensors, name, dataclasses.replace(params, checkpoint_format=zero_convention))

    def write(self, weight, scheme, name):
        return to_gptq(weight, scheme.checkpoint_format, name=name)

    def parse_scheme(self, block, source):
        return _parse_scheme(block, source)

    def config_block(self, group_size, symmetric, strategy, ignore, checkpoint_format):
        size = quant_linear_group_size(self.name, group_size, strategy)
        return gptq_config(size, symmetric, checkpoint_format, desc_act=False, ignore=ignore)


FORMAT = GPTQFormat()
