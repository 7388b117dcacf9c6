"""The seed ``INT4Unpacker``'s in-memory layout: already the canonical nibble order, with loose scales.

::

    weight             uint8 [out, in/2]          column 2b in the low nibble of byte b (stored u = q + 8)
    weight_scale       [1] / [out] / [out, G]
    weight_zero_point  [1] / [out] / [out, G]     optional, unpacked signed values (integral floats accepted)

No checkpoint is written in it: it has no ``quantization_config``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from int4lora_train.errors import Int4FormatError
from int4lora_train.quant.formats.base import Int4Format, ReadParams, check_scales, describe, resolve_group_size
from int4lora_train.quant.layout import Int4Weight


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
            f"{name}.weight is {describe(packed)}; expected uint8 [out, in/2] with two INT4 values per byte{hint}."
        )
    if scales is None:
        raise Int4FormatError(
            f"{name}.weight_scale is missing; an INT4 weight needs its scales ([1], [out] or [out, G])."
        )
    check_scales(scales, f"{name}.weight_scale")
    in_features = in_features or 2 * packed.shape[1]
    if zero_points is not None and zero_points.is_floating_point():
        if not bool(torch.isfinite(zero_points).all()) or not torch.equal(zero_points, zero_points.round()):
            raise Int4FormatError(
                f"{name}.weight_zero_point is {describe(zero_points)} with non-integer values; INT4 zero points "
                "must be integers in [-8, 7]."
            )
        zero_points = zero_points.to(torch.int16)
    groups = 1 if scales.numel() == 1 or scales.dim() == 1 else scales.shape[1]
    group_size = resolve_group_size(group_size, None, in_features, groups, None, name)
    return Int4Weight.create(packed, scales, in_features, group_size, zero_points=zero_points, name=name)


class Uint8Format(Int4Format):
    name = "uint8"
    quant_method = None  # in memory only
    tensor_names = ("weight", "weight_scale", "weight_zero_point")
    marker = "weight"
    summary = "the seed's uint8 layout (in memory)"
    layout = "uint8 (weight uint8 [out, in/2] with weight_scale)"

    def matches(self, tensors: Mapping[str, torch.Tensor | None]) -> bool:
        weight = tensors.get("weight")
        return weight is not None and weight.dtype == torch.uint8 and tensors.get("weight_scale") is not None

    def required_tensor_names(self, scheme=None):
        return ("weight", "weight_scale")

    def read(self, tensors, name, params: ReadParams):
        return from_uint8(
            tensors["weight"], tensors["weight_scale"], tensors.get("weight_zero_point"), params.group_size, name
        )


FORMAT = Uint8Format()
