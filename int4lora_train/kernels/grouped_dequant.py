"""Grouped INT4 dequantization for MoE experts: the weights of the experts ``ids`` of one projection, read straight
from the stacked buffers (:class:`~int4lora_train.quant.experts.Int4ExpertStack`), into one ``[n, out, in]`` buffer
in one Triton launch.

The grid is ``(row tiles, column tiles, n)``: program ``(i, j, x)`` reads ``ids[x]`` and dequantizes tile ``(i, j)``
of that expert with the per-tile code of :mod:`int4lora_train.kernels.dequant` (the same ``_load_values`` nibble
reader and ``_apply_scale`` rounding rule), so the result is bit-identical to the torch reference
(:func:`int4lora_train.quant.experts.dequantize_experts_torch`) and to dequantizing every expert alone. No gather of
the packed bytes, no per-expert launch. Activation order (``g_idx``) does not occur in expert stacks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from int4lora_train.errors import Int4FormatError, UnsupportedFormatError
from int4lora_train.kernels.backend import built_for_interpreter
from int4lora_train.kernels.dequant import (
    _group_layout,
    _load_values,
    _scaled_tile,
    _word_aligned,
    config_for,
)
from int4lora_train.quant.experts import Int4ExpertStack
from int4lora_train.quant.layout import FLOAT_DTYPES


@triton.jit
def _grouped_dequant_kernel(
    packed_ptr,  # uint8 [E, out, P]
    scales_ptr,  # float [E, out, G]
    zero_points_ptr,  # int8 [E, out, G], or a dummy when HAS_ZERO_POINTS is False
    ids_ptr,  # int64 [n]: the experts to dequantize, in output order
    out_ptr,  # float [n, out, in], unit column stride
    out_features,
    in_features,
    packed_units,
    packed_expert_stride,  # in bytes (or words with WORD_LOADS), like the row stride
    packed_row_stride,
    scale_expert_stride,
    scale_row_stride,
    scale_group_stride,
    zero_point_expert_stride,
    zero_point_row_stride,
    zero_point_group_stride,
    out_expert_stride,
    out_row_stride,
    GROUP_SIZE: tl.constexpr,
    GROUP_LAYOUT: tl.constexpr,
    HAS_ZERO_POINTS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WORD_LOADS: tl.constexpr,
    INTEGER_ROUNDING: tl.constexpr,
):
    pid_k = tl.program_id(1)
    slot = tl.program_id(2).to(tl.int64)
    expert = tl.load(ids_ptr + slot).to(tl.int64)
    first_row = tl.program_id(0).to(tl.int64) * BLOCK_N
    out_ptr += slot * out_expert_stride + first_row * out_row_stride
    scales_ptr += expert * scale_expert_stride + first_row * scale_row_stride
    zero_points_ptr += expert * zero_point_expert_stride + first_row * zero_point_row_stride
    rows = tl.arange(0, BLOCK_N)
    row_ok = rows < out_features - first_row
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < in_features
    out_dtype: tl.constexpr = out_ptr.dtype.element_ty

    if WORD_LOADS:
        row_base = packed_ptr + (expert * packed_expert_stride + first_row * packed_row_stride) * 4
    else:
        row_base = packed_ptr + expert * packed_expert_stride + first_row * packed_row_stride
    q = _load_values(row_base, rows, row_ok, pid_k, packed_row_stride, packed_units, BLOCK_N, BLOCK_K, WORD_LOADS)

    values = _scaled_tile(
        q, rows, row_ok, cols, col_ok, pid_k, in_features, scales_ptr, zero_points_ptr, scales_ptr,
        scale_row_stride, scale_group_stride, zero_point_row_stride, zero_point_group_stride, out_dtype,
        GROUP_SIZE, GROUP_LAYOUT, HAS_ZERO_POINTS, BLOCK_N, BLOCK_K, INTEGER_ROUNDING,
    )  # fmt: skip

    tl.store(out_ptr + rows[:, None] * out_row_stride + cols[None, :], values, mask=row_ok[:, None] & col_ok[None, :])


INTERPRETED = built_for_interpreter(_grouped_dequant_kernel)


def dequantize_experts_triton(
    stack: Int4ExpertStack, ids: torch.Tensor, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense ``[n, out, in]`` weights of experts ``ids`` in ``dtype`` (default: the scales'), in one launch;
    bit-identical to :func:`int4lora_train.quant.experts.dequantize_experts_torch`. ``out`` (``[n, out, in]``, unit
    column stride) receives the result when given. CUDA, or the CPU with ``TRITON_INTERPRET=1``."""
    packed, scales, zero_points = stack.packed, stack.scales, stack.zero_points
    if packed.device.type != "cuda" and not INTERPRETED:
        raise UnsupportedFormatError(
            f"dequantize_experts_triton runs on CUDA tensors, but the experts are on {packed.device}; use "
            "dequantize_experts(backend='torch'), or set TRITON_INTERPRET=1 before importing this module."
        )
    if packed.dtype != torch.uint8 or packed.dim() != 3 or scales.dim() != 3:
        raise Int4FormatError(
            f"expert stack: packed must be uint8 [E, out, P] and scales [E, out, G], got {packed.dtype} "
            f"{tuple(packed.shape)} and {tuple(scales.shape)}."
        )
    if packed.stride(2) != 1:
        packed = packed.contiguous()
    ids = ids.to(device=packed.device, dtype=torch.int64).contiguous()
    n, out_features, in_features = ids.numel(), stack.out_features, stack.in_features
    shape = (n, out_features, in_features)
    if out is None:
        dtype = dtype or stack.dtype
        if dtype not in FLOAT_DTYPES:
            raise UnsupportedFormatError(f"dequantize to float16, bfloat16 or float32, not {dtype}")
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    elif tuple(out.shape) != shape or (dtype is not None and out.dtype != dtype) or out.stride(2) != 1:
        raise Int4FormatError(
            f"out must be [{n}, {out_features}, {in_features}] with unit column stride and dtype "
            f"{dtype or out.dtype}, got {out.dtype} {tuple(out.shape)} strides {out.stride()}."
        )
    if n == 0 or out_features == 0:
        return out
    # One expert's view decides the tile and group layout (every expert of a stack shares them).
    expert0 = stack.expert(0)
    config = config_for(stack.rows(None) if n > 1 else expert0)
    group_size, group_layout = _group_layout(expert0, config.block_k)
    word_loads = config.word_loads and _word_aligned(packed[0], in_features) and packed.stride(0) % 4 == 0
    divisor = 4 if word_loads else 1
    packed_units = -(-in_features // 8) if word_loads else -(-in_features // 2)
    zp_strides = zero_points.stride() if zero_points is not None else (0, 0, 0)
    grid = (triton.cdiv(out_features, config.block_n), triton.cdiv(in_features, config.block_k), n)
    _grouped_dequant_kernel[grid](
        packed,
        scales,
        zero_points if zero_points is not None else scales,
        ids,
        out,
        out_features,
        in_features,
        packed_units,
        packed.stride(0) // divisor,
        packed.stride(1) // divisor,
        *scales.stride(),
        *zp_strides,
        out.stride(0),
        out.stride(1),
        GROUP_SIZE=group_size,
        GROUP_LAYOUT=group_layout,
        HAS_ZERO_POINTS=zero_points is not None,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        WORD_LOADS=word_loads,
        INTEGER_ROUNDING=INTERPRETED,
        num_warps=config.num_warps,
    )
    return out


__all__ = ["INTERPRETED", "dequantize_experts_triton"]
