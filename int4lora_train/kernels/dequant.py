"""Fused INT4 dequantization in one Triton pass: packed bytes + scales (+ zero points, + g_idx) -> dense ``[out, in]``.

Each program owns a ``[BLOCK_N, BLOCK_K]`` tile of the output. It reads the tile's ``BLOCK_K / 2`` packed bytes per
row once (as int32 words where the rows are word-padded, as compressed-tensors' are; else as bytes), splits them into
nibbles in column order, applies each column's group scale (and zero point) and writes the tile with 16-byte stores.
Only the output is written to device memory: per row the kernel reads ``in / 2`` bytes plus the scales and writes
``in * itemsize`` bytes; for a bf16 output that is 5/8 of the traffic of a device-to-device copy of the output.

The arithmetic is the toolkit's bit-exact rule (the torch reference, :mod:`int4lora_train.quant.dequant`):
``(q - zp) * scale`` in fp32, rounded once (to nearest, ties to even) to the scale's dtype, then cast to the output
dtype.

How a tile meets the groups is chosen on the host, so the common case loads one scale per row and group:

* the tile lies in one group (per-channel / per-tensor scales, or ``group_size % BLOCK_K == 0``): one scale per row;
* whole groups inside the tile (``BLOCK_K % group_size == 0``): the tile is viewed as ``[rows, groups, group_size]``;
* ``g_idx`` (activation order) or groups that straddle tiles: one gathered scale per column.
"""

from __future__ import annotations

