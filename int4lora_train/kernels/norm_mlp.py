"""Triton kernels for the decoder's memory-bound pieces: Llama-style RMSNorm and the SwiGLU product, forward and
backward, each one pass over its tensors. The arithmetic (fp32 inside, the same roundings to the tensors' dtype as
transformers' modules) and the torch references live in :mod:`int4lora_train.speed.fused_ops`.

Row widths are compile-time constants (one compiled kernel per hidden size; Triton's CPU interpreter, used by the
tests, cannot run loops with run-time bounds). Reductions use ``tl.reduce`` with this module's own combine
function (see :mod:`int4lora_train.kernels.cross_entropy` for why).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from int4lora_train.kernels.backend import built_for_interpreter
from int4lora_train.kernels.launch import DirectLauncher

_ELEMENTWISE_BLOCK = 1024


@triton.jit
def _sum_of(a, b):
    return a + b


@triton.jit
def _norm_row(x_ptr, w_ptr, N_COLS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's row of ``x`` ``[R, N_COLS]`` and the weight ``[N_COLS]`` in fp32 (0 in the masked tail), with
    the row index, the column offsets and their mask."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N_COLS
    x = tl.load(x_ptr + row * N_COLS + cols, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    return row, cols, ok, x, w


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, eps, N_COLS: tl.constexpr, BLOCK: tl.constexpr):
    row, cols, ok, x, w = _norm_row(x_ptr, w_ptr, N_COLS, BLOCK)
    rstd = 1.0 / tl.sqrt(tl.reduce(x * x, 0, _sum_of) / N_COLS + eps)
    normed = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)  # transformers rounds before the weight
    tl.store(y_ptr + row * N_COLS + cols, (w * normed).to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(g_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, N_COLS: tl.constexpr, BLOCK: tl.constexpr):
    row, cols, ok, x, w = _norm_row(x_ptr, w_ptr, N_COLS, BLOCK)
    g = tl.load(g_ptr + row * N_COLS + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row)
    gn = (g * w).to(dx_ptr.dtype.element_ty).to(tl.float32)  # the gradient of the rounded normed value
    dot = tl.reduce(gn * x, 0, _sum_of)
    dx = rstd * gn - (rstd * rstd * rstd / N_COLS) * dot * x
    tl.store(dx_ptr + row * N_COLS + cols, dx.to(dx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _silu_f32(g):
    return g / (1.0 + tl.exp(-g))


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, g_stride, u_stride, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    g = tl.load(g_ptr + row * g_stride + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_stride + cols, mask=ok, other=0.0).to(tl.float32)
    s = _silu_f32(g).to(h_ptr.dtype.element_ty).to(tl.float32)  # act_fn's output, rounded, then the product
    tl.store(h_ptr + row * n_cols + cols, (s * u).to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, g_stride, u_stride, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    dense = row * n_cols + cols
    dh = tl.load(dh_ptr + dense, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * g_stride + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_stride + cols, mask=ok, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    s = (g * sig).to(du_ptr.dtype.element_ty).to(tl.float32)
    tl.store(du_ptr + dense, (dh * s).to(du_ptr.dtype.element_ty), mask=ok)
    ds = (dh * u).to(dg_ptr.dtype.element_ty).to(tl.float32)
    tl.store(dg_ptr + dense, (ds * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=ok)


_launch_rms_fwd = DirectLauncher(_rms_norm_fwd_kernel)
_launch_rms_bwd = DirectLauncher(_rms_norm_bwd_kernel)
_launch_swiglu_fwd = DirectLauncher(_swiglu_fwd_kernel)
_launch_swiglu_bwd = DirectLauncher(_swiglu_bwd_kernel)


def _row_launch(width: int) -> tuple[int, int]:
    block = triton.next_power_of_2(width)
    return block, min(16, max(1, block // 256))


def rms_norm_fwd(x2: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, rstd)`` for contiguous ``x2`` ``[R, H]``: ``y`` ``[R, H]`` in ``x2``'s dtype, ``rstd`` ``[R]`` fp32."""
    rows, width = x2.shape
    y = torch.empty_like(x2)
    rstd = torch.empty(rows, dtype=torch.float32, device=x2.device)
    if rows:
        block, warps = _row_launch(width)
        _launch_rms_fwd((rows,), x2, weight, y, rstd, float(eps), N_COLS=width, BLOCK=block, num_warps=warps)
    return y, rstd


def rms_norm_bwd(g2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """``dx`` ``[R, H]`` for contiguous ``g2`` and ``x2`` ``[R, H]``."""
    rows, width = x2.shape
    dx = torch.empty_like(x2)
    if rows:
        block, warps = _row_launch(width)
        _launch_rms_bwd((rows,), g2, x2, weight, rstd, dx, N_COLS=width, BLOCK=block, num_warps=warps)
    return dx


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``[R, C]`` tensors of one dtype with unit column stride (rows may be strided, e.g.
    column slices of one projection-group output); the result is contiguous."""
    rows, cols = gate.shape
    h = torch.empty(rows, cols, dtype=gate.dtype, device=gate.device)
    if h.numel():
        grid = (rows, triton.cdiv(cols, _ELEMENTWISE_BLOCK))
        _launch_swiglu_fwd(grid, gate, up, h, gate.stride(0), up.stride(0), cols, BLOCK=_ELEMENTWISE_BLOCK)
    return h


def swiglu_bwd(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d gate, d up)``, contiguous, for contiguous ``dh`` ``[R, C]`` and ``gate`` / ``up`` as in
    :func:`swiglu_fwd`."""
    rows, cols = gate.shape
    dg = torch.empty(rows, cols, dtype=gate.dtype, device=gate.device)
    du = torch.empty_like(dg)
    if dg.numel():
        grid = (rows, triton.cdiv(cols, _ELEMENTWISE_BLOCK))
        _launch_swiglu_bwd(grid, dh, gate, up, dg, du, gate.stride(0), up.stride(0), cols, BLOCK=_ELEMENTWISE_BLOCK)
    return dg, du


INTERPRETED = built_for_interpreter(_swiglu_fwd_kernel)
"""The kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` when this module was imported)."""
