"""AutoAWQ GEMM (``quant_method: "awq"``, ``version`` / ``format: "gemm"``; FORMATS.md §4).

::

    qweight  int32 [in, out/8]    packed along the OUTPUT axis, interleaved: slot i of word c holds column
                                  8c + AWQ_ORDER[i]
    qzeros   int32 [G, out/8]     unsigned zeros, same interleave (no -1 offset)
    scales   [G, out]

Stored nibbles ``u`` and zeros ``z`` are unsigned: ``(u - z) = (q - zp)`` with ``q = u - 8``, ``zp = z - 8``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from int4lora_train.errors import Int4FormatError, UnsupportedFormatError
from int4lora_train.quant.formats.base import (
    QuantLinearFormat,
    ReadParams,
    check_scales,
    check_tensor,
    check_zero_point_range,
    describe,
    group_size_or_channel,
    none_if_all_zero,
    quant_linear_group_size,
    require,
    resolve_group_size,
    supported,
)
from int4lora_train.quant.layout import (
    NIBBLE_OFFSET,
    Int4Weight,
    int32_to_packed,
    nibbles_to_signed,
    pack_nibbles,
    packed_to_int32,
    signed_to_nibbles,
    unpack_nibbles,
)
from int4lora_train.quant.scheme import WeightScheme

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""AutoAWQ's interleave: nibble slot ``i`` of ``qweight[k, c]`` holds output column ``8c + AWQ_ORDER[i]``."""
AWQ_REVERSE_ORDER = tuple(sorted(range(8), key=AWQ_ORDER.__getitem__))
"""Its inverse, ``[0, 4, 1, 5, 2, 6, 3, 7]``: output column ``8c + j`` sits in slot ``AWQ_REVERSE_ORDER[j]``."""


