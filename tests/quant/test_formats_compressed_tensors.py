"""compressed-tensors pack-quantized: tensors made by the real library, read, dequantized and written back.

Max difference 0: the toolkit's dequantization must equal the library's own ``decompress`` bit for bit, and
``to_compressed_tensors`` must give back exactly the tensors the library wrote.
"""

from __future__ import annotations

import pytest
import torch

from int4lora_train.errors import Int4FormatError, UnsupportedFormatError
from int4lora_train.quant.checkpoint_config import WeightScheme
from int4lora_train.quant.dequant import dequantize_torch
from int4lora_train.quant.formats import (
    detect_format,
    from_compressed_tensors,
    is_int4_module,
    read_int4_weight,
    read_module_int4_weight,
    to_compressed_tensors,
)

OUT = 13  # odd: the zero points' last packed word is partial

# (strategy, group_size, in_features): in_features need not be a multiple of 8 per channel / per tensor.
LAYOUTS = [
    ("group", 32, 96),
    ("group", 64, 128),
    ("group", 128, 256),
    ("channel", None, 100),
    ("tensor", None, 100),
]


def _weight(in_features: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(OUT, in_features, generator=gen) * 0.1).to(dtype)


def _assert_same_tensors(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype, key
        assert ours[key].shape == value.shape, key
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("strategy, group_size, in_features", LAYOUTS, ids=[f"{s}{g or ''}" for s, g, _ in LAYOUTS])
def test_library_tensors_dequantize_bit_exactly(ct, strategy, group_size, in_features, symmetric, dtype):
    made = ct.quantize(_weight(in_features, dtype), strategy, group_size, symmetric)
    weight = from_compressed_tensors(made.tensors, "layer", group_size or -1, strategy)
    assert weight.shape == (OUT, in_features)
    assert (weight.zero_points is None) == symmetric
    dense = dequantize_torch(weight)
    assert dense.dtype == dtype
    assert torch.equal(dense, made.dense)  # max difference 0
    assert torch.equal(dequantize_torch(weight, torch.float32), made.dense.to(torch.float32))
    _assert_same_tensors(to_compressed_tensors(weight), made.tensors)


def test_scheme_object_gives_the_group_size(ct):
    made = ct.quantize(_weight(256, torch.bfloat16), "group", 128, False)
    weight = read_int4_weight(made.tensors, "layer", made.scheme)  # a compressed-tensors QuantizationScheme
    assert weight.group_size == 128
    assert torch.equal(dequantize_torch(weight), made.dense)
    ours = WeightScheme(group_size=128, symmetric=False)
    assert torch.equal(dequantize_torch(read_int4_weight(made.tensors, "layer", ours)), made.dense)


def test_weight_packed_is_read_without_copy(ct):
    made = ct.quantize(_weight(128, torch.float16), "group", 64, True)
    weight = from_compressed_tensors(made.tensors, "layer", 64)
    assert weight.packed.data_ptr() == made.tensors["weight_packed"].data_ptr()


def _int32_words(*values: int) -> torch.Tensor:
    return torch.tensor([[v - (1 << 32) if v >= 1 << 31 else v for v in values]], dtype=torch.int32)


def test_worked_example_words_dequantize_to_the_row():
    """FORMATS.md 1.2: words 0x76543210, 0xfedcba98 hold q = -8..7 in column order."""
    words = _int32_words(0x76543210, 0xFEDCBA98)
    tensors = {"weight_packed": words, "weight_scale": torch.ones(1, 1), "weight_shape": torch.tensor([1, 16])}
    assert dequantize_torch(from_compressed_tensors(tensors)).tolist() == [[float(v) for v in range(-8, 8)]]
    tensors["weight_packed"] = _int32_words(0x88888888, 0x888888F8)  # q = 0 everywhere but column 9 = 7
    row = dequantize_torch(from_compressed_tensors(tensors))[0]
    assert row[9] == 7 and (row[torch.arange(16) != 9] == 0).all()


def test_row_2_column_13_nibble(ref):
    """FORMATS.md 1.4: row 2, column 13 is (weight_packed[2, 1] >> 20) & 0xF == q + 8."""
    q = torch.zeros(4, 16, dtype=torch.int16)
    q[2, 13] = -3
    packed = ref.pack_sequential((q + 8).numpy())
    assert (int(packed[2, 1]) >> 20) & 0xF == 5
    tensors = {"weight_packed": packed, "weight_scale": torch.ones(4, 1), "weight_shape": torch.tensor([4, 16])}
    assert dequantize_torch(from_compressed_tensors(tensors))[2, 13] == -3


@pytest.mark.parametrize("asym", [False, True])
def test_partial_last_group_needs_the_scheme(ref, asym):
    """in % group_size != 0 (200 columns, group 128): two groups, the second partial. 100 would also fit, so the
    group size must come from the scheme."""
    q, scales, zero_points = ref.random_case(OUT, 200, 2, torch.bfloat16, asym, seed=1)
    tensors = {
        "weight_packed": ref.pack_sequential((q + 8).numpy()),
        "weight_scale": scales,
        "weight_shape": torch.tensor([OUT, 200]),
    }
    if asym:
        tensors["weight_zero_point"] = ref.pack_sequential((zero_points + 8).t().numpy()).t().contiguous()
    weight = from_compressed_tensors(tensors, "layer", group_size=128)
    expected = ref.dense(q, scales, zero_points, torch.arange(200) // 128)
    assert torch.equal(dequantize_torch(weight), expected)
    with pytest.raises(Int4FormatError, match="pass group_size"):
        from_compressed_tensors(tensors, "layer")


@pytest.mark.parametrize("asym", [False, True])
def test_activation_order_g_idx(ref, asym):
    """weight_g_idx (compressed-tensors <= 0.18 actorder=group): g_idx[perm[i]] = i // gs, columns unpermuted."""
    in_features, group_size = 64, 16
    q, scales, zero_points = ref.random_case(OUT, in_features, 4, torch.float16, asym, seed=2)
    perm = torch.randperm(in_features, generator=torch.Generator().manual_seed(3))
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[perm] = (torch.arange(in_features) // group_size).to(torch.int32)
    tensors = {
        "weight_packed": ref.pack_sequential((q + 8).numpy()),
        "weight_scale": scales,
        "weight_shape": torch.tensor([OUT, in_features]),
        "weight_g_idx": g_idx,
    }
    if asym:
        tensors["weight_zero_point"] = ref.pack_sequential((zero_points + 8).t().numpy()).t().contiguous()
    weight = from_compressed_tensors(tensors, "layer", group_size)
    assert torch.equal(dequantize_torch(weight), ref.dense(q, scales, zero_points, g_idx.long()))
    assert torch.equal(to_compressed_tensors(weight)["weight_g_idx"], g_idx)


def test_unfilled_g_idx_is_an_error(ct):
    made = ct.quantize(_weight(64, torch.float16), "group", 32, True)
    tensors = dict(made.tensors, weight_g_idx=torch.full((64,), -1, dtype=torch.int32))
    with pytest.raises(Int4FormatError, match="layer.weight_g_idx is all -1"):
        from_compressed_tensors(tensors, "layer", 32)


def _ct_linear(made, in_features: int, scheme=None) -> torch.nn.Linear:
    """An nn.Linear as transformers 5.x + compressed-tensors >= 0.15 leaves it: packed parameters, no weight."""
    module = torch.nn.Linear(in_features, OUT, bias=False)
    del module.weight
    for key, value in made.tensors.items():
        module.register_parameter(key, torch.nn.Parameter(value, requires_grad=False))
    if scheme is not None:
        module.quantization_scheme = scheme
    return module


def test_module_with_compressed_tensors_parameters(ct):
    made = ct.quantize(_weight(256, torch.bfloat16), "group", 128, False)
    module = _ct_linear(made, 256, made.scheme)
    assert detect_format(dict(module.named_parameters())) == "compressed-tensors"
    assert is_int4_module(module)
    weight = read_module_int4_weight(module, "model.layers.0.mlp.up_proj")
    assert torch.equal(dequantize_torch(weight), made.dense)


def test_compressed_linear_after_its_first_forward_is_read_from_the_packed_tensors(ct):
    """Old CompressedLinear keeps weight_packed and adds a dense weight on its first forward; the packed one wins."""
    made = ct.quantize(_weight(128, torch.float16), "channel", None, True)
    module = _ct_linear(made, 128, made.scheme)
    module.weight = torch.nn.Parameter(torch.zeros(OUT, 128, dtype=torch.float16), requires_grad=False)
    assert torch.equal(dequantize_torch(read_module_int4_weight(module, "m")), made.dense)


def test_symmetric_scheme_ignores_an_unused_zero_point_parameter(ct):
    made = ct.quantize(_weight(128, torch.float16), "group", 64, True)
    module = _ct_linear(made, 128, made.scheme)
    module.register_parameter(
        "weight_zero_point", torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.int32), requires_grad=False)
    )
    assert torch.equal(dequantize_torch(read_module_int4_weight(module, "m")), made.dense)


def test_plain_linear_is_not_int4():
    module = torch.nn.Linear(8, 4)
    assert read_module_int4_weight(module, "m") is None
    assert not is_int4_module(module)


def test_eight_bit_scheme_is_unsupported(ct):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    made = ct.quantize(_weight(128, torch.float16), "group", 64, True)
    module = _ct_linear(made, 128, QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=8)))
    with pytest.raises(UnsupportedFormatError, match="8-bit"):
        read_module_int4_weight(module, "model.layers.0.q_proj")
    assert not is_int4_module(module)


