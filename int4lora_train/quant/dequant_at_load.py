"""The 8-bit groups of a mixed-precision compressed-tensors checkpoint, dequantized once at load.

llm-compressor checkpoints often mix schemes: W4A16 groups beside weight-only W8A16 (``pack-quantized`` with
``num_bits: 8``, or ``int-quantized`` / ``naive-quantized`` int8) or FP8 (``float-quantized``, float8_e4m3fn weights
with per-channel / per-tensor / per-group scales) groups. The W4A16 groups stay packed (:class:`Int4Linear`); the 8-bit
ones are dequantized here, once, into the weight of a plain frozen ``nn.Linear`` in the model's dtype. Why not keep
them packed: they are a small share of the weights (typically attention, or the first / last layers, kept at higher
precision by the recipe), vLLM computes them at 8-bit precision from the same stored values, and a packed 8-bit
layer would need another kernel for little memory. LoRA attaches to these layers as to any ``nn.Linear``.

Dequantization follows compressed-tensors' own (``_dequantize``): ``(q.to(scale.dtype) - zp.to(scale.dtype)) *
scale`` in the scale's dtype, then cast to the model's dtype, so a checkpoint whose scales are in the model's dtype
gives bit-for-bit the weight the library's decompression gives (tests/quant/test_mixed_schemes.py).

Stored layouts (FORMATS.md §1; 8-bit is the same code path in compressed-tensors as 4-bit):

- ``pack-quantized`` 8-bit: ``weight_packed`` int32 ``[out, ceil(in/4)]``, byte ``j % 4`` of word ``j // 4`` holds
  column ``j`` as ``q + 128``; an asymmetric group / channel zero point is packed the same way along the output axis.
- ``int-quantized`` / ``naive-quantized``: ``weight`` int8 ``[out, in]``; ``float-quantized``: ``weight``
  float8_e4m3fn ``[out, in]``; zero points (asymmetric int) unpacked int8.
- ``weight_scale``: ``[1]`` (tensor), ``[out, 1]`` (channel), ``[out, G]`` (group).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping

import torch

from int4lora_train.errors import Int4FormatError
from int4lora_train.quant.formats.base import describe
from int4lora_train.quant.scheme import WeightScheme

DEQUANT_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized")
"""compressed-tensors formats whose weight-only 8-bit groups are dequantized at load."""
TENSOR_NAMES = ("weight_packed", "weight_shape", "weight", "weight_scale", "weight_zero_point")
"""Every module-local tensor such a module may store (the bias is a dense tensor of its own)."""

_OFFSET = 128


def required_tensor_names(scheme: WeightScheme) -> tuple[str, ...]:
    """The tensors a module of ``scheme`` must store."""
    names = ("weight_packed", "weight_shape") if scheme.checkpoint_format == "pack-quantized" else ("weight",)
    names += ("weight_scale",)
    return names if scheme.symmetric else (*names, "weight_zero_point")


def dequantize_stored(
    tensors: Mapping[str, torch.Tensor], scheme: WeightScheme, name: str, dtype: torch.dtype
) -> torch.Tensor:
    """The dense ``[out, in]`` weight of one 8-bit module in ``dtype`` (``tensors``: its module-local tensors)."""
    scale = tensors["weight_scale"]
    if not scale.is_floating_point():
        raise Int4FormatError(f"{name}.weight_scale is {describe(scale)}; expected a floating-point scale.")
    if scheme.checkpoint_format == "pack-quantized":
        q = _unpack_pack_quantized(tensors, name)
    else:
        q = tensors["weight"]
        expected = (torch.float8_e4m3fn,) if scheme.type == "float" else (torch.int8,)
        if q.dtype not in expected or q.dim() != 2:
            raise Int4FormatError(
                f"{name}.weight is {describe(q)}; a {scheme.describe()} weight is a 2-D {expected[0]} tensor."
            )
    out_features, in_features = q.shape
    zero_point = tensors.get("weight_zero_point") if not scheme.symmetric else None
    if zero_point is not None and zero_point.dtype == torch.int32 and zero_point.dim() == 2:
        zero_point = _unpack_rows(zero_point, out_features)
    values = q.to(scale.dtype)
    if zero_point is not None:
        values = values - _expand(zero_point, out_features, in_features, scheme, f"{name}.weight_zero_point").to(
            scale.dtype
        )
    values = values * _expand(scale, out_features, in_features, scheme, f"{name}.weight_scale")
    return values.to(dtype)


def _unpack_pack_quantized(tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    words, shape = tensors["weight_packed"], tensors["weight_shape"]
    if words.dtype != torch.int32 or words.dim() != 2 or shape.numel() != 2:
        raise Int4FormatError(
            f"{name}.weight_packed is {describe(words)} with weight_shape {describe(shape)}; an 8-bit pack-quantized "
            "weight is int32 [out, ceil(in/4)] with weight_shape [2]."
        )
    out_features, in_features = (int(v) for v in shape.reshape(-1).tolist())
    if words.shape[0] != out_features or words.shape[1] != -(-in_features // 4):
        raise Int4FormatError(
            f"{name}.weight_packed is {describe(words)} but weight_shape is [{out_features}, {in_features}]; 8-bit "
            f"packing stores [{out_features}, {-(-in_features // 4)}] int32 (4 values per word)."
        )
    return _bytes(words)[:, :in_features]


def _unpack_rows(words: torch.Tensor, rows: int) -> torch.Tensor:
    """An 8-bit zero point packed along the output axis, int32 ``[ceil(out/4), G]`` -> int8 ``[out, G]``."""
    return _bytes(words.t().contiguous())[:, :rows].t()


def _bytes(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[r, w]`` -> the signed 8-bit values ``[r, 4w]`` (byte ``i`` of a word is its bits ``8i..8i+7``)."""
    shifts = torch.arange(0, 32, 8, dtype=torch.int32, device=words.device)
    u = (words.unsqueeze(-1) >> shifts) & 0xFF
    return (u.reshape(words.shape[0], -1) - _OFFSET).to(torch.int8)


def _expand(t: torch.Tensor, out_features: int, in_features: int, scheme: WeightScheme, label: str) -> torch.Tensor:
    if t.numel() == 1:
        return t.reshape(1, 1)
    if t.dim() != 2 or t.shape[0] != out_features:
        raise Int4FormatError(f"{label} is {describe(t)}; expected [1], [{out_features}, 1] or [{out_features}, G].")
    if t.shape[1] == 1:
        return t
    group_size = scheme.group_size or -(-in_features // t.shape[1])
    if t.shape[1] != -(-in_features // group_size):
        raise Int4FormatError(
            f"{label} is {describe(t)}; group_size {group_size} over {in_features} columns needs "
            f"{-(-in_features // group_size)} groups."
        )
    return t.repeat_interleave(group_size, dim=1)[:, :in_features]


def stored_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a dequantized-at-load module's tensors as stored (name, dtype, shape, bytes, in name order): its
    part of the base fingerprint (export/fingerprint.py)."""
    h = hashlib.sha256(b"int4lora-dequantized-at-load-v1\n")
    for local in sorted(tensors):
        tensor = tensors[local].detach().to("cpu").contiguous()
        h.update(f"{local}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}\n".encode())
        raw = tensor.reshape(-1).view(torch.uint8) if tensor.numel() else torch.empty(0, dtype=torch.uint8)
        if sys.byteorder == "big":  # pragma: no cover - no big-endian CI machine
            raw = raw.reshape(-1, tensor.element_size()).flip(-1).reshape(-1)
        h.update(raw.numpy().data)
    return h.hexdigest()
