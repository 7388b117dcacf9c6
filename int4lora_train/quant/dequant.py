"""Dequantization of a canonical :class:`Int4Weight` into a dense ``[out, in]`` tensor.

``dequantize`` picks the fused Triton kernel on CUDA (one pass: read the packed bytes, the scales and zero points,
write the output) and the torch reference everywhere else. Both compute ``(q - zp) * scale`` in fp32, which is exact
for fp16 / bf16 scales, and round once to the scale's dtype before casting to ``dtype``; that is bit-identical to
compressed-tensors' dequantization in the scale's dtype followed by ``.to(dtype)``.
"""

from __future__ import annotations

import logging
import os

import torch

from int4lora_train.quant.layout import NIBBLE_OFFSET, Int4Weight, group_index, unpack_nibbles

logger = logging.getLogger(__name__)

_BACKENDS = ("auto", "torch", "triton")


def dequantize(weight: Int4Weight, dtype: torch.dtype | None = None, backend: str | None = None) -> torch.Tensor:
    """Dense ``[out, in]`` weight in ``dtype`` (default: the scale's dtype).

    ``backend``: ``"auto"`` (Triton on CUDA when importable, else torch), ``"torch"`` or ``"triton"``. The
    environment variable ``INT4LORA_DEQUANT_BACKEND`` sets the default.
    """
    backend = backend or os.environ.get("INT4LORA_DEQUANT_BACKEND", "auto")
    if backend not in _BACKENDS:
        raise ValueError(f"unknown dequantization backend {backend!r}; choose one of {_BACKENDS}")
    if backend == "triton" or (backend == "auto" and weight.device.type == "cuda" and triton_available()):
        from int4lora_train.quant.triton_dequant import dequantize_triton

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


_TRITON_OK: bool | None = None


def triton_available() -> bool:
    """True when Triton imports (on CUDA, or anywhere under ``TRITON_INTERPRET=1``)."""
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401

            _TRITON_OK = True
        except Exception as exc:  # pragma: no cover - depends on the install
            logger.info("Triton is not available (%s); using the torch dequantization path", exc)
            _TRITON_OK = False
    return _TRITON_OK
