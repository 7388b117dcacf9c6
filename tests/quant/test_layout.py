"""The canonical layout: nibble order, int32 views, the group rule, group-size inference and validation."""

from __future__ import annotations

import pytest
import torch

from int4lora_train.errors import Int4FormatError
from int4lora_train.quant.dequant import dequantize_torch
from int4lora_train.quant.layout import (
    Int4Weight,
    group_index,
    infer_group_size,
    int32_to_packed,
    num_groups,
    pack_int32_along_rows,
    pack_nibbles,
    packed_to_int32,
    unpack_int32_along_rows,
    unpack_nibbles,
)


def words(*values: int) -> torch.Tensor:
    """Unsigned 32-bit literals -> int32 [1, n] with the same bits."""
    return torch.tensor([[v - (1 << 32) if v >= 1 << 31 else v for v in values]], dtype=torch.int32)


def test_nibble_order_low_nibble_is_the_even_column():
    nibbles = torch.tensor([[1, 2, 3, 4, 5]], dtype=torch.uint8)
    packed = pack_nibbles(nibbles)
    assert packed[0, :3].tolist() == [0x21, 0x43, 0x05]
    assert packed.shape == (1, 4)  # padded to one whole int32 word
    assert unpack_nibbles(packed)[:, :5].tolist() == nibbles.tolist()


def test_compressed_tensors_worked_example_words():
    """FORMATS.md 1.2: q = [-8..7] packs to 0x76543210, 0xfedcba98; only column 9 = 7 gives word1 = 0x000000f0."""
    q = torch.arange(-8, 8, dtype=torch.int16).reshape(1, 16)
    packed = pack_nibbles((q + 8).to(torch.uint8))
    assert torch.equal(packed_to_int32(packed), words(0x76543210, 0xFEDCBA98))
    q = torch.full((1, 16), -8, dtype=torch.int16)
    q[0, 9] = 7
    assert torch.equal(packed_to_int32(pack_nibbles((q + 8).to(torch.uint8))), words(0, 0x000000F0))


def test_int32_view_is_zero_copy_and_round_trips():
    w = words(0x76543210, 0xFEDCBA98)
    packed = int32_to_packed(w)
    assert packed.data_ptr() == w.data_ptr()
    assert unpack_nibbles(packed).tolist() == [list(range(16))]
    assert torch.equal(packed_to_int32(packed), w)


def test_zero_points_pack_along_the_output_axis():
    """FORMATS.md 1.2: a zero-point column [-8..7] packs to 0x76543210, 0xfedcba98 along dim 0."""
    zp_nibbles = (torch.arange(-8, 8, dtype=torch.int16) + 8).to(torch.uint8).reshape(16, 1)
    packed = pack_int32_along_rows(zp_nibbles)
    assert packed.shape == (2, 1)
    assert torch.equal(packed.t(), words(0x76543210, 0xFEDCBA98))
    assert torch.equal(unpack_int32_along_rows(packed, 16), zp_nibbles)
    odd = zp_nibbles[:13]
    assert torch.equal(unpack_int32_along_rows(pack_int32_along_rows(odd), 13), odd)


def test_group_index_and_num_groups():
    assert num_groups(200, 128) == 2
    assert group_index(6, 4, None).tolist() == [0, 0, 0, 0, 1, 1]
    g_idx = torch.tensor([1, 0, 1], dtype=torch.int32)
    assert group_index(3, 2, g_idx).tolist() == [1, 0, 1]


@pytest.mark.parametrize(
    "in_features, groups, expected",
    [(256, 2, 128), (4096, 32, 128), (14336, 112, 128), (96, 3, 32), (300, 1, 300), (24, 3, 8), (7, 4, 2)],
)
def test_infer_group_size_when_one_size_is_plausible(in_features, groups, expected):
    assert infer_group_size(in_features, groups) == expected


@pytest.mark.parametrize("in_features, groups", [(300, 3), (200, 4), (200, 2)])
def test_infer_group_size_refuses_ambiguous_scales(in_features, groups):
    # 300 / 3: 100 divides, 128 is a power of two; 200 / 4: 50 and 64 both give 4 groups; 200 / 2: 100 and 128.
    with pytest.raises(Int4FormatError, match="pass group_size"):
        infer_group_size(in_features, groups, "layer.q_proj")


def test_infer_group_size_impossible():
    with pytest.raises(Int4FormatError, match="no group size"):
        infer_group_size(10, 20, "layer")


def test_create_normalises_per_tensor_and_per_channel():
    packed = torch.zeros(3, 4, dtype=torch.uint8)
    w = Int4Weight.create(packed, torch.tensor([0.5]), 8)
    assert w.scales.shape == (3, 1) and w.scales.stride(0) == 0
    assert w.nbytes == 12 + 4  # the expanded scale counts once
    w = Int4Weight.create(packed, torch.ones(3), 8, zero_points=torch.tensor([1, 2, 3], dtype=torch.int8))
    assert w.zero_points.shape == (3, 1) and w.group_size == 8
    dense = dequantize_torch(w)
    assert dense[:, 0].tolist() == [-9.0, -10.0, -11.0]  # q = 0 - 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"packed": torch.zeros(3, 4, dtype=torch.int32)}, "uint8"),
        ({"scales": torch.ones(3, 1, dtype=torch.int32)}, "float16, bfloat16 or float32"),
        ({"scales": torch.tensor([[float("nan")], [1.0], [1.0]])}, "NaN or inf"),
        ({"scales": torch.ones(3, 2), "group_size": 2}, "needs 4"),
        ({"scales": torch.ones(4, 1)}, r"\(4, 1\)"),
        ({"zero_points": torch.full((3, 1), 12, dtype=torch.int8)}, r"\[-8, 7\]"),
        ({"g_idx": torch.full((8,), -1, dtype=torch.int32)}, "never filled"),
        ({"in_features": 9}, "at least"),
        ({"scales": None}, "missing"),
    ],
)
def test_create_rejects_bad_input_naming_the_layer(kwargs, message):
    args = {"packed": torch.zeros(3, 4, dtype=torch.uint8), "scales": torch.ones(3, 1), "in_features": 8}
    args.update(kwargs)
    with pytest.raises(Int4FormatError, match=message) as info:
        Int4Weight.create(**args, name="model.layers.3.mlp.up_proj")
    assert "model.layers.3.mlp.up_proj" in str(info.value)
