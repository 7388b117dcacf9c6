"""The LoRA dropout in the fused LoRA nodes, one pass over the ``[T, in]`` tensors each: its backward
(``train.speed.fused_dropout_backward``) and, optionally, its forward with the ``A`` projection
(``fused_dropout_forward``).

With LoRA dropout ``p > 0`` each member ``i`` of a fused node (one for
:class:`~int4lora_train.modeling.lora_layer.Int4LoraFunction`, several sharing the input ``x`` for
:class:`~int4lora_train.speed.projection_groups.Int4LoraGroupFunction`) has its rank ``r_i``, its bool keep mask
``m_i`` ``[T, in]``, its ``A_i`` ``[r_i, in]`` and ``gs_i`` ``[T, r_i]`` (its column slice of ``gs``, the LoRA
output's gradient times the scaling); ``scale = 1 / (1 - p)``::

    grad_x   += sum_i where(m_i, gs_i @ A_i, 0) * scale            (add_dropped_lora_grad_x, in place)
    grad_A_i  = gs_i.T @ where(m_i, x, 0) * scale                  (dropped_lora_grad_a, fp32)
    m_i, xa_i = Philox masks, where(m_i, x, 0) @ A_i.T * scale     (dropped_lora_projection, the forward)

The torch path (:func:`~int4lora_train.modeling.lora_layer.add_dropped_lora_grad_x_torch` /
:func:`~int4lora_train.modeling.lora_layer.dropped_lora_grad_a_torch`, importable without Triton) runs per member
``gs_i @ A_i`` (writes ``[T, in]``), the dropout backward (reads it and the mask, writes ``[T, in]``) and the
``add_`` (reads two, writes one): about 13 bytes per element and member in bf16; and for ``grad_A`` a dropped copy of
``x`` per member (reads ``x`` and the mask, writes a copy the matmul reads again): about 7 bytes per element and
member. Here:

- :func:`add_dropped_lora_grad_x`: one program per ``[BT, BIN]`` tile of ``grad_x`` reads the tile, each member's
  ``gs_i`` rows and ``A_i`` columns (small, from L2) and its mask tile, computes ``gs_i @ A_i`` as a ``tl.dot``
  (the rank padded to at least 16 with zeros), and writes the tile once: ``2 + n + 2`` bytes per element in bf16.
- :func:`dropped_lora_grad_a`: one program per ``BIN`` columns and slice of the tokens reads ``x`` once for all
  members and each member's mask, and accumulates ``gs_i^T @ where(m_i, x, 0)`` in fp32; the token slices' partial
  sums (``[S, R, in]`` fp32) are added up by torch afterwards (deterministic; no atomics), so that even a short
  input makes enough programs for a large GPU.

Both accumulate in fp32 and round once (``grad_x`` on its store; ``grad_A`` is returned in fp32), so they are not
bit-identical to the torch path, which rounds each product, the dropout and the sum to the compute dtype (and
``grad_A`` to it before the cast to the adapter's dtype). With fp32 tensors the products run in IEEE fp32, not
TF32 (in the CPU interpreter, whose ``tl.dot`` misreads bf16, every dtype's products run so: bf16 and fp16
products are exact in fp32, so the sums are the same). Up to :data:`MAX_MEMBERS` members run in one launch
(larger groups in several).

:func:`dropped_lora_projection` replaces, per member, ``native_dropout`` (reads ``x``, writes the dropped copy and
the mask: 5 bytes per element in bf16) and the matmul that reads the copy again (2 more): one program per ``BT``
rows reads ``x`` once for up to three members, draws each member's mask from a Philox4x32-10 stream (one call per
element of ``in``'s first quarter gives the words of all four quarters, as ``curand_uniform4`` does for torch's
dropout), writes the masks and accumulates ``xa`` in fp32: ``2 + n`` bytes per element for n members. The masks
are not torch's (another stream); a checkpoint's recompute redraws them alike, since the seed is drawn from the
device's default generator, which the checkpoint restores.

Kernels are written for the CPU interpreter too (the tests): loop trip counts are compile-time constants (the
token-slice length of :func:`dropped_lora_grad_a` is a power of two of tiles, so only a few variants compile).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from int4lora_train.kernels.backend import built_for_interpreter
from int4lora_train.kernels.launch import DirectLauncher

MAX_MEMBERS = 3
"""Members per launch (q/k/v); larger groups take several launches."""

GRAD_X_BLOCK = (64, 128)
"""``(BT, BIN)``: the ``grad_x`` tile of one program of :func:`add_dropped_lora_grad_x`."""

GRAD_A_BLOCK = (64, 64)
"""``(BT, BIN)``: tokens per step and columns of one program of :func:`dropped_lora_grad_a`."""

TARGET_PROGRAMS = 264
""":func:`dropped_lora_grad_a` splits the tokens until it has at least this many programs (2 per SM of an H100 /
H200), when the input has enough token tiles."""

MAX_SLICE_TILES = 64
"""The most token tiles one program of :func:`dropped_lora_grad_a` walks (a power of two)."""

PROJECT_BLOCK = (16, 64)
"""``(BT, BQ)``: rows of one program of :func:`dropped_lora_projection`, and the columns of each quarter of ``in``
it takes per step (four tiles of ``BT x BQ``, one per quarter, share one Philox call per element)."""

PROJECT_WARPS = 4
"""Warps of one program of :func:`dropped_lora_projection`."""

PROJECT_STAGES = 3
"""Software-pipelining stages of :func:`dropped_lora_projection`'s loop (Triton's default; each stage holds the
step's x tiles and the members' A tiles in shared memory)."""

_NUM_WARPS = 4


# ------------------------------------------------------------------------------------------------ Triton


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` in fp32: in IEEE fp32 for fp32 inputs and in the interpreter (``IEEE``, see :func:`_ieee`), else on
    the tensor cores in the inputs' dtype."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _member_grad_x(
    gs_ptr, a_ptr, m_ptr, rows, cols, tile_ok, gs_stride, n_cols, R: tl.constexpr, RP: tl.constexpr, IEEE: tl.constexpr
):
    """``where(mask, gs @ A, 0)`` of one member on the tile ``rows x cols``, fp32 ``[BT, BIN]``."""
    k = tl.arange(0, RP)
    k_ok = k < R
    gs = tl.load(gs_ptr + rows[:, None] * gs_stride + k[None, :], mask=(rows[:, None] >= 0) & k_ok[None, :], other=0.0)
    a = tl.load(a_ptr + k[:, None] * n_cols + cols[None, :], mask=k_ok[:, None] & (cols[None, :] < n_cols), other=0.0)
    prod = _dot(gs, a, IEEE)
    keep = tl.load(m_ptr + rows[:, None] * n_cols + cols[None, :], mask=tile_ok, other=0)
    return tl.where(keep != 0, prod, 0.0)


@triton.jit
def _grad_x_kernel(
    gx_ptr,
    g0_ptr,
    g1_ptr,
    g2_ptr,
    a0_ptr,
    a1_ptr,
    a2_ptr,
    m0_ptr,
    m1_ptr,
    m2_ptr,
    n_rows,
    n_cols,
    gs_stride,
    scale,
    R0: tl.constexpr,
    R1: tl.constexpr,
    R2: tl.constexpr,
    RP0: tl.constexpr,
    RP1: tl.constexpr,
    RP2: tl.constexpr,
    BT: tl.constexpr,
    BIN: tl.constexpr,
    IEEE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BIN + tl.arange(0, BIN)
    rows = tl.where(rows < n_rows, rows, -1)  # -1: outside (every load of that row is masked)
    tile_ok = (rows[:, None] >= 0) & (cols[None, :] < n_cols)
    acc = _member_grad_x(g0_ptr, a0_ptr, m0_ptr, rows, cols, tile_ok, gs_stride, n_cols, R0, RP0, IEEE)
    if R1 > 0:
        acc += _member_grad_x(g1_ptr, a1_ptr, m1_ptr, rows, cols, tile_ok, gs_stride, n_cols, R1, RP1, IEEE)
    if R2 > 0:
        acc += _member_grad_x(g2_ptr, a2_ptr, m2_ptr, rows, cols, tile_ok, gs_stride, n_cols, R2, RP2, IEEE)
    offs = rows[:, None] * n_cols + cols[None, :]
    gx = tl.load(gx_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
    tl.store(gx_ptr + offs, (gx + acc * scale).to(gx_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _member_grad_a(
    acc, x, gs_ptr, m_ptr, rows, cols, tile_ok, gs_stride, n_cols, R: tl.constexpr, RP: tl.constexpr, IEEE: tl.constexpr
):
    """``acc + gs^T @ where(mask, x, 0)`` over the tile's rows, fp32 ``[RP, BIN]``."""
    k = tl.arange(0, RP)
    gs_t = tl.load(
        gs_ptr + rows[None, :] * gs_stride + k[:, None], mask=(k[:, None] < R) & (rows[None, :] >= 0), other=0.0
    )
    keep = tl.load(m_ptr + rows[:, None] * n_cols + cols[None, :], mask=tile_ok, other=0)
    xd = tl.where(keep != 0, x, 0.0).to(x.dtype)
    return acc + _dot(gs_t, xd, IEEE)


