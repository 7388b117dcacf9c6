"""The fused Triton dequantization kernel against the torch reference, bit for bit.

Without CUDA the kernel runs in Triton's CPU interpreter (the ``triton_kernels`` fixture, tests/conftest.py); with
CUDA the same tests run the compiled kernel on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from int4lora_train.errors import Int4FormatError, UnsupportedFormatError
from int4lora_train.quant.dequant import dequantize, dequantize_torch
from int4lora_train.quant.layout import Int4Weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOATS = (torch.float16, torch.bfloat16, torch.float32)

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")


@pytest.fixture(scope="module")
def dequant(triton_kernels):
    """int4lora_train.kernels.dequant, compiled on CUDA, else in Triton's CPU interpreter."""
    return triton_kernels.dequant


def random_weight(
    out_features: int,
    in_features: int,
    group_size: int | None,
    scale_dtype: torch.dtype,
    symmetric: bool = True,
    per_tensor: bool = False,
    activation_order: bool = False,
    seed: int = 0,
    scale_magnitude: float = 0.02,
    word_padded: bool = False,
) -> Int4Weight:
    """Random packed bytes [out, P], scales [out, G] (or [1]), int8 zero points in [-8, 8], g_idx.

    P = ceil(in/2) (tight bytes, read byte-wise), or 4 * ceil(in/8) with ``word_padded`` (compressed-tensors' int32
    words, read word-wise); the padding holds random bits, which must never reach the output.
    """
    gen = torch.Generator().manual_seed(seed)
    row_bytes = 4 * -(-in_features // 8) if word_padded else -(-in_features // 2)
    packed = torch.randint(0, 256, (out_features, row_bytes), dtype=torch.uint8, generator=gen)
    groups = 1 if group_size is None else -(-in_features // group_size)
    if per_tensor:
        scales = torch.rand(1, generator=gen) * scale_magnitude + scale_magnitude / 10
    else:
        scales = torch.randn(out_features, groups, generator=gen) * scale_magnitude
    zero_points = None if symmetric else torch.randint(-8, 9, scales.shape, dtype=torch.int8, generator=gen)
    g_idx = None
    if activation_order:
        g_idx = (torch.randperm(in_features, generator=gen) % groups).to(torch.int32)
    # Move the parts, not the weight: Int4Weight.to() would materialise a per-tensor scale's stride-0 view.
    packed, scales, zero_points, g_idx = (
        None if t is None else t.to(DEVICE) for t in (packed, scales, zero_points, g_idx)
    )
    return Int4Weight.create(packed, scales.to(scale_dtype), in_features, group_size, zero_points, g_idx)


def assert_bit_exact(dequant, weight: Int4Weight, config=None) -> None:
    """Every output dtype: the kernel's bits equal the torch reference's bits (NaN, -0 and all)."""
    for dtype in FLOATS:
        if config is None:
            got = dequant.dequantize_triton(weight, dtype)
        else:
            got = dequant.launch_dequant(weight, dtype, None, config)
        want = dequantize_torch(weight, dtype)
        assert got.shape == want.shape and got.dtype == want.dtype == dtype
        as_int = torch.int32 if dtype == torch.float32 else torch.int16
        mismatch = got.view(as_int) != want.view(as_int)
        assert not mismatch.any(), (
            f"{int(mismatch.sum())} elements differ for {dtype}, first at {mismatch.nonzero()[0].tolist()}: "
            f"max |diff| {(got.float() - want.float()).abs().max().item()}"
        )


@pytest.mark.parametrize("word_padded", [False, True], ids=["bytes", "words"])
@pytest.mark.parametrize("scale_dtype", FLOATS)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_grouped_matches_torch(
    dequant, symmetric: bool, group_size: int, scale_dtype: torch.dtype, word_padded: bool
) -> None:
    # 300 columns: not a multiple of 8 nor of any group size; 5 rows: odd.
    weight = random_weight(5, 300, group_size, scale_dtype, symmetric, seed=group_size, word_padded=word_padded)
    assert_bit_exact(dequant, weight)


@pytest.mark.parametrize("scale_dtype", FLOATS)
@pytest.mark.parametrize("per_tensor", [False, True], ids=["channel", "tensor"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_single_group_matches_torch(dequant, symmetric: bool, per_tensor: bool, scale_dtype: torch.dtype) -> None:
    weight = random_weight(7, 37, None, scale_dtype, symmetric, per_tensor=per_tensor, word_padded=symmetric)
    assert weight.num_groups == 1
    if per_tensor:
        assert weight.scales.stride(0) == 0, "the per-tensor case must exercise a stride-0 scale view"
    assert_bit_exact(dequant, weight)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_g_idx_matches_torch(dequant, symmetric: bool, scale_dtype: torch.dtype) -> None:
    weight = random_weight(3, 101, 32, scale_dtype, symmetric, activation_order=True, seed=3, word_padded=symmetric)
    assert_bit_exact(dequant, weight)


def test_odd_group_size_matches_torch(dequant) -> None:
    # An odd group size splits some bytes' two nibbles across groups (the per-column gather path).
    assert_bit_exact(dequant, random_weight(4, 45, 9, torch.bfloat16, symmetric=False, seed=4))


@pytest.mark.parametrize("word_loads", [False, True], ids=["bytes", "words"])
@pytest.mark.parametrize("block", [(2, 32, 1), (4, 64, 2), (8, 128, 4), (16, 256, 4)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_every_tile_shape_and_group_path(dequant, block: tuple[int, int, int], word_loads: bool) -> None:
    # Groups of 64 against tiles of 32..256 columns: one group per tile (32, 64) or several (128, 256); 333 columns
    # and 9 rows leave partial tiles at both edges. Groups of 48 straddle every tile (the per-column gather).
    config = dequant.LaunchConfig(*block, word_loads=word_loads)
    for group_size in (64, 48):
        weight = random_weight(9, 333, group_size, torch.bfloat16, symmetric=False, seed=5, word_padded=True)
        assert dequant._word_aligned(weight.packed, weight.in_features)
        assert_bit_exact(dequant, weight, config)


@pytest.mark.parametrize("store_hint", [".cs", ".wt", "evict_first"])
def test_store_hints_keep_the_result(dequant, store_hint: str) -> None:
    # The benchmark sweep's store hints change only how the GPU caches the output, never a value.
    weight = random_weight(9, 333, 64, torch.bfloat16, symmetric=False, seed=5, word_padded=True)
    assert_bit_exact(dequant, weight, dequant.LaunchConfig(4, 64, 2, store_hint=store_hint))


def test_unknown_store_hint_is_refused(dequant) -> None:
    weight = random_weight(4, 64, 32, torch.bfloat16, symmetric=True, seed=5)
    with pytest.raises(UnsupportedFormatError, match="store_hint must be one of"):
        dequant.launch_dequant(weight, config=dequant.LaunchConfig(4, 64, 2, store_hint=".bogus"))


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (2, 3), (13, 8)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_tiny_and_narrow_layers(dequant, shape: tuple[int, int]) -> None:
    # The default tile shape adapts to narrow rows (block_k down to 8 columns); single rows and columns still work.
    out_features, in_features = shape
    assert_bit_exact(dequant, random_weight(out_features, in_features, None, torch.bfloat16, symmetric=False, seed=12))


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1e-7, 3e3], ids=["subnormal", "overflow"])
def test_extreme_scales_round_like_torch(dequant, scale_dtype: torch.dtype, magnitude: float) -> None:
    # Tiny scales give fp16 subnormals, huge ones overflow fp16 to inf: both must round exactly as torch does.
    assert_bit_exact(dequant, random_weight(4, 64, 32, scale_dtype, symmetric=False, seed=6, scale_magnitude=magnitude))


def test_padded_and_strided_packed_bytes(dequant) -> None:
    weight = random_weight(6, 36, 32, torch.float16, symmetric=False, seed=7)
    # compressed-tensors pads rows to whole int32 words: 36 columns -> 20 bytes, of which 18 hold columns.
    padded = torch.cat([weight.packed, torch.full((6, 2), 0xFF, dtype=torch.uint8, device=DEVICE)], dim=1)
    assert_bit_exact(dequant, Int4Weight.create(padded, weight.scales, 36, 32, weight.zero_points))
    # A column-strided view (here a transpose of a transpose's copy) is made contiguous, not misread.
    strided = padded.t().contiguous().t()
    assert strided.stride(1) != 1
    assert_bit_exact(dequant, Int4Weight.create(strided, weight.scales, 36, 32, weight.zero_points))


def test_out_buffer_is_filled_and_returned(dequant) -> None:
    weight = random_weight(5, 70, 32, torch.bfloat16, seed=8)
    want = dequantize_torch(weight, torch.float16)
    buffer = torch.full((5, 70), float("nan"), dtype=torch.float16, device=DEVICE)
    assert dequant.dequantize_triton(weight, out=buffer) is buffer
    assert torch.equal(buffer, want)
    # Rows of a wider buffer: only the first 70 columns of each row are written.
    wide = torch.full((5, 80), -1.0, dtype=torch.float16, device=DEVICE)
    dequant.dequantize_triton(weight, torch.float16, out=wide[:, :70])
    assert torch.equal(wide[:, :70], want)
    assert (wide[:, 70:] == -1).all()


@pytest.mark.parametrize(
    "make_out, message",
    [
        (lambda: torch.empty(5, 71, dtype=torch.float16), "shape"),
        (lambda: torch.empty(5, 70, dtype=torch.float32), "dtype"),
        (lambda: torch.empty(70, 5, dtype=torch.float16).t(), "unit column stride"),
        (lambda: torch.empty(5, 70, dtype=torch.float16, device="meta"), "out is on meta"),
    ],
    ids=["shape", "dtype", "strides", "device"],
)
def test_bad_out_buffer_is_rejected(dequant, make_out, message: str) -> None:
    weight = random_weight(5, 70, 32, torch.bfloat16, seed=9)
    out = make_out()
    if out.device.type != "meta":
        out = out.to(DEVICE)
    with pytest.raises(Int4FormatError, match=message):
        dequant.dequantize_triton(weight, torch.float16, out=out)


def test_non_float_output_dtype_is_rejected(dequant) -> None:
    with pytest.raises(UnsupportedFormatError, match="float16, bfloat16 or float32"):
        dequant.dequantize_triton(random_weight(2, 8, None, torch.float16), torch.int8)


def test_tensors_on_another_device_are_rejected(dequant, monkeypatch: pytest.MonkeyPatch) -> None:
    weight = random_weight(2, 16, 8, torch.float16).to("cpu")
    monkeypatch.setattr(dequant, "INTERPRETED", False)
    with pytest.raises(UnsupportedFormatError, match="CUDA"):
        dequant.dequantize_triton(weight)
    moved = Int4Weight(weight.packed, weight.scales.to("meta"), 16, 8)
    monkeypatch.setattr(dequant, "INTERPRETED", True)
    with pytest.raises(Int4FormatError, match="scales is on meta"):
        dequant.dequantize_triton(moved)


def test_dequantize_dispatches_to_the_kernel(dequant) -> None:
    weight = random_weight(3, 40, 16, torch.bfloat16, symmetric=False, seed=10)
    got = dequantize(weight, torch.float32, backend="triton")
    assert torch.equal(got.view(torch.int32), dequantize_torch(weight, torch.float32).view(torch.int32))
