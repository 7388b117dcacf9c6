"""Row-wise cross-entropy and its gradient over a chunk of logits, in one Triton kernel that overwrites the logits
with their gradient.

For each row ``i`` of ``logits`` ``[C, V]`` (bf16 / fp16 / fp32) with target ``t_i`` (``ignore_index`` = skip)::

    z       = logits[i] in fp32                 (Gemma-2: z = cap * tanh(z / cap))
    lse     = log(sum(exp(z)))                  online over blocks of columns (pass 1)
    loss[i] = lse - z[t_i]                      fp32, 0 for an ignored row
    logits[i] <- scale_i * (softmax(z) - onehot(t_i)) * dz/dlogits       pass 2, rounded once to the logits' dtype

``scale_i`` is ``scale`` (a 0-d fp32 tensor, read on the device: no host sync) for valid rows and 0 for ignored
ones. Memory traffic is two reads and one write of the logits; the torch version (:func:`cross_entropy_rows_torch`
in :mod:`int4lora_train.speed.chunked_loss`) makes fp32 copies. The arithmetic is the same as
``F.cross_entropy(logits.float(), ...)`` and its gradient, up to the order of the fp32 sums.

The vocabulary size is a compile-time constant (one compiled kernel per vocabulary; Triton's CPU interpreter, used
by the tests, cannot run loops with run-time bounds).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from int4lora_train.errors import UnsupportedFormatError
from int4lora_train.kernels.backend import built_for_interpreter
from int4lora_train.kernels.launch import DirectLauncher

_MAX_BLOCK = 4096


@triton.jit
def _tanh(x):
    # exp-based and stable for any |x| (no libdevice dependency, so the CPU interpreter runs it too)
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


# Reductions through tl.reduce with this module's own combine functions rather than tl.max / tl.sum: those are
# jit functions of triton.language, built compiled when triton was imported before TRITON_INTERPRET was set (as in a
# test session), and then cannot be called from an interpreted kernel.
@triton.jit
def _max_of(a, b):
    return tl.maximum(a, b)


@triton.jit
def _sum_of(a, b):
    return a + b


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr,
    row_stride,
    targets_ptr,
    scale_ptr,
    loss_ptr,
    softcap,
    N_COLS: tl.constexpr,
    IGNORE_INDEX: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK)

    # Pass 1: running max and sum of exp over blocks of columns (a scalar max per block keeps -inf out of the sums:
    # every block holds at least one real column).
    m = float("-inf")
    s = 0.0
    for start in range(0, N_COLS, BLOCK):
        idx = start + cols
        ok = idx < N_COLS
        z = tl.load(base + idx, mask=ok, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        z = tl.where(ok, z, float("-inf"))
        m_new = tl.maximum(m, tl.reduce(z, 0, _max_of))
        s = s * tl.exp(m - m_new) + tl.reduce(tl.exp(z - m_new), 0, _sum_of)
        m = m_new
    lse = m + tl.log(s)

    target = tl.load(targets_ptr + row).to(tl.int64)
    valid = target != IGNORE_INDEX
    safe_target = tl.where(valid, target, 0)
    z_t = tl.load(base + safe_target).to(tl.float32)
    if HAS_SOFTCAP:
        z_t = softcap * _tanh(z_t / softcap)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_t, 0.0))

    if COMPUTE_GRAD:
        scale = tl.where(valid, tl.load(scale_ptr).to(tl.float32), 0.0)
        for start in range(0, N_COLS, BLOCK):
            idx = start + cols
            ok = idx < N_COLS
            raw = tl.load(base + idx, mask=ok, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(raw / softcap)
                z = softcap * t
            else:
                z = raw
            p = tl.exp(z - lse)
            p = tl.where(idx == safe_target, p - 1.0, p) * scale
            if HAS_SOFTCAP:
                p = p * (1.0 - t * t)
            tl.store(base + idx, p.to(logits_ptr.dtype.element_ty), mask=ok)


_launch_rows = DirectLauncher(_cross_entropy_rows_kernel)


def cross_entropy_rows_triton(
    logits: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor,
    softcap: float | None = None,
    ignore_index: int = -100,
    compute_grad: bool = True,
    block: int | None = None,
) -> torch.Tensor:
    """Per-row loss ``[C]`` (fp32) of ``logits`` ``[C, V]`` against ``targets`` ``[C]``; with ``compute_grad`` the
    logits are overwritten by ``scale * d(sum of valid row losses)/d(logits)`` (see the module docstring).

    ``scale`` is a 0-d fp32 tensor on the logits' device. ``block`` overrides the column block (tests).
    """
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise UnsupportedFormatError(
            f"cross_entropy_rows_triton needs 2-D logits [C, V] with unit column stride, got shape "
            f"{tuple(logits.shape)} and strides {logits.stride()}"
        )
    rows, vocab = logits.shape
    if targets.shape != (rows,):
        raise UnsupportedFormatError(f"targets must have shape [{rows}], got {tuple(targets.shape)}")
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss
    block = block or min(_MAX_BLOCK, triton.next_power_of_2(vocab))
    _launch_rows(
        (rows,),
        logits,
        logits.stride(0),
        targets,
        scale.reshape(1),
        loss,
        float(softcap) if softcap else 0.0,
        N_COLS=vocab,
        IGNORE_INDEX=ignore_index,
        HAS_SOFTCAP=bool(softcap),
        COMPUTE_GRAD=compute_grad,
        BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )
    return loss


INTERPRETED = built_for_interpreter(_cross_entropy_rows_kernel)
"""The kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1`` when this module was imported)."""