@triton.jit
def _store_grad_a(out_ptr, acc, cols, n_cols, scale, R: tl.constexpr, RP: tl.constexpr):
    k = tl.arange(0, RP)
    tl.store(
        out_ptr + k[:, None] * n_cols + cols[None, :], acc * scale, mask=(k[:, None] < R) & (cols[None, :] < n_cols)
    )


@triton.jit
def _grad_a_kernel(
    x_ptr,
    g0_ptr,
    g1_ptr,
    g2_ptr,
    m0_ptr,
    m1_ptr,
    m2_ptr,
    out_ptr,
    n_rows,
    n_cols,
    gs_stride,
    scale,
    R0: tl.constexpr,
    R1: tl.constexpr,
    R2: tl.constexpr,
    RP0: tl.constexpr,
    RP1: tl.constexpr,
    RP2: tl.constexpr,
    TILES: tl.constexpr,
    BT: tl.constexpr,
    BIN: tl.constexpr,
    IEEE: tl.constexpr,
):
    cols = tl.program_id(0) * BIN + tl.arange(0, BIN)
    part = tl.program_id(1).to(tl.int64)
    first = part * (TILES * BT)
    # tl.full, not tl.zeros: tl.zeros is itself a jit function, which a kernel interpreted after Triton was
    # imported compiled cannot call
    acc0 = tl.full([RP0, BIN], 0.0, tl.float32)
    acc1 = tl.full([RP1, BIN], 0.0, tl.float32)
    acc2 = tl.full([RP2, BIN], 0.0, tl.float32)
    for tile in range(TILES):
        rows = first + tile * BT + tl.arange(0, BT)
        rows = tl.where(rows < n_rows, rows, -1)
        tile_ok = (rows[:, None] >= 0) & (cols[None, :] < n_cols)
        x = tl.load(x_ptr + rows[:, None] * n_cols + cols[None, :], mask=tile_ok, other=0.0)
        acc0 = _member_grad_a(acc0, x, g0_ptr, m0_ptr, rows, cols, tile_ok, gs_stride, n_cols, R0, RP0, IEEE)
        if R1 > 0:
            acc1 = _member_grad_a(acc1, x, g1_ptr, m1_ptr, rows, cols, tile_ok, gs_stride, n_cols, R1, RP1, IEEE)
        if R2 > 0:
            acc2 = _member_grad_a(acc2, x, g2_ptr, m2_ptr, rows, cols, tile_ok, gs_stride, n_cols, R2, RP2, IEEE)
    # out: [S, R0 + R1 + R2, in] fp32, this program's token slice's partial sums
    out_ptr += part * (R0 + R1 + R2) * n_cols
    _store_grad_a(out_ptr, acc0, cols, n_cols, scale, R0, RP0)
    if R1 > 0:
        _store_grad_a(out_ptr + R0 * n_cols, acc1, cols, n_cols, scale, R1, RP1)
    if R2 > 0:
        _store_grad_a(out_ptr + (R0 + R1) * n_cols, acc2, cols, n_cols, scale, R2, RP2)


