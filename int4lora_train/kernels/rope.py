"""Rotary position embedding (RoPE) for q and k in one Triton kernel each way, bit-identical to transformers'
``apply_rotary_pos_emb`` and to autograd's gradient of it.

transformers computes ``q * cos + rotate_half(q) * sin`` (``rotate_half(x) = cat(-x2, x1)``, halves of the head
dimension ``D``; ``h = D / 2``) as separate elementwise kernels, each rounding to the tensors' dtype; the same for k,
and again in a checkpoint recompute, plus about as many in backward. Per element, with ``round`` = to the dtype::

    forward   out[i <  h] = round(x[i]*cos[i])   + round(-x[i+h]*sin[i])
              out[i >= h] = round(x[i]*cos[i])   + round( x[i-h]*sin[i])
    backward  dx[i <  h]  = round(g[i]*cos[i])   + round( g[i+h]*sin[i+h])     (then + 0.0)
              dx[i >= h]  = round(g[i]*cos[i])   - round( g[i-h]*sin[i-h])     (then + 0.0)

each sum rounded too. The backward is what autograd builds: the multiply's gradient ``round(g * cos)``, the
rotation's gradient ``round(g * sin)`` moved back half a head (negated where the forward negated), and the three
uses of x (``x * cos`` and the two slices) summed into one gradient. The slices' gradients are zero-filled to full
width, and adding a zero turns a ``-0`` into ``+0``: the ``+ 0.0`` reproduces that, so even the sign of a zero
gradient matches. The kernels compute in fp32 and round after each operation; fp32 products and sums of bf16 / fp16
values are exact or rounded exactly as torch's own fp32 ``opmath`` is, so the rounding to the dtype is the same
single rounding. Triton may contract ``a * b + c`` into one FMA, which torch's separate kernels never do: the
launches pass ``enable_fp_fusion=False`` (it matters for fp32; for bf16 / fp16 the rounding between the multiply and
the add already prevents it).

Layouts accepted: q and k ``[B, H, T, D]`` (k may have fewer heads: GQA) with any strides whose last one is 1,
such as the ``[B, T, H, D]`` projection output transposed, or a column slice of a q/k/v projection group's output;
cos and sin ``[B, T, D]`` or ``[1, T, D]`` (broadcast over the batch), last stride 1. Outputs (and gradients) are
new ``[B, H, T, D]`` tensors laid out as contiguous ``[B, T, H, D]`` (``.transpose(1, 2)`` of it): the layout
transformers' own elementwise ops produce from the transposed projection, which SDPA takes as it is, the flash
kernels (``[B, T, H, D]``) and the varlen path (``[tokens, H, D]``) by a view without a copy, and whose gradient
flows back into the projection's ``[B, T, H * D]`` by a view. One program per token reads that token's cos / sin
once and rotates all q heads and all k heads.

The torch references :func:`rope_fwd_torch` / :func:`rope_bwd_torch` state the same arithmetic with torch ops (the
tests check them and the kernels against transformers' function and autograd, bit for bit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from int4lora_train.kernels.backend import built_for_interpreter
from int4lora_train.kernels.launch import DirectLauncher

_NUM_WARPS = 4


# ------------------------------------------------------------------------------------------------ torch references


def rope_fwd_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for ``x`` ``[B, H, T, D]`` and ``cos`` / ``sin`` ``[B, T, D]``, the
    operations transformers runs, in its order (each rounds to the dtype)."""
    half = x.shape[-1] // 2
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x[..., :half], x[..., half:]
    first = x1 * cos[..., :half] + (-x2) * sin[..., :half]
    second = x2 * cos[..., half:] + x1 * sin[..., half:]
    return torch.cat((first, second), dim=-1)


