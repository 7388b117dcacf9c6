"""LoRA dropout fused into the LoRA A projection: a counter-based mask, made in registers and made again in
backward, so that neither the mask nor the dropped input is ever written to memory.

For the members ``i`` of a projection (one layer, or a q/k/v or gate/up group reading the same ``x``), each with
its rank ``r_i``, its rows ``A_i`` of ``a_cat`` ``[R, K]`` and its own seed::

    forward    xa[:, cols_i] = (x * keep_i) @ A_i.T * scale                       [T, R]      scale = 1 / (1 - p)
    backward   grad_x       += sum_i ((gs[:, cols_i] @ A_i) * keep_i) * scale      [T, K]      in place, one rounding
               grad_A_i      = gs[:, cols_i].T @ (x * keep_i) * scale              [r_i, K]    fp32

``keep_i`` is member i's mask as :mod:`int4lora_train.modeling.lora_dropout` defines it (Philox4x32, four words
per draw, one word per row of a quad of rows; its torch form, ``dropout_keep_mask``, and the torch references of
both functions live there); the kernels compute the same bits tile by tile. The forward reads ``x`` once for every
member (each program holds an ``x`` tile and runs the members' masks and products over it); the backward reads
``x``, ``gs`` and ``grad_x`` once and writes ``grad_x`` once, producing both gradients from one mask per member and
tile. Products are ``tl.dot`` with fp32 accumulation (IEEE fp32 for fp32 inputs, so that the CPU interpreter's
tests can be tight).

Parallelism: the forward splits K across programs when there are few row blocks (fp32 partial sums added by
torch); the backward splits T (``grad_A`` partial sums ``[S, R, K]`` fp32, added by torch), so the sums are
deterministic (no atomics). The loop trip counts are compile-time constants (Triton's CPU interpreter cannot run
loops with run-time bounds): K is one (one compiled kernel per input width), the row blocks per backward program
another, picked from powers of two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from int4lora_train.errors import UnsupportedFormatError
from int4lora_train.kernels.backend import built_for_interpreter
from int4lora_train.kernels.launch import DirectLauncher
from int4lora_train.modeling import lora_dropout

MAX_MEMBERS = 3
"""Members per launch (q/k/v, the largest projection group); the kernels take each member's seed and column range
as scalars."""
_ROUND_A = tl.constexpr(lora_dropout.PHILOX_ROUND_A)
_ROUND_B = tl.constexpr(lora_dropout.PHILOX_ROUND_B)
_KEY_A = tl.constexpr(lora_dropout.PHILOX_KEY_A)
_KEY_B = tl.constexpr(lora_dropout.PHILOX_KEY_B)
# Tiles of 64 x 32 with 8 warps compile for sm_90 to 124 (forward) and 140 (backward) registers a thread and no
# spills; 64 x 64 tiles spill at 4 warps and take 240 registers at 8 (ptxas -v, Triton 3.6; not yet timed on a GPU:
# benchmarks/lora_dropout.py --sweep compares). The masks do not depend on the tiles (BLOCK_T: a multiple of 4).
BLOCK_T = 64
BLOCK_K = 32
NUM_WARPS = 8
_TARGET_PROGRAMS = 4  # per streaming multiprocessor: enough resident programs to hide the loads' latency


@triton.jit
def _philox(c0, c1, k0, k1, ROUNDS: tl.constexpr):
    """Philox4x32 of the counter ``(c0, c1, 0, 0)`` (uint32 tensors) under the key ``(k0, k1)`` (uint32 scalars):
    four uint32 words per element."""
    # tl.full, not tl.zeros: tl.zeros is a jit function of triton.language, compiled when triton was imported
    # before TRITON_INTERPRET was set (a test session), and then not callable from an interpreted kernel
    c2 = tl.full(c0.shape, 0, tl.uint32)
    c3 = c2
    for _ in tl.static_range(ROUNDS):
        prev0, prev2 = c0, c2
        c0 = tl.umulhi(prev2, _ROUND_B) ^ c1 ^ k0
        c2 = tl.umulhi(prev0, _ROUND_A) ^ c3 ^ k1
        c1 = prev2 * _ROUND_B
        c3 = prev0 * _ROUND_A
        k0 = k0 + _KEY_A
        k1 = k1 + _KEY_B
    return c0, c1, c2, c3


@triton.jit
def _keep_tile(seed, threshold, quads, cols, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, ROUNDS: tl.constexpr):
    """The keep mask ``[BT, BK]`` of the rows ``4 * quads + j`` (``quads`` ``[BT // 4]``, consecutive) and the
    columns ``cols`` ``[BK]``: word j of the draw at counter ``quad * K + col``, kept when ``>= threshold``."""
    counter = quads.to(tl.int64)[:, None] * K + cols[None, :]
    key = tl.cast(seed, tl.int64)
    w0, w1, w2, w3 = _philox(
        (counter & 0xFFFFFFFF).to(tl.uint32),
        (counter >> 32).to(tl.uint32),
        (key & 0xFFFFFFFF).to(tl.uint32),
        (key >> 32).to(tl.uint32),
        ROUNDS,
    )
    t = tl.cast(threshold, tl.uint32, bitcast=True)
    # [quad, col, j0, j1] with j = j0 + 2 * j1, reordered to row 4 * quad + j
    keep = tl.join(tl.join(w0 >= t, w1 >= t), tl.join(w2 >= t, w3 >= t))
    return tl.reshape(tl.permute(keep, (0, 3, 2, 1)), (BT, BK))


@triton.jit
def _member(i, seed0, seed1, seed2, end0, end1, end2):
    """Member ``i``'s seed and first and last-plus-one row of ``a_cat``."""
    seed = tl.where(i == 0, seed0, tl.where(i == 1, seed1, seed2))
    lo = tl.where(i == 0, 0, tl.where(i == 1, end0, end1))
    hi = tl.where(i == 0, end0, tl.where(i == 1, end1, end2))
    return seed, lo, hi


# Per-call scalars are not specialized (Triton would compile a variant for a seed of 1 or a multiple of 16).
_VARYING = ["T", "seed0", "seed1", "seed2", "end0", "end1", "end2", "threshold"]


@triton.jit(do_not_specialize=_VARYING)
def _fwd_kernel(
    x_ptr,
    a_ptr,
    out_ptr,
    T,
    seed0,
    seed1,
    seed2,
    end0,
    end1,
    end2,
    threshold,
    scale,
    K: tl.constexpr,
    R: tl.constexpr,
    MEMBERS: tl.constexpr,
    RP: tl.constexpr,
    K_PER: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    ROUNDS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``out[split] [T, R]`` for the rows of program 0's block and the columns of program 1's split of K."""
    pid_t = tl.program_id(0)
    k_start = tl.program_id(1) * K_PER
    rows = pid_t * BT + tl.arange(0, BT)
    quads = pid_t * (BT // 4) + tl.arange(0, BT // 4)
    ranks = tl.arange(0, RP)
    row_ok = rows < T
    acc = tl.full((BT, RP), 0.0, tl.float32)
    for kk in range(0, K_PER, BK):
        cols = k_start + kk + tl.arange(0, BK)
        col_ok = cols < K
        # zeros outside the tensors: the products sum over the columns (and, backward, the rows)
        x_tile = rows.to(tl.int64)[:, None] * K + cols[None, :]
        x = tl.load(x_ptr + x_tile, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        a = tl.load(a_ptr + ranks[:, None] * K + cols[None, :], mask=(ranks[:, None] < R) & col_ok[None, :], other=0.0)
        for i in range(MEMBERS):  # a loop, not unrolled: one member's draws live at a time
            seed, lo, hi = _member(i, seed0, seed1, seed2, end0, end1, end2)
            keep = _keep_tile(seed, threshold, quads, cols, K, BT, BK, ROUNDS)
            a_i = tl.where(((ranks >= lo) & (ranks < hi))[:, None], a, 0.0)
            acc = tl.dot(tl.where(keep, x, 0.0), tl.trans(a_i), acc, input_precision=PRECISION)
    out = out_ptr + tl.program_id(1).to(tl.int64) * T * R + rows.to(tl.int64)[:, None] * R + ranks[None, :]
    tl.store(out, (acc * scale).to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (ranks[None, :] < R))


@triton.jit(do_not_specialize=_VARYING)
def _bwd_kernel(
    x_ptr,
    gs_ptr,
    a_ptr,
    gx_ptr,
    ga_ptr,
    T,
    seed0,
    seed1,
    seed2,
    end0,
    end1,
    end2,
    threshold,
    scale,
    K: tl.constexpr,
    R: tl.constexpr,
    MEMBERS: tl.constexpr,
    RP: tl.constexpr,
    T_BLOCKS: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    ROUNDS: tl.constexpr,
    PRECISION: tl.constexpr,
    GRAD_X: tl.constexpr,
    GRAD_A: tl.constexpr,
):
    """For program 0's columns and program 1's ``T_BLOCKS`` row blocks: the ``grad_x`` update in place and the
    ``grad_A`` partial sum ``ga[split] [R, K]``."""
    cols = tl.program_id(0) * BK + tl.arange(0, BK)
    col_ok = cols < K
    ranks = tl.arange(0, RP)
    rank_ok = ranks < R
    a = tl.load(a_ptr + ranks[:, None] * K + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
    ga = tl.full((RP, BK), 0.0, tl.float32)
    for b in range(T_BLOCKS):
        block = tl.program_id(1) * T_BLOCKS + b
        rows = block * BT + tl.arange(0, BT)
        quads = block * (BT // 4) + tl.arange(0, BT // 4)
        row_ok = rows < T
        tile = rows.to(tl.int64)[:, None] * K + cols[None, :]
        tile_ok = row_ok[:, None] & col_ok[None, :]
        gs_tile = rows.to(tl.int64)[:, None] * R + ranks[None, :]
        gs = tl.load(gs_ptr + gs_tile, mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        if GRAD_A:
            x = tl.load(x_ptr + tile, mask=tile_ok, other=0.0)
        gx = tl.full((BT, BK), 0.0, tl.float32)
        for i in range(MEMBERS):  # a loop, not unrolled: one member's draws live at a time
            seed, lo, hi = _member(i, seed0, seed1, seed2, end0, end1, end2)
            keep = _keep_tile(seed, threshold, quads, cols, K, BT, BK, ROUNDS)
            gs_i = tl.where(((ranks >= lo) & (ranks < hi))[None, :], gs, 0.0)
            if GRAD_X:
                gx += tl.where(keep, tl.dot(gs_i, a, input_precision=PRECISION), 0.0)
            if GRAD_A:
                ga = tl.dot(tl.trans(gs_i), tl.where(keep, x, 0.0), ga, input_precision=PRECISION)
        if GRAD_X:
            old = tl.load(gx_ptr + tile, mask=tile_ok).to(tl.float32)
            tl.store(gx_ptr + tile, (old + gx * scale).to(gx_ptr.dtype.element_ty), mask=tile_ok)
    if GRAD_A:
        out = ga_ptr + tl.program_id(1).to(tl.int64) * R * K + ranks[:, None] * K + cols[None, :]
        tl.store(out, ga * scale, mask=rank_ok[:, None] & col_ok[None, :])


_launch_fwd = DirectLauncher(_fwd_kernel)
_launch_bwd = DirectLauncher(_bwd_kernel)


def _scalars(ranks: tuple[int, ...], seeds: tuple[int, ...], p: float) -> list:
    """The kernels' member scalars: three seeds, three row ends (unused ones repeat the last), the threshold as a
    signed 32-bit value (its bits are the uint32 threshold) and the scale."""
    if not 1 <= len(ranks) <= MAX_MEMBERS or len(seeds) != len(ranks):
        raise ValueError(f"1 to {MAX_MEMBERS} members with one seed each, got ranks {ranks} and seeds {seeds}")
    if not 0 < p < 1:
        raise ValueError(f"fused dropout needs 0 < p < 1, got {p}")
    ends, total = [], 0
    for r in ranks:
        total += r
        ends.append(total)
    pad = MAX_MEMBERS - len(ranks)
    threshold = lora_dropout.keep_threshold(p)
    if threshold >= 2**31:
        threshold -= 2**32
    return [*seeds, *[0] * pad, *ends, *[total] * pad, threshold, 1.0 / (1.0 - p)]


def _options(dtype: torch.dtype, total_rank: int) -> dict:
    if INTERPRETED and dtype == torch.bfloat16:
        # Triton 3.6's interpreter keeps bf16 as uint16 and multiplies those bit patterns in tl.dot
        raise UnsupportedFormatError("the fused-dropout kernels cannot run bf16 in Triton's CPU interpreter")
    return {
        "RP": max(16, triton.next_power_of_2(total_rank)),
        "BT": BLOCK_T,
        "BK": BLOCK_K,
        "ROUNDS": lora_dropout.PHILOX_ROUNDS,
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "num_warps": NUM_WARPS,
    }


def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return _TARGET_PROGRAMS * torch.cuda.get_device_properties(device).multi_processor_count


def dropout_lora_a(
    x2: torch.Tensor,
    a_cat: torch.Tensor,
    ranks: tuple[int, ...],
    seeds: tuple[int, ...],
    p: float,
    k_splits: int | None = None,
) -> torch.Tensor:
    """``xa`` ``[T, R]`` in ``x2``'s dtype: member i's columns ``(x2 * keep_i / (1 - p)) @ A_i.T`` (module
    docstring), for ``x2`` ``[T, K]`` and ``a_cat`` ``[R, K]`` of one dtype, ``ranks`` the members' row counts in
    ``a_cat``. ``k_splits`` (a power of two) overrides how many programs share a row block's K (tests)."""
    x2, a_cat = x2.contiguous(), a_cat.contiguous()
    rows, width = x2.shape
    total = a_cat.shape[0]
    scalars = _scalars(ranks, seeds, p)
    out = torch.empty(rows, total, dtype=x2.dtype, device=x2.device)
    if rows == 0:
        return out
    row_blocks, k_blocks = triton.cdiv(rows, BLOCK_T), triton.cdiv(width, BLOCK_K)
    if k_splits is None:
        k_splits = min(triton.next_power_of_2(triton.cdiv(_target_programs(x2.device), row_blocks)), k_blocks)
    k_per = triton.cdiv(k_blocks, k_splits) * BLOCK_K
    k_splits = triton.cdiv(width, k_per)
    target = out if k_splits == 1 else torch.empty(k_splits, rows, total, dtype=torch.float32, device=x2.device)
    _launch_fwd(
        (row_blocks, k_splits),
        x2,
        a_cat,
        target,
        rows,
        *scalars,
        K=width,
        R=total,
        MEMBERS=len(ranks),
        K_PER=k_per,
        **_options(x2.dtype, total),
    )
    if k_splits > 1:
        out.copy_(target.sum(0))
    return out


def dropout_lora_a_backward(
    x2: torch.Tensor,
    gs: torch.Tensor,
    a_cat: torch.Tensor,
    ranks: tuple[int, ...],
    seeds: tuple[int, ...],
    p: float,
    grad_x: torch.Tensor | None,
    grad_a: bool,
    t_blocks: int | None = None,
) -> torch.Tensor | None:
    """The backward of :func:`dropout_lora_a` for ``gs`` ``[T, R]``, the gradient of its output: adds the input
    gradient into ``grad_x`` ``[T, K]`` (contiguous, in place; None: not needed) and returns ``grad_A`` ``[R, K]``
    in fp32 when ``grad_a`` (else None). ``t_blocks`` (a power of two) overrides the row blocks per program (tests).
    """
    x2, gs, a_cat = x2.contiguous(), gs.contiguous(), a_cat.contiguous()
    rows, width = x2.shape
    total = a_cat.shape[0]
    scalars = _scalars(ranks, seeds, p)
    if grad_x is not None and not grad_x.is_contiguous():
        raise ValueError("grad_x must be contiguous: it is updated in place")
    if rows == 0 or (grad_x is None and not grad_a):
        return torch.zeros(total, width, dtype=torch.float32, device=x2.device) if grad_a else None
    row_blocks, k_blocks = triton.cdiv(rows, BLOCK_T), triton.cdiv(width, BLOCK_K)
    if t_blocks is None:
        t_blocks = triton.next_power_of_2(triton.cdiv(row_blocks * k_blocks, _target_programs(x2.device)))
    t_blocks = min(t_blocks, triton.next_power_of_2(row_blocks))
    splits = triton.cdiv(row_blocks, t_blocks)
    partial = torch.empty(splits, total, width, dtype=torch.float32, device=x2.device) if grad_a else None
    _launch_bwd(
        (k_blocks, splits),
        x2,
        gs,
        a_cat,
        x2 if grad_x is None else grad_x,  # neither is touched without GRAD_X / GRAD_A
        x2 if partial is None else partial,
        rows,
        *scalars,
        K=width,
        R=total,
        MEMBERS=len(ranks),
        T_BLOCKS=t_blocks,
        GRAD_X=grad_x is not None,
        GRAD_A=grad_a,
        **_options(x2.dtype, total),
    )
    if not grad_a:
        return None
    return partial[0] if splits == 1 else partial.sum(0)


INTERPRETED = built_for_interpreter(_fwd_kernel)
"""The kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` when this module was imported)."""
