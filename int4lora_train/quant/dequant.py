"""Dequantization of a canonical :class:`Int4Weight` into a dense ``[out, in]`` tensor.

:func:`dequantize_torch` is the reference: plain torch ops on any device. Both it and the fused Triton kernel
(:mod:`int4lora_train.kernels.dequant`) compute ``(q - zp) * scale`` in fp32, which is exact for fp16 / bf16 scales,
and round once to the scale's dtype before casting to ``dtype``; that is bit-identical to compressed-tensors'
dequantization in the scale's dtype followed by ``.to(dtype)``. :func:`dequantize` runs the one the kernel backend
picks (:func:`int4lora_train.kernels.backend.use_triton`: Triton on CUDA by default).
"""

from __future__ import annotations

import torch

from int4lora_train.quant.layout import NIBBLE_OFFSET, Int4Weight, group_index, unpack_nibbles


def dequantize(weight: Int4Weight, dtype: torch.dtype | None = None, backend: str | None = None) -> torch.Tensor:
    """Dense ``[out, in]`` weight in ``dtype`` (default: the scale's dtype), one call.

    ``backend``: ``"auto"`` (default: Triton on CUDA, else torch), ``"torch"`` or ``"triton"``; see
    :mod:`int4lora_train.kernels.backend`. A layer's repeated dequantization goes through its
    :mod:`dequantizer <int4lora_train.kernels.dequantizer>` instead.
    """
    from int4lora_train.kernels.backend import use_triton  # the kernels package builds on this one

    if use_triton(weight.device, backend):
        from int4lora_train.kernels.dequant import dequantize_triton  # imports Triton, an optional dependency

        return dequantize_triton(weight, dtype)
    return dequantize_torch(weight, dtype)


def dequantize_torch(weight: Int4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The reference: plain torch ops, any device. Allocates a few ``[out, in]`` temporaries."""
    dtype = dtype or weight.dtype
    out_features, in_features = weight.shape
    q = unpack_nibbles(weight.packed)[:, :in_features].to(torch.float32) - NIBBLE_OFFSET
    scales = weight.scales.to(torch.float32)
    zero_points = None if weight.zero_points is None else weight.zero_points.to(torch.float32)
    if weight.g_idx is None and weight.num_groups > 1 and in_features % weight.group_size == 0:
        # Contiguous groups: broadcast [out, G, 1] over [out, G, gs] instead of gathering [out, in].
        q = q.reshape(out_features, weight.num_groups, weight.group_size)
        if zero_points is not None:
            q = q - zero_points.unsqueeze(-1)
        dense = (q * scales.unsqueeze(-1)).reshape(out_features, in_features)
    else:
        columns = group_index(in_features, weight.group_size, weight.g_idx, device=q.device)
        if zero_points is not None:
            q = q - zero_points[:, columns]
        dense = q * scales[:, columns]
    return dense.to(weight.dtype).to(dtype)