def awq_permute(nibbles: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """uint8 ``[rows, 8C]`` -> ``[rows, 8C]`` with column ``8c + i`` taken from column ``8c + order[i]``.

    ``awq_permute(natural, AWQ_ORDER)`` gives the nibble slots AutoAWQ writes; ``awq_permute(slots,
    AWQ_REVERSE_ORDER)`` undoes it.
    """
    rows, columns = nibbles.shape
    index = torch.tensor(order, device=nibbles.device)
    return nibbles.reshape(rows, columns // 8, 8).index_select(2, index).reshape(rows, columns)


def _unpack_interleaved(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[rows, C]`` in AWQ's interleave -> stored nibbles uint8 ``[rows, 8C]`` in natural column order."""
    return awq_permute(unpack_nibbles(int32_to_packed(words)), AWQ_REVERSE_ORDER)


def _pack_interleaved(nibbles: torch.Tensor) -> torch.Tensor:
    """Stored nibbles uint8 ``[rows, 8C]`` in natural order -> int32 ``[rows, C]`` in AWQ's interleave."""
    return packed_to_int32(pack_nibbles(awq_permute(nibbles, AWQ_ORDER)))


def from_awq(tensors: Mapping[str, torch.Tensor], name: str = "weight", group_size: int | None = None) -> Int4Weight:
    """AutoAWQ GEMM ``qweight`` int32 ``[in, out/8]``, ``qzeros`` int32 ``[G, out/8]`` (both interleaved along the
    output axis), ``scales`` ``[G, out]`` -> canonical. Zero points are unsigned (no -1 offset); all-8 -> None."""
    qweight = require(tensors, "qweight", name, "AWQ")
    qzeros = require(tensors, "qzeros", name, "AWQ")
    scales = require(tensors, "scales", name, "AWQ")
    check_tensor(qweight, f"{name}.qweight", (torch.int32,), 2, "[in, out/8] int32")
    check_scales(scales, f"{name}.scales", dims=2, expected="[G, out]")
    in_features, out_features = qweight.shape[0], scales.shape[1]
    if out_features != 8 * qweight.shape[1]:
        raise Int4FormatError(
            f"{name}.scales is {describe(scales)} but qweight {describe(qweight)} packs {8 * qweight.shape[1]} "
            f"output columns; expected scales [G, {8 * qweight.shape[1]}]."
        )
    groups = scales.shape[0]
    check_tensor(qzeros, f"{name}.qzeros", (torch.int32,), 2, f"[{groups}, {qweight.shape[1]}] int32")
    if tuple(qzeros.shape) != (groups, qweight.shape[1]):
        raise Int4FormatError(
            f"{name}.qzeros is {describe(qzeros)}; expected [{groups}, {qweight.shape[1]}] int32 (groups x out/8)."
        )
    if "g_idx" in tensors and tensors["g_idx"] is not None:
        raise UnsupportedFormatError(f"{name}: AWQ GEMM has no g_idx, but one was given; is this a GPTQ module?")
    group_size = resolve_group_size(group_size, None, in_features, groups, None, name)
    packed = pack_nibbles(_unpack_interleaved(qweight).t().contiguous())  # [in, out] -> [out, in/2]
    zero_points = nibbles_to_signed(_unpack_interleaved(qzeros).t()).contiguous()  # [G, out] -> [out, G]
    return Int4Weight.create(
        packed, scales.t().contiguous(), in_features, group_size, zero_points=none_if_all_zero(zero_points), name=name
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
    zero_points = weight.zero_points_or_zeros()
    check_zero_point_range(zero_points, -NIBBLE_OFFSET, NIBBLE_OFFSET - 1, "AWQ")
    natural = unpack_nibbles(weight.packed)[:, :in_features].t().contiguous()  # [in, out]
    return {
        "qweight": _pack_interleaved(natural),
        "qzeros": _pack_interleaved(signed_to_nibbles(zero_points).t().contiguous()),  # [G, out]
        "scales": weight.scales.t().contiguous(),
    }


# ------------------------------------------------------------------------------------------- quantization_config


def awq_config(group_size: int | None = 128, ignore: Iterable[str] = ()) -> dict:
    """An AutoAWQ GEMM block (``to_transformers_dict``)."""
    extra = [name for name in ignore if name != "lm_head"]
    return {
        "quant_method": "awq",
        "zero_point": True,
        "group_size": group_size if group_size else -1,
        "bits": 4,
        "version": "gemm",
        "modules_to_not_convert": extra or None,
    }


def _parse_scheme(block: dict, source: str) -> tuple[WeightScheme, list[str]]:
    """``bits``, ``group_size``, ``zero_point``, ``version`` / ``format`` (only ``gemm``), ``modules_to_not_convert``."""
    where = f"{source}: quantization_config (awq)"
    bits = block.get("bits", block.get("w_bit", 4))
    if bits != 4:
        raise UnsupportedFormatError(f"{where}: bits is {bits}, only 4-bit AWQ is supported; {supported()}.")
    version = str(block.get("format") or block.get("version") or "gemm").lower()
    if version != "gemm":
        raise UnsupportedFormatError(
            f"{where}: version/format {version!r} is not supported (GEMV, Marlin and ExLlama AWQ layouts are "
            f"repacked differently); only 'gemm'. {supported()}."
        )
    if block.get("zero_point") is False:
        raise UnsupportedFormatError(
            f"{where}: zero_point is false, which AWQ GEMM cannot export (it requires zero points); {supported()}."
        )
    group_size = group_size_or_channel(block.get("group_size", block.get("q_group_size", 128)), where)
    scheme = WeightScheme(
        format="awq",
        group_size=group_size,
        symmetric=False,
        strategy="group" if group_size else "channel",
        checkpoint_format="gemm",
    )
    ignore = list(block.get("modules_to_not_convert") or []) + ["lm_head"]
    return scheme, ignore


# ---------------------------------------------------------------------------------------------------- the format


class AWQFormat(QuantLinearFormat):
    name = "awq"
    quant_method = "awq"
    summary = "AWQ 4-bit GEMM"
    layout = "AWQ (qweight [in, out/8], scales [G, 8*qweight.shape[1]])"

    def shapes_match(self, qweight_shape, scales_shape):
        return scales_shape[1] == 8 * qweight_shape[1]

    def read(self, tensors, name, params: ReadParams):
        return from_awq(tensors, name, params.group_size)

    def write(self, weight, scheme, name):
        return to_awq(weight, name=name)

    def parse_scheme(self, block, source):
        return _parse_scheme(block, source)

    def config_block(self, group_size, symmetric, strategy, ignore, checkpoint_format):
        return awq_config(quant_linear_group_size(self.name, group_size, strategy), ignore=ignore)


FORMAT = AWQFormat()