_PHILOX_ROUND_A: tl.constexpr = tl.constexpr(0xD2511F53)
_PHILOX_ROUND_B: tl.constexpr = tl.constexpr(0xCD9E8D57)
_PHILOX_KEY_A: tl.constexpr = tl.constexpr(0x9E3779B9)
_PHILOX_KEY_B: tl.constexpr = tl.constexpr(0xBB67AE85)


@triton.jit
def _philox(seed, c0, c1, c2, c3):
    """Philox4x32-10 (Salmon et al., SC 2011, the generator behind torch's CUDA dropout) of the uint32 counter
    ``(c0, c1, c2, c3)`` under the 64-bit key ``seed``: four independent uint32 words per counter. Written here, not
    taken from ``tl``: a ``tl`` jit function cannot be called from a kernel interpreted after Triton was imported
    compiled (the tests' CPU interpreter)."""
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    for _ in tl.static_range(10):
        hi_a, lo_a = tl.umulhi(c0, _PHILOX_ROUND_A), c0 * _PHILOX_ROUND_A
        hi_b, lo_b = tl.umulhi(c2, _PHILOX_ROUND_B), c2 * _PHILOX_ROUND_B
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = k0 + _PHILOX_KEY_A
        k1 = k1 + _PHILOX_KEY_B
    return c0, c1, c2, c3