def test_eight_bit_packing_is_recognised_from_the_shapes():
    tensors = {
        "weight_packed": torch.zeros(4, 16, dtype=torch.int32),  # 64 columns at 8 bits
        "weight_scale": torch.ones(4, 1),
        "weight_shape": torch.tensor([4, 64]),
    }
    with pytest.raises(UnsupportedFormatError, match="8-bit packing"):
        from_compressed_tensors(tensors, "layer")


def test_fp4_and_int8_weights_are_unsupported():
    fp4 = {"weight_packed": torch.zeros(4, 8, dtype=torch.uint8), "weight_scale": torch.ones(4, 1)}
    with pytest.raises(UnsupportedFormatError, match="FP4"):
        from_compressed_tensors(fp4, "layer")
    module = torch.nn.Linear(8, 4)
    module.weight = torch.nn.Parameter(torch.zeros(4, 8, dtype=torch.int8), requires_grad=False)
    module.weight_scale = torch.nn.Parameter(torch.ones(4, 1), requires_grad=False)
    with pytest.raises(UnsupportedFormatError, match="int-quantized"):
        read_module_int4_weight(module, "layer")


def _good_tensors() -> dict:
    return {
        "weight_packed": torch.zeros(16, 4, dtype=torch.int32),
        "weight_scale": torch.ones(16, 2, dtype=torch.bfloat16),
        "weight_shape": torch.tensor([16, 32]),
        "weight_zero_point": torch.zeros(2, 2, dtype=torch.int32),
    }