def rope_bwd_torch(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`rope_fwd_torch` for its input, as autograd computes it (see the module docstring)."""
    half = grad.shape[-1] // 2
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    g1, g2 = grad[..., :half], grad[..., half:]
    first = g1 * cos[..., :half] + g2 * sin[..., half:]
    second = g2 * cos[..., half:] - g1 * sin[..., :half]
    return torch.cat((first, second), dim=-1) + 0.0


# ------------------------------------------------------------------------------------------------ Triton


@triton.jit
def _rounded(x, DTYPE: tl.constexpr, INTEGER_ROUNDING: tl.constexpr):
    """``x`` (fp32) rounded to the nearest ``DTYPE`` value (ties to even) and back: the result of one torch
    operation on ``DTYPE`` tensors. The GPU's casts round so; Triton's CPU interpreter truncates fp32 -> bf16, so
    there bf16 is rounded with integer arithmetic (torch's own formula, finite values), as in :mod:`.dequant`."""
    if DTYPE == tl.bfloat16 and INTEGER_ROUNDING:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def _rotate_heads(
    x_ptr,
    out_ptr,
    x_token,
    x_stride_h,
    out_token,
    cos1,
    cos2,
    sin1,
    sin2,
    HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BACKWARD: tl.constexpr,
    INTEGER_ROUNDING: tl.constexpr,
):
    """One token's ``HEADS`` heads of ``x`` (at ``x_token``, heads ``x_stride_h`` apart) rotated into ``out`` (at
    ``out_token``, heads contiguous); the forward rotation, or with ``BACKWARD`` its gradient."""
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    ok = (heads < HEADS) & (cols < HALF)
    src = x_ptr + x_token + heads * x_stride_h + cols
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    if BACKWARD:
        out1 = _rounded(x1 * cos1, dt, INTEGER_ROUNDING) + _rounded(x2 * sin2, dt, INTEGER_ROUNDING)
        out2 = _rounded(x2 * cos2, dt, INTEGER_ROUNDING) - _rounded(x1 * sin1, dt, INTEGER_ROUNDING)
    else:
        out1 = _rounded(x1 * cos1, dt, INTEGER_ROUNDING) + _rounded(-x2 * sin1, dt, INTEGER_ROUNDING)
        out2 = _rounded(x2 * cos2, dt, INTEGER_ROUNDING) + _rounded(x1 * sin2, dt, INTEGER_ROUNDING)
    out1 = _rounded(out1, dt, INTEGER_ROUNDING)
    out2 = _rounded(out2, dt, INTEGER_ROUNDING)
    if BACKWARD:  # autograd adds the slices' zero-filled gradients, which makes a -0 a +0
        out1 += 0.0
        out2 += 0.0
    dst = out_ptr + out_token + heads * (2 * HALF) + cols
    tl.store(dst, out1.to(dt), mask=ok)  # exact: already a value of the dtype
    tl.store(dst + HALF, out2.to(dt), mask=ok)


@triton.jit
def _rope_kernel(
    a_ptr,
    b_ptr,
    cos_ptr,
    sin_ptr,
    a_out_ptr,
    b_out_ptr,
    seq_len,
    a_stride_b,
    a_stride_h,
    a_stride_t,
    b_stride_b,
    b_stride_h,
    b_stride_t,
    cs_stride_b,
    cs_stride_t,
    A_HEADS: tl.constexpr,
    B_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BACKWARD: tl.constexpr,
    INTEGER_ROUNDING: tl.constexpr,  # round to bf16 in integers (Triton's CPU interpreter truncates casts)
):
    """Program ``batch * seq_len + position``: that token's heads of ``a`` (q or its gradient) and, unless
    ``B_HEADS`` is 0, of ``b`` (k or its gradient)."""
    token = tl.program_id(0).to(tl.int64)
    batch = token // seq_len
    position = token % seq_len
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    ok = cols < HALF
    cs = batch * cs_stride_b + position * cs_stride_t + cols
    cos1 = tl.load(cos_ptr + cs, mask=ok, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + cs + HALF, mask=ok, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + cs, mask=ok, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + cs + HALF, mask=ok, other=0.0).to(tl.float32)
    _rotate_heads(
        a_ptr,
        a_out_ptr,
        batch * a_stride_b + position * a_stride_t,
        a_stride_h,
        token * (A_HEADS * 2 * HALF),
        cos1,
        cos2,
        sin1,
        sin2,
        A_HEADS,
        HALF,
        BLOCK_A,
        BLOCK_HALF,
        BACKWARD,
        INTEGER_ROUNDING,
    )
    if B_HEADS > 0:
        _rotate_heads(
            b_ptr,
            b_out_ptr,
            batch * b_stride_b + position * b_stride_t,
            b_stride_h,
            token * (B_HEADS * 2 * HALF),
            cos1,
            cos2,
            sin1,
            sin2,
            B_HEADS,
            HALF,
            BLOCK_B,
            BLOCK_HALF,
            BACKWARD,
            INTEGER_ROUNDING,
        )


_launch_rope = DirectLauncher(_rope_kernel)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _rotated_like(x: torch.Tensor) -> torch.Tensor:
    """A new ``[B, H, T, D]`` tensor like ``x``, stored as contiguous ``[B, T, H, D]``."""
    batch, heads, seq_len, dim = x.shape
    return torch.empty(batch, seq_len, heads, dim, dtype=x.dtype, device=x.device).transpose(1, 2)


def _rotate(
    a: torch.Tensor, b: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, backward: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    a = _unit_last_stride(a)
    b = None if b is None else _unit_last_stride(b)
    batch, a_heads, seq_len, dim = a.shape
    cos = _unit_last_stride(cos.expand(batch, seq_len, dim))
    sin = _unit_last_stride(sin.expand(batch, seq_len, dim))
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    a_out = _rotated_like(a)
    b_out = None if b is None else _rotated_like(b)
    if a.numel():
        b_args = (b, b.stride(0), b.stride(1), b.stride(2)) if b is not None else (a, 0, 0, 0)
        b_heads = 0 if b is None else b.shape[1]
        half = dim // 2
        _launch_rope(
            (batch * seq_len,),
            a,
            b_args[0],
            cos,
            sin,
            a_out,
            a_out if b_out is None else b_out,
            seq_len,
            a.stride(0),
            a.stride(1),
            a.stride(2),
            *b_args[1:],
            cos.stride(0),
            cos.stride(1),
            A_HEADS=a_heads,
            B_HEADS=b_heads,
            HALF=half,
            BLOCK_A=triton.next_power_of_2(a_heads),
            BLOCK_B=triton.next_power_of_2(max(b_heads, 1)),
            BLOCK_HALF=triton.next_power_of_2(half),
            BACKWARD=backward,
            INTEGER_ROUNDING=INTERPRETED,
            num_warps=_NUM_WARPS,
            enable_fp_fusion=False,
        )
    return a_out, b_out


def rope_fwd(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rotary_pos_emb(q, k, cos, sin)`` in one launch, for the layouts of the module docstring (q, k, cos,
    sin of one dtype, ``D`` even, q and k of the same ``B``, ``T``, ``D``; the caller checks)."""
    q_out, k_out = _rotate(q, k, cos, sin, backward=False)
    return q_out, k_out


def rope_bwd(
    grad_q: torch.Tensor | None, grad_k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients for q and k from those of :func:`rope_fwd`'s outputs, in one launch; None in, None out (an
    input that needs no gradient)."""
    if grad_q is None:
        if grad_k is None:
            return None, None
        return None, _rotate(grad_k, None, cos, sin, backward=True)[0]
    return _rotate(grad_q, grad_k, cos, sin, backward=True)


INTERPRETED = built_for_interpreter(_rope_kernel)
"""The kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1`` when this module was imported)."""