import functools
import logging
import sys
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from int4lora_train.errors import Int4FormatError, UnsupportedFormatError
from int4lora_train.kernels.backend import built_for_interpreter
from int4lora_train.kernels.launch import KernelLaunch
from int4lora_train.quant.layout import FLOAT_DTYPES, NIBBLE_OFFSET, Int4Weight

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile shape and warps of one launch: a ``[block_n, block_k]`` output tile per program."""

    block_n: int
    block_k: int
    num_warps: int
    word_loads: bool = True  # read int32 words where the rows allow it (else bytes)
    # PTX hint on the output's stores: "" (none), a cache modifier (".cs" streaming, ".cg", ".wt") or an eviction
    # policy ("evict_first", "evict_last"); benchmarks/dequant.py --sweep times them.
    store_hint: str = ""


# Two tile sizes, from the sweep in benchmarks/dequant.py on an H100 (BENCHMARKS.md): a weight whose 16K-output
# tiles all fit in one wave of resident programs (8 of 256 threads per multiprocessor, which needs <= 32 registers
# per thread) ran fastest that way, with no partial last wave; larger weights ran fastest with 8K-output tiles of
# long rows (2048 columns = 4 KB of bf16 per row).
_SMALL_TILE_OUTPUTS, _SMALL_TILE_MAX_K = 16384, 1024
_LARGE_TILE_OUTPUTS, _LARGE_TILE_MAX_K = 8192, 2048
_NUM_WARPS, _PROGRAMS_PER_MULTIPROCESSOR = 8, 8


def config_for(weight: Int4Weight) -> LaunchConfig:
    """The launch configuration :func:`dequantize_triton` uses for ``weight`` (see the tile sizes above)."""
    out_features, in_features = weight.shape
    one_wave = _SMALL_TILE_OUTPUTS * _PROGRAMS_PER_MULTIPROCESSOR * _multiprocessors(weight.device)
    small = out_features * in_features <= one_wave
    tile_outputs, max_block_k = (
        (_SMALL_TILE_OUTPUTS, _SMALL_TILE_MAX_K) if small else (_LARGE_TILE_OUTPUTS, _LARGE_TILE_MAX_K)
    )
    # Narrow layers get shorter, taller tiles rather than masked-off columns.
    block_k = min(max_block_k, max(8, triton.next_power_of_2(in_features)))
    return LaunchConfig(block_n=max(1, tile_outputs // block_k), block_k=block_k, num_warps=_NUM_WARPS)


_STORE_HINTS = ("", ".cs", ".cg", ".wt", "evict_first", "evict_last")

_NIBBLE_OFFSET = tl.constexpr(NIBBLE_OFFSET)
# How a tile's columns map to groups (chosen on the host, see _group_layout).
_TILE_IN_ONE_GROUP = tl.constexpr(0)
_GROUPS_IN_TILE = tl.constexpr(1)
_GROUP_PER_COLUMN = tl.constexpr(2)
_GROUP_FROM_G_IDX = tl.constexpr(3)


@triton.jit
def _round_to(value, dtype: tl.constexpr, INTEGER_ROUNDING: tl.constexpr):
    """fp32 ``value`` rounded to the nearest ``dtype`` value (ties to even), returned as the exact fp32 of it.

    The GPU's fp32 -> bf16 cast rounds to nearest even; Triton's CPU interpreter truncates, so there bf16 is rounded
    with integer arithmetic instead (torch's own formula, for finite values). The GPU keeps the cast: with integer
    rounding the 4096 x 4096 weight took 17.7 instead of 15.9 us (its 16 x 1024 tiles compile to 32 registers per
    thread with the cast, the most that lets 8 programs of 256 threads share a multiprocessor).
    """
    if dtype == tl.bfloat16:
        if INTEGER_ROUNDING:
            bits = value.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        else:
            return value.to(tl.bfloat16).to(tl.float32)
    elif dtype == tl.float16:
        return value.to(tl.float16).to(tl.float32)
    else:
        return value


@triton.jit
def _apply_scale(
    q, zero_point, scale, HAS_ZERO_POINTS: tl.constexpr, out_dtype: tl.constexpr, INTEGER_ROUNDING: tl.constexpr
):
    """``(q - zp) * scale`` in fp32, rounded once to the scale's dtype, then to ``out_dtype``."""
    if HAS_ZERO_POINTS:
        q = q - zero_point.to(tl.int32)
    value = _round_to(q.to(tl.float32) * scale.to(tl.float32), scale.dtype, INTEGER_ROUNDING)
    # Casting a scale-dtype value into out_dtype rounds again; after that the final .to() is exact.
    return _round_to(value, out_dtype, INTEGER_ROUNDING).to(out_dtype)


@triton.jit
def _load_values(
    packed_ptr,
    rows,
    row_ok,
    pid_k,
    packed_row_stride,
    packed_units,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WORD_LOADS: tl.constexpr,
):
    """The tile's signed values ``q`` (int32 ``[BLOCK_N, BLOCK_K]``) from its ``BLOCK_K / 2`` packed bytes per row.

    The nibble order is :func:`int4lora_train.quant.layout.unpack_nibbles`': column 2b in the low nibble of byte b.
    """
    if WORD_LOADS:
        # Little-endian int32 words: column 8w + i sits in bits 4i .. 4i + 3 of word w.
        WORDS: tl.constexpr = BLOCK_K // 8
        word_cols = pid_k * WORDS + tl.arange(0, WORDS)
        words = tl.load(
            packed_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * packed_row_stride + word_cols[None, :],
            mask=row_ok[:, None] & (word_cols < packed_units)[None, :],
            other=0,
        )
        nibbles = (words[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 0xF
    else:
        HALF_K: tl.constexpr = BLOCK_K // 2
        byte_cols = pid_k * HALF_K + tl.arange(0, HALF_K)
        packed = tl.load(
            packed_ptr + rows[:, None] * packed_row_stride + byte_cols[None, :],
            mask=row_ok[:, None] & (byte_cols < packed_units)[None, :],
            other=0,
        )
        nibbles = tl.join(packed & 0xF, packed >> 4).to(tl.int32)
    return tl.reshape(nibbles, (BLOCK_N, BLOCK_K)) - _NIBBLE_OFFSET


@triton.jit
def _load_per_group(ptr, rows, groups, row_stride, group_stride, mask, other):
    """``ptr[rows, groups]`` of a ``[out, G]`` tensor with arbitrary strides (``rows`` / ``groups`` broadcast)."""
    return tl.load(ptr + rows * row_stride + groups * group_stride, mask=mask, other=other)


@triton.jit
def _scaled_tile(
    q,  # int [BLOCK_N, BLOCK_K]: the tile's signed values
    rows,
    row_ok,
    cols,
    col_ok,
    pid_k,
    in_features,
    scales_ptr,  # at the tile's first row
    zero_points_ptr,  # at the tile's first row (a dummy without zero points)
    g_idx_ptr,  # a dummy unless GROUP_LAYOUT is _GROUP_FROM_G_IDX
    scale_row_stride,
    scale_group_stride,
    zero_point_row_stride,
    zero_point_group_stride,
    out_dtype: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    GROUP_LAYOUT: tl.constexpr,
    HAS_ZERO_POINTS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INTEGER_ROUNDING: tl.constexpr,
):
    """``(q - zero_point) * scale`` of one tile in ``out_dtype``, the scales (and zero points) loaded the way the tile
    meets the groups (``GROUP_LAYOUT``); shared by every dequantization kernel (dense and grouped experts)."""
    zero_point = 0
    if GROUP_LAYOUT == _TILE_IN_ONE_GROUP:
        # One scale (and zero point) per row for the whole tile.
        if GROUP_SIZE == 0:
            group = 0
        else:
            group = (pid_k * BLOCK_K) // GROUP_SIZE
        scale = _load_per_group(scales_ptr, rows, group, scale_row_stride, scale_group_stride, row_ok, 1.0)[:, None]
        if HAS_ZERO_POINTS:
            zero_point = _load_per_group(
                zero_points_ptr, rows, group, zero_point_row_stride, zero_point_group_stride, row_ok, 0
            )[:, None]
        values = _apply_scale(q, zero_point, scale, HAS_ZERO_POINTS, out_dtype, INTEGER_ROUNDING)
    elif GROUP_LAYOUT == _GROUPS_IN_TILE:
        # Whole groups inside the tile: view it as [rows, groups, group_size] and broadcast a scale per group.
        GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE
        groups = pid_k * GROUPS + tl.arange(0, GROUPS)
        mask = row_ok[:, None] & (groups * GROUP_SIZE < in_features)[None, :]
        scale = _load_per_group(
            scales_ptr, rows[:, None], groups[None, :], scale_row_stride, scale_group_stride, mask, 1.0
        )[:, :, None]
        if HAS_ZERO_POINTS:
            zero_point = _load_per_group(
                zero_points_ptr, rows[:, None], groups[None, :], zero_point_row_stride, zero_point_group_stride, mask, 0
            )[:, :, None]
        q = tl.reshape(q, (BLOCK_N, GROUPS, GROUP_SIZE))
        values = _apply_scale(q, zero_point, scale, HAS_ZERO_POINTS, out_dtype, INTEGER_ROUNDING)
        values = tl.reshape(values, (BLOCK_N, BLOCK_K))
    else:
        # g_idx (activation order) or groups that straddle tiles: gather a scale per column.
        if GROUP_LAYOUT == _GROUP_FROM_G_IDX:
            groups = tl.load(g_idx_ptr + cols, mask=col_ok, other=0)
        else:
            groups = cols // GROUP_SIZE
        mask = row_ok[:, None] & col_ok[None, :]
        scale = _load_per_group(
            scales_ptr, rows[:, None], groups[None, :], scale_row_stride, scale_group_stride, mask, 1.0
        )
        if HAS_ZERO_POINTS:
            zero_point = _load_per_group(
                zero_points_ptr, rows[:, None], groups[None, :], zero_point_row_stride, zero_point_group_stride, mask, 0
            )
        values = _apply_scale(q, zero_point, scale, HAS_ZERO_POINTS, out_dtype, INTEGER_ROUNDING)
    return values


@triton.jit
def _dequant_kernel(
    packed_ptr,  # uint8 [out, P]
    scales_ptr,  # float [out, G] (any strides: a per-tensor scale is a stride-0 view)
    zero_points_ptr,  # int8 [out, G] (any strides), or a dummy when HAS_ZERO_POINTS is False
    g_idx_ptr,  # int32 [in], or a dummy unless GROUP_LAYOUT is _GROUP_FROM_G_IDX
    out_ptr,  # float [out, in], unit column stride
    out_features,
    in_features,
    packed_units,  # packed bytes (or int32 words with WORD_LOADS) of a row that hold columns
    packed_row_stride,  # in bytes (or words with WORD_LOADS)
    scale_row_stride,
    scale_group_stride,
    zero_point_row_stride,
    zero_point_group_stride,
    out_row_stride,
    GROUP_SIZE: tl.constexpr,  # columns per contiguous group; 0 = one group per row, or g_idx decides
    GROUP_LAYOUT: tl.constexpr,  # how groups meet tiles: see _group_layout()
    HAS_ZERO_POINTS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WORD_LOADS: tl.constexpr,  # read the packed row as int32 words (needs 4-byte aligned, word-padded rows)
    INTEGER_ROUNDING: tl.constexpr,  # round to bf16 in integers (Triton's CPU interpreter truncates casts)
    STORE_CACHE: tl.constexpr = "",  # LaunchConfig.store_hint, split into tl.store's two arguments
    STORE_EVICTION: tl.constexpr = "",
):
    pid_k = tl.program_id(1)
    # Row offsets in int64 once per program (the output may exceed 2**31 elements); tile offsets stay int32.
    first_row = tl.program_id(0).to(tl.int64) * BLOCK_N
    out_ptr += first_row * out_row_stride
    scales_ptr += first_row * scale_row_stride
    zero_points_ptr += first_row * zero_point_row_stride
    rows = tl.arange(0, BLOCK_N)
    row_ok = rows < out_features - first_row
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < in_features
    out_dtype: tl.constexpr = out_ptr.dtype.element_ty

    if WORD_LOADS:
        row_base = packed_ptr + first_row * packed_row_stride * 4
    else:
        row_base = packed_ptr + first_row * packed_row_stride
    q = _load_values(row_base, rows, row_ok, pid_k, packed_row_stride, packed_units, BLOCK_N, BLOCK_K, WORD_LOADS)

    values = _scaled_tile(
        q, rows, row_ok, cols, col_ok, pid_k, in_features, scales_ptr, zero_points_ptr, g_idx_ptr,
        scale_row_stride, scale_group_stride, zero_point_row_stride, zero_point_group_stride, out_dtype,
        GROUP_SIZE, GROUP_LAYOUT, HAS_ZERO_POINTS, BLOCK_N, BLOCK_K, INTEGER_ROUNDING,
    )  # fmt: skip

    tl.store(
        out_ptr + rows[:, None] * out_row_stride + cols[None, :],
        values,
        mask=row_ok[:, None] & col_ok[None, :],
        cache_modifier=STORE_CACHE,
        eviction_policy=STORE_EVICTION,
    )


INTERPRETED = built_for_interpreter(_dequant_kernel)
"""The kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1`` when this module was imported)."""


def dequantize_triton(
    weight: Int4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense ``[out, in]`` weight in ``dtype`` (default: ``out``'s dtype, else the scale's), in one kernel launch.

    Bit-identical to :func:`int4lora_train.quant.dequant.dequantize_torch`. ``out``, when given, receives the result
    (shape ``[out, in]``, unit column stride, on the weight's device) and is returned. The weight must live on CUDA,
    or anywhere when ``TRITON_INTERPRET=1`` was set before this module was imported. No host-device synchronisation.
    """
    return launch_dequant(weight, dtype, out)


def launch_dequant(
    weight: Int4Weight,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """:func:`dequantize_triton` with an explicit tile shape (the tests and the benchmark sweep use it)."""
    out = output_buffer(weight, dtype, out)
    launch = plan_dequant_launch(weight, out, config)
    if launch is not None:
        launch()
    return out


def plan_dequant_launch(
    weight: Int4Weight, out: torch.Tensor, config: LaunchConfig | None = None
) -> KernelLaunch | None:
    """The launch that dequantizes ``weight`` into ``out`` (already checked by :func:`output_buffer`), without
    running it; None when there is nothing to do (no rows)."""
    config = config or config_for(weight)
    if config.block_k < 8 or config.block_k & (config.block_k - 1) or config.block_n & (config.block_n - 1):
        raise UnsupportedFormatError(
            f"launch config {config}: block_k must be a power of two >= 8 and block_n a power of two"
        )
    if config.store_hint not in _STORE_HINTS:
        raise UnsupportedFormatError(f"launch config {config}: store_hint must be one of {_STORE_HINTS}")
    packed, scales, zero_points, g_idx = _checked_tensors(weight)
    out_features, in_features = weight.shape
    if out_features == 0:
        return None
    group_size, group_layout = _group_layout(weight, config.block_k)
    word_loads = config.word_loads and _word_aligned(packed, in_features)
    if word_loads:
        packed_units, packed_row_stride = -(-in_features // 8), packed.stride(0) // 4
    else:
        packed_units, packed_row_stride = -(-in_features // 2), packed.stride(0)
    # Triton wants real pointers for disabled features too; the scales stand in (never read).
    zero_point_strides = zero_points.stride() if zero_points is not None else (0, 0)
    grid = (triton.cdiv(out_features, config.block_n), triton.cdiv(in_features, config.block_k))
    args = (
        packed,
        scales,
        zero_points if zero_points is not None else scales,
        g_idx if g_idx is not None else scales,
        out,
        out_features,
        in_features,
        packed_units,
        packed_row_stride,
        scales.stride(0),
        scales.stride(1),
        *zero_point_strides,
        out.stride(0),
    )
    kwargs = dict(
        GROUP_SIZE=group_size,
        GROUP_LAYOUT=group_layout,
        HAS_ZERO_POINTS=zero_points is not None,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        WORD_LOADS=word_loads,
        INTEGER_ROUNDING=INTERPRETED,
        num_warps=config.num_warps,
    )
    if config.store_hint:
        kwargs["STORE_EVICTION" if config.store_hint.startswith("evict") else "STORE_CACHE"] = config.store_hint
    return KernelLaunch(_dequant_kernel, grid, args, kwargs, out_index=4)


def _group_layout(weight: Int4Weight, block_k: int) -> tuple[int, int]:
    """``(GROUP_SIZE, GROUP_LAYOUT)`` for the kernel: how the tile's ``block_k`` columns meet the groups.

    A single group (per channel / per tensor) and g_idx pass ``GROUP_SIZE = 0``, which keeps one compiled kernel
    for every layer width instead of one per ``in_features``.
    """
    if weight.g_idx is not None:
        return 0, _GROUP_FROM_G_IDX.value
    if weight.num_groups == 1:
        return 0, _TILE_IN_ONE_GROUP.value
    group_size = weight.group_size
    if group_size % block_k == 0:
        return group_size, _TILE_IN_ONE_GROUP.value
    if block_k % group_size == 0:
        return group_size, _GROUPS_IN_TILE.value
    return group_size, _GROUP_PER_COLUMN.value


def _word_aligned(packed: torch.Tensor, in_features: int) -> bool:
    """Whether rows can be read as whole int32 words: 4-byte aligned, padded to whole words (as compressed-tensors'
    int32 ``weight_packed`` always is), on a little-endian host."""
    words = -(-in_features // 8)
    return (
        sys.byteorder == "little"
        and packed.shape[1] >= 4 * words
        and packed.stride(0) % 4 == 0
        and packed.data_ptr() % 4 == 0
    )


def _checked_tensors(
    weight: Int4Weight,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Cheap metadata checks (no device sync) and the layout the kernel needs: unit column stride for the packed
    bytes, int32 g_idx. Values were validated when the weight was built (:meth:`Int4Weight.create`)."""
    if not isinstance(weight, Int4Weight):
        raise Int4FormatError(
            f"dequantize_triton expects an Int4Weight, got {type(weight).__name__}; build one with Int4Weight.create() "
            "or a reader in int4lora_train.quant.formats"
        )
    packed = weight.packed
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise Int4FormatError(
            f"packed weight must be a 2-D uint8 tensor [out, in/2], got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    if packed.device.type != "cuda" and not INTERPRETED:
        raise UnsupportedFormatError(
            f"dequantize_triton runs on CUDA tensors, but the weight is on {packed.device}; use "
            "int4lora_train.quant.dequant.dequantize() (torch on other devices), or set TRITON_INTERPRET=1 before "
            "importing this module to run the kernel in Triton's CPU interpreter."
        )
    if packed.stride(1) != 1:
        logger.debug("packed weight %s has strides %s; copying it contiguous", tuple(packed.shape), packed.stride())
        packed = packed.contiguous()
    scales, zero_points, g_idx = weight.scales, weight.zero_points, weight.g_idx
    if scales.dtype not in FLOAT_DTYPES or scales.dim() != 2 or scales.shape[0] != packed.shape[0]:
        raise Int4FormatError(
            f"scales must be a float16/bfloat16/float32 tensor [out={packed.shape[0]}, G], got {scales.dtype} of "
            f"shape {tuple(scales.shape)}"
        )
    if zero_points is not None and (zero_points.dtype != torch.int8 or zero_points.shape != scales.shape):
        raise Int4FormatError(
            f"zero_points must be int8 with the scales' shape {tuple(scales.shape)}, got {zero_points.dtype} of "
            f"shape {tuple(zero_points.shape)}; build the weight with Int4Weight.create()"
        )
    if g_idx is not None:
        if g_idx.shape != (weight.in_features,):
            raise Int4FormatError(f"g_idx must have shape [{weight.in_features}], got {tuple(g_idx.shape)}")
        g_idx = g_idx.to(torch.int32).contiguous()
    for name, tensor in (("scales", scales), ("zero_points", zero_points), ("g_idx", g_idx)):
        if tensor is not None and tensor.device != packed.device:
            raise Int4FormatError(
                f"{name} is on {tensor.device} but the packed weight is on {packed.device}; move the whole weight "
                "with Int4Weight.to(device)"
            )
    return packed, scales, zero_points, g_idx


def output_buffer(weight: Int4Weight, dtype: torch.dtype | None, out: torch.Tensor | None) -> torch.Tensor:
    """Validate ``out`` (or allocate it): shape ``[out, in]``, the requested dtype, the weight's device."""
    shape = weight.shape
    if out is None:
        dtype = dtype or weight.dtype
        if dtype not in FLOAT_DTYPES:
            raise UnsupportedFormatError(f"dequantize to float16, bfloat16 or float32, not {dtype}")
        return torch.empty(shape, dtype=dtype, device=weight.device)
    if dtype is not None and out.dtype != dtype:
        raise Int4FormatError(f"out has dtype {out.dtype} but dtype={dtype} was requested; pass one or make them match")
    if out.dtype not in FLOAT_DTYPES:
        raise UnsupportedFormatError(f"out must be float16, bfloat16 or float32, got {out.dtype}")
    if out.shape != shape:
        raise Int4FormatError(f"out has shape {tuple(out.shape)}, expected the dense weight's [{shape[0]}, {shape[1]}]")
    if out.device != weight.device:
        raise Int4FormatError(f"out is on {out.device} but the weight is on {weight.device}; allocate it there")
    if shape[1] > 1 and out.stride(1) != 1:
        raise Int4FormatError(
            f"out must have unit column stride (rows may be strided), got strides {out.stride()}; pass a contiguous "
            "buffer or a row slice of one"
        )
    return out


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere, i.e. under the CPU interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