@triton.jit
def _quarter_project(acc, x, keep, a_ptr, m_ptr, rows, cols, col_ok, tile_ok, n_cols, R: tl.constexpr,
                     RP: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """Store ``keep`` (this member's mask) on the tile ``rows x cols``; return ``acc + where(keep, x, 0) @ A.T`` over
    its columns, fp32 ``[BT, RP]``."""
    tl.store(m_ptr + rows[:, None] * n_cols + cols[None, :], keep.to(tl.uint8), mask=tile_ok)
    k = tl.arange(0, RP)
    a_t = tl.load(a_ptr + k[None, :] * n_cols + cols[:, None], mask=(k[None, :] < R) & col_ok[:, None], other=0.0)
    # a product, not tl.where(keep, x, 0): Triton 3.6 fails to lower a boolean select into tl.dot's operand layout
    # on sm_90 (an assertion in ConvertTritonGPUToLLVM); for finite x the two are the same values
    xd = x * keep.to(x.dtype)
    return acc + _dot(xd, a_t, IEEE)


@triton.jit
def _member_project(acc, x0, x1, x2, x3, seed, c_lo, c_hi, member, a_ptr, m_ptr, rows, j, quarter, n_cols, col_ok,
                    tile_ok, threshold, R: tl.constexpr, RP: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """One member's masks and ``where(mask, x, 0) @ A.T`` on the four quarter tiles ``x0..x3`` (columns ``q * quarter
    + j``): one Philox call per counter gives the four quarters' random words."""
    zero = c_lo * 0
    r0, r1, r2, r3 = _philox(seed, c_lo, c_hi, zero + member, zero)
    # keep with probability 1 - threshold / 2^31: the top 31 bits of the word against the threshold
    acc = _quarter_project(acc, x0, (r0 >> 1).to(tl.int32) >= threshold, a_ptr, m_ptr, rows, j, col_ok, tile_ok,
                           n_cols, R, RP, IEEE)  # fmt: skip
    acc = _quarter_project(acc, x1, (r1 >> 1).to(tl.int32) >= threshold, a_ptr, m_ptr, rows, quarter + j, col_ok,
                           tile_ok, n_cols, R, RP, IEEE)  # fmt: skip
    acc = _quarter_project(acc, x2, (r2 >> 1).to(tl.int32) >= threshold, a_ptr, m_ptr, rows, 2 * quarter + j, col_ok,
                           tile_ok, n_cols, R, RP, IEEE)  # fmt: skip
    acc = _quarter_project(acc, x3, (r3 >> 1).to(tl.int32) >= threshold, a_ptr, m_ptr, rows, 3 * quarter + j, col_ok,
                           tile_ok, n_cols, R, RP, IEEE)  # fmt: skip
    return acc


@triton.jit
def _store_projection(xa_ptr, acc, rows, row_ok, xa_stride, scale, R: tl.constexpr, RP: tl.constexpr):
    k = tl.arange(0, RP)
    tl.store(xa_ptr + rows[:, None] * xa_stride + k[None, :], (acc * scale).to(xa_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (k[None, :] < R))  # fmt: skip


@triton.jit
def _project_kernel(
    x_ptr,
    seed_ptr,
    a0_ptr,
    a1_ptr,
    a2_ptr,
    m0_ptr,
    m1_ptr,
    m2_ptr,
    xa_ptr,
    n_rows,
    n_cols,
    quarter,
    xa_stride,
    first_member,
    threshold,
    scale,
    R0: tl.constexpr,
    R1: tl.constexpr,
    R2: tl.constexpr,
    RP0: tl.constexpr,
    RP1: tl.constexpr,
    RP2: tl.constexpr,
    STEPS: tl.constexpr,
    BT: tl.constexpr,
    BQ: tl.constexpr,
    IEEE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    row_ok = rows < n_rows
    seed = tl.load(seed_ptr)
    acc0 = tl.full([BT, RP0], 0.0, tl.float32)
    acc1 = tl.full([BT, RP1], 0.0, tl.float32)
    acc2 = tl.full([BT, RP2], 0.0, tl.float32)
    for step in range(STEPS):  # a compile-time trip count: cdiv(quarter, BQ) (the interpreter needs one)
        j = step * BQ + tl.arange(0, BQ)
        col_ok = j < quarter
        tile_ok = row_ok[:, None] & col_ok[None, :]
        counter = rows[:, None] * quarter + j[None, :]  # one Philox counter per row and column of a quarter
        c_lo = (counter & 0xFFFFFFFF).to(tl.uint32)
        c_hi = (counter >> 32).to(tl.uint32)
        base = x_ptr + rows[:, None] * n_cols + j[None, :]
        x0 = tl.load(base, mask=tile_ok, other=0.0)
        x1 = tl.load(base + quarter, mask=tile_ok, other=0.0)
        x2 = tl.load(base + 2 * quarter, mask=tile_ok, other=0.0)
        x3 = tl.load(base + 3 * quarter, mask=tile_ok, other=0.0)
        acc0 = _member_project(acc0, x0, x1, x2, x3, seed, c_lo, c_hi, first_member, a0_ptr, m0_ptr, rows, j, quarter,
                               n_cols, col_ok, tile_ok, threshold, R0, RP0, IEEE)  # fmt: skip
        if R1 > 0:
            acc1 = _member_project(acc1, x0, x1, x2, x3, seed, c_lo, c_hi, first_member + 1, a1_ptr, m1_ptr, rows, j,
                                   quarter, n_cols, col_ok, tile_ok, threshold, R1, RP1, IEEE)  # fmt: skip
        if R2 > 0:
            acc2 = _member_project(acc2, x0, x1, x2, x3, seed, c_lo, c_hi, first_member + 2, a2_ptr, m2_ptr, rows, j,
                                   quarter, n_cols, col_ok, tile_ok, threshold, R2, RP2, IEEE)  # fmt: skip
    _store_projection(xa_ptr, acc0, rows, row_ok, xa_stride, scale, R0, RP0)
    if R1 > 0:
        _store_projection(xa_ptr + R0, acc1, rows, row_ok, xa_stride, scale, R1, RP1)
    if R2 > 0:
        _store_projection(xa_ptr + R0 + R1, acc2, rows, row_ok, xa_stride, scale, R2, RP2)


_launch_grad_x = DirectLauncher(_grad_x_kernel)
_launch_grad_a = DirectLauncher(_grad_a_kernel)
_launch_project = DirectLauncher(_project_kernel)


# ------------------------------------------------------------------------------------------------ host side


def _padded_rank(rank: int) -> int:
    """The rank as ``tl.dot``'s inner dimension: a power of two, at least 16 (the padding reads zeros)."""
    return max(16, triton.next_power_of_2(rank))


def _chunks(ranks: Sequence[int]) -> list[tuple[int, list[int], tuple[int, ...]]]:
    """``(first member, each member's first column of gs / row of a_cat, ranks)`` of each launch's members, at most
    :data:`MAX_MEMBERS` each."""
    chunks, col = [], 0
    for start in range(0, len(ranks), MAX_MEMBERS):
        part = tuple(int(r) for r in ranks[start : start + MAX_MEMBERS])
        chunks.append((start, [col + sum(part[:j]) for j in range(len(part))], part))
        col += sum(part)
    return chunks


def _ieee(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` runs in IEEE fp32: for fp32 tensors (no TF32), and in the interpreter, whose ``tl.dot``
    misreads bf16 (bf16 and fp16 products are exact in fp32, so the sums are the same)."""
    return dtype == torch.float32 or INTERPRETED


def _member_args(tensors: list, rank_list: tuple[int, ...]) -> tuple[list, dict]:
    """Three pointers (unused members repeat the first) and the rank constexprs of one launch."""
    padded = tensors + [tensors[0]] * (MAX_MEMBERS - len(tensors))
    ranks = rank_list + (0,) * (MAX_MEMBERS - len(rank_list))
    constexprs = {f"R{i}": r for i, r in enumerate(ranks)}
    constexprs.update({f"RP{i}": _padded_rank(r) if r else 16 for i, r in enumerate(ranks)})
    return padded, constexprs


def _check(gs: torch.Tensor, masks: Sequence[torch.Tensor], ranks: Sequence[int], rows: int, cols: int) -> None:
    if len(masks) != len(ranks) or not ranks:
        raise ValueError(f"one mask per member: {len(masks)} masks for ranks {list(ranks)}")
    if gs.shape != (rows, sum(ranks)):
        raise ValueError(f"gs is {tuple(gs.shape)}, expected {(rows, sum(ranks))}")
    for mask in masks:
        if mask.shape != (rows, cols) or mask.dtype != torch.bool:
            raise ValueError(f"masks must be bool [{rows}, {cols}], got {mask.dtype} {tuple(mask.shape)}")


def add_dropped_lora_grad_x(
    grad_x: torch.Tensor,
    gs: torch.Tensor,
    a_cat: torch.Tensor,
    masks: Sequence[torch.Tensor],
    ranks: Sequence[int],
    scale: float,
) -> torch.Tensor:
    """``grad_x += sum_i where(masks[i], gs_i @ a_i, 0) * scale`` in place, and returned.

    ``grad_x`` ``[T, in]`` contiguous (bf16, fp16 or fp32); ``gs`` ``[T, R]`` and ``a_cat`` ``[R, in]`` in its dtype
    (``R = sum(ranks)``; member ``i`` owns columns / rows ``sum(ranks[:i]) : sum(ranks[:i + 1])``); ``masks``: one
    bool ``[T, in]`` keep mask per member. fp32 accumulation, one rounding per element on the store.
    """
    rows, cols = grad_x.shape
    _check(gs, masks, ranks, rows, cols)
    if not grad_x.is_contiguous():
        raise ValueError("grad_x is updated in place and must be contiguous")
    if a_cat.shape != (sum(ranks), cols) or gs.dtype != grad_x.dtype or a_cat.dtype != grad_x.dtype:
        raise ValueError(
            f"a_cat {a_cat.dtype} {tuple(a_cat.shape)} / gs {gs.dtype}: "
            f"expected [{sum(ranks)}, {cols}] in {grad_x.dtype}"
        )
    if grad_x.numel() == 0:
        return grad_x
    gs = gs if gs.stride(1) == 1 else gs.contiguous()
    a_cat = a_cat.contiguous()
    bt, bin_ = GRAD_X_BLOCK
    grid = (triton.cdiv(rows, bt), triton.cdiv(cols, bin_))
    for start, offsets, part in _chunks(ranks):
        gs_parts, consts = _member_args([gs[:, o:] for o in offsets], part)
        a_parts, _ = _member_args([a_cat[o:] for o in offsets], part)
        m_parts, _ = _member_args([m.contiguous() for m in masks[start : start + len(part)]], part)
        _launch_grad_x(
            grid,
            grad_x,
            *gs_parts,
            *a_parts,
            *m_parts,
            rows,
            cols,
            gs.stride(0),
            float(scale),
            **consts,
            BT=bt,
            BIN=bin_,
            IEEE=_ieee(grad_x.dtype),
            num_warps=_NUM_WARPS,
        )
    return grad_x


def token_slices(rows: int, cols: int) -> tuple[int, int]:
    """``(tiles per slice, slices)`` of :func:`dropped_lora_grad_a` for a ``[rows, cols]`` input: slices of a power
    of two of token tiles, as long as there are at least :data:`TARGET_PROGRAMS` programs (or one tile each)."""
    bt, bin_ = GRAD_A_BLOCK
    tiles = triton.cdiv(rows, bt)
    min_slices = triton.cdiv(TARGET_PROGRAMS, triton.cdiv(cols, bin_))
    per_slice = 1
    while per_slice * 2 <= MAX_SLICE_TILES and triton.cdiv(tiles, per_slice * 2) >= min_slices:
        per_slice *= 2
    return per_slice, triton.cdiv(tiles, per_slice)


def dropped_lora_grad_a(
    x2: torch.Tensor,
    gs: torch.Tensor,
    masks: Sequence[torch.Tensor],
    ranks: Sequence[int],
    scale: float,
) -> list[torch.Tensor]:
    """``[gs_i.T @ where(masks[i], x2, 0) * scale for each member]``: fp32 ``[r_i, in]`` each, ``x2`` ``[T, in]``
    read once per launch for all members (``gs`` ``[T, R]`` in ``x2``'s dtype, ``masks`` bool ``[T, in]``)."""
    rows, cols = x2.shape
    _check(gs, masks, ranks, rows, cols)
    if gs.dtype != x2.dtype:
        raise ValueError(f"gs is {gs.dtype}, x2 {x2.dtype}")
    if rows == 0 or cols == 0:
        return [torch.zeros(r, cols, dtype=torch.float32, device=x2.device) for r in ranks]
    x2 = x2.contiguous()
    gs = gs if gs.stride(1) == 1 else gs.contiguous()
    bt, bin_ = GRAD_A_BLOCK
    per_slice, slices = token_slices(rows, cols)
    grid = (triton.cdiv(cols, bin_), slices)
    grads = []
    for start, offsets, part in _chunks(ranks):
        gs_parts, consts = _member_args([gs[:, o:] for o in offsets], part)
        m_parts, _ = _member_args([m.contiguous() for m in masks[start : start + len(part)]], part)
        partial = torch.empty(slices, sum(part), cols, dtype=torch.float32, device=x2.device)
        _launch_grad_a(
            grid,
            x2,
            *gs_parts,
            *m_parts,
            partial,
            rows,
            cols,
            gs.stride(0),
            float(scale),
            **consts,
            TILES=per_slice,
            BT=bt,
            BIN=bin_,
            IEEE=_ieee(x2.dtype),
            num_warps=_NUM_WARPS,
        )
        total = partial[0] if slices == 1 else partial.sum(0)
        grads.extend(total.split(list(part)))
    return grads


INTERPRETED = built_for_interpreter(_grad_x_kernel)
"""The kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` when this module was imported)."""


def dropout_threshold(p: float) -> int:
    """:func:`dropped_lora_projection` keeps an element when the top 31 bits of its random word are at least this:
    with probability ``1 - threshold / 2**31`` (``1 - p`` to within ``2**-32``)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return round(p * 2**31)


def dropped_lora_projection(
    x2: torch.Tensor, a_cat: torch.Tensor, ranks: Sequence[int], p: float
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(xa, masks)`` of the LoRA dropout and ``A`` projection of each member, ``x2`` ``[T, in]`` read once:

    ``masks[i]``: member ``i``'s bool keep mask ``[T, in]`` (each element kept with probability ``1 - p``), and
    ``xa[:, cols_i] = where(masks[i], x2, 0) @ A_i.T / (1 - p)``, ``[T, R]`` in ``x2``'s dtype, fp32 accumulation
    (``a_cat`` ``[R, in]`` in ``x2``'s dtype holds the members' ``A`` by rows).

    The masks come from a Philox stream (counter: row and column of ``in``'s first quarter; the four words of one
    call serve the four quarters; member index as the third counter word) keyed by a seed drawn from the default
    generator of ``x2``'s device. So a checkpoint's recompute, which restores that generator, draws the same masks,
    as it does for ``torch.native_dropout``; they are not ``native_dropout``'s masks. ``in`` must be a multiple of 4.
    """
    rows, cols = x2.shape
    if cols % 4:
        raise ValueError(f"dropped_lora_projection needs in_features divisible by 4, got {cols}")
    if a_cat.shape != (sum(ranks), cols) or a_cat.dtype != x2.dtype:
        raise ValueError(f"a_cat is {a_cat.dtype} {tuple(a_cat.shape)}, expected {x2.dtype} {(sum(ranks), cols)}")
    threshold, scale = dropout_threshold(p), 1.0 / (1.0 - p)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x2.device)
    masks = [torch.empty(rows, cols, dtype=torch.bool, device=x2.device) for _ in ranks]
    xa = torch.empty(rows, sum(ranks), dtype=x2.dtype, device=x2.device)
    if rows == 0 or cols == 0:
        return xa.zero_(), [m.fill_(True) for m in masks]
    x2, a_cat = x2.contiguous(), a_cat.contiguous()
    bt, bq = PROJECT_BLOCK
    for start, offsets, part in _chunks(ranks):
        a_parts, consts = _member_args([a_cat[o:] for o in offsets], part)
        m_parts, _ = _member_args([m.view(torch.uint8) for m in masks[start : start + len(part)]], part)
        _launch_project(
            (triton.cdiv(rows, bt),),
            x2,
            seed,
            *a_parts,
            *m_parts,
            xa[:, offsets[0] :],
            rows,
            cols,
            cols // 4,
            xa.stride(0),
            start,
            threshold,
            float(scale),
            **consts,
            STEPS=triton.cdiv(cols // 4, bq),
            BT=bt,
            BQ=bq,
            IEEE=_ieee(x2.dtype),
            num_warps=PROJECT_WARPS,
            num_stages=PROJECT_STAGES,
        )
    return xa, masks