@pytest.mark.parametrize(
    "change, message",
    [
        ({"weight_packed": torch.zeros(16, 4)}, r"q_proj.weight_packed is torch.float32 \[16, 4\]; expected"),
        ({"weight_packed": torch.zeros(15, 4, dtype=torch.int32)}, r"weight_shape says \[16, 32\]"),
        ({"weight_shape": torch.tensor([16, 40])}, r"weight_packed is torch.int32 \[16, 4\] but weight_shape"),
        ({"weight_scale": None}, "q_proj.weight_scale is missing"),
        ({"weight_scale": torch.ones(16, 2, dtype=torch.int32)}, r"weight_scale is torch.int32 \[16, 2\]"),
        ({"weight_scale": torch.full((16, 2), float("inf"))}, "weight_scale .* contains NaN or inf"),
        ({"weight_scale": torch.ones(16, 3)}, "needs 2"),
        ({"weight_zero_point": torch.zeros(16, 2, dtype=torch.int32)}, r"weight_zero_point is torch.int32 \[16, 2\]"),
        ({"weight_zero_point": torch.zeros(2, 2)}, "weight_zero_point is torch.float32"),
        ({"weight_g_idx": torch.zeros(31, dtype=torch.int32)}, r"weight_g_idx is torch.int32 \[31\]"),
        ({"weight_shape": torch.tensor([16.0, 32.0])}, "weight_shape is torch.float32"),
    ],
)
def test_bad_tensors_name_the_tensor_shape_and_expectation(change, message):
    tensors = {k: v for k, v in {**_good_tensors(), **change}.items() if v is not None}
    with pytest.raises(Int4FormatError, match=message) as info:
        from_compressed_tensors(tensors, "model.layers.1.self_attn.q_proj", group_size=16)
    assert "model.layers.1.self_attn.q_proj" in str(info.value)


def test_scheme_group_size_must_match_the_scales():
    with pytest.raises(Int4FormatError, match="group_size=8 needs 4") as info:
        from_compressed_tensors(_good_tensors(), "layers.0.up_proj", group_size=8)
    assert "2 groups" in str(info.value)


def test_per_channel_scheme_with_grouped_scales_is_an_error():
    with pytest.raises(Int4FormatError, match="per channel"):
        from_compressed_tensors(_good_tensors(), "layer", strategy="channel")
