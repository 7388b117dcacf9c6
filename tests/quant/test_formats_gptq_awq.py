"""GPTQ (v1, v2, desc_act) and AWQ GEMM: tensors packed by reference loops written from FORMATS.md §3 / §4
(AutoGPTQ's and AutoAWQ's pack loops), FORMATS.md's worked examples, round trips, and the uint8 layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from int4lora_train.errors import Int4FormatError, UnsupportedFormatError
from int4lora_train.quant.dequant import dequantize_torch
from int4lora_train.quant.formats import (
    AWQ_ORDER,
    AWQ_REVERSE_ORDER,
    detect_format,
    from_awq,
    from_compressed_tensors,
    from_gptq,
    from_uint8,
    is_int4_module,
    read_int4_weight,
    read_module_int4_weight,
    to_awq,
    to_compressed_tensors,
    to_gptq,
)

IN, OUT, GS = 64, 24, 16
GROUPS = IN // GS


def _gptq_case(ref, v1: bool, asym: bool, desc_act: bool = False, dtype=torch.float16, seed: int = 0):
    """Unsigned u [in, out], zeros z [G, out] -> reference-packed GPTQ tensors and the float reference."""
    q, scales, zero_points = ref.random_case(OUT, IN, GROUPS, dtype, asym, seed)
    zeros = (zero_points if asym else torch.zeros(OUT, GROUPS, dtype=torch.int16)) + 8  # z in 0..15
    if v1:
        zeros = zeros.clamp(min=1)  # v1 cannot store zero 0 (AutoGPTQ's overflow bug)
    g_idx = torch.arange(IN) // GS
    if desc_act:
        perm = torch.randperm(IN, generator=torch.Generator().manual_seed(seed + 1))
        g_idx = torch.empty(IN, dtype=torch.long)
        g_idx[perm] = torch.arange(IN) // GS
    u = (q + 8).t().numpy()  # [in, out]
    qweight, qzeros = ref.pack_gptq(u, zeros.t().numpy(), v1=v1)
    tensors = {"qweight": qweight, "qzeros": qzeros, "scales": scales.t().contiguous(), "g_idx": g_idx.to(torch.int32)}
    # W[n, k] = scales[g_idx[k], n] * (u[k, n] - z[g_idx[k], n]) (FORMATS.md 3.4), with u - z = q - (z - 8).
    expected = ref.dense(q, scales, (zeros - 8) if asym else None, g_idx)
    return tensors, expected


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("desc_act", [False, True], ids=["", "desc_act"])
def test_gptq_dequantizes_exactly(ref, checkpoint_format, asym, desc_act):
    tensors, expected = _gptq_case(ref, checkpoint_format == "gptq", asym, desc_act)
    assert detect_format(tensors) == "gptq"
    weight = from_gptq(tensors, "layer", GS, checkpoint_format)
    assert torch.equal(dequantize_torch(weight), expected)
    assert (weight.g_idx is None) == (not desc_act)  # the default g_idx (column // gs) is dropped
    assert (weight.zero_points is None) == (not asym)  # symmetric GPTQ is symmetric canonically
    back = to_gptq(weight, checkpoint_format)
    for key in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(back[key], tensors[key]), key


def test_gptq_v1_symmetric_zero_words_are_0x77777777(ref):
    tensors, _ = _gptq_case(ref, v1=True, asym=False)
    assert (tensors["qzeros"] == 0x77777777).all()
    assert (to_gptq(from_gptq(tensors, "layer", GS))["qzeros"] == 0x77777777).all()


def test_gptq_v1_zero_of_16_is_exact(ref):
    """v1 stores zero - 1; a stored 15 is zero 16, i.e. zp 8, which int8 holds and the formula keeps exact."""
    q, scales, _ = ref.random_case(8, 8, 1, torch.bfloat16, False, seed=5)
    qweight, _ = ref.pack_gptq((q + 8).t().numpy(), np.full((1, 8), 9), v1=True)
    qzeros = torch.tensor([[0x000000F0 | 0x77777707]], dtype=torch.int32)  # column 1 stores 15 -> zero 16
    weight = from_gptq({"qweight": qweight, "qzeros": qzeros, "scales": scales.t().contiguous()}, "layer", -1)
    assert weight.zero_points[:, 0].tolist() == [0, 8, 0, 0, 0, 0, 0, 0]
    zero_points = torch.tensor([[0], [8], [0], [0], [0], [0], [0], [0]], dtype=torch.int16)
    assert torch.equal(dequantize_torch(weight), ref.dense(q, scales, zero_points, torch.zeros(8, dtype=torch.long)))
    with pytest.raises(UnsupportedFormatError, match="compressed-tensors stores"):
        to_compressed_tensors(weight)


def test_gptq_worked_example_n5_k13(ref):
    """FORMATS.md 3.2: (n=5, k=13) lives in qweight[1, 5], bits 20..23."""
    u = np.full((16, 8), 8)  # q = 0 everywhere
    u[13, 5] = 0xA
    qweight, qzeros = ref.pack_gptq(u, np.full((1, 8), 8), v1=False)
    assert (int(qweight[1, 5]) >> 20) & 0xF == 0xA
    weight = from_gptq({"qweight": qweight, "qzeros": qzeros, "scales": torch.ones(1, 8)}, "l", -1, "gptq_v2")
    dense = dequantize_torch(weight)
    assert dense[5, 13] == 2 and dense.abs().sum() == 2


def test_gptq_qweight_is_compressed_tensors_weight_packed_transposed(ref):
    """FORMATS.md 3.2: for the same integers, symmetric CT weight_packed == qweight.T and weight_scale == scales.T."""
    tensors, expected = _gptq_case(ref, v1=True, asym=False)
    ct = to_compressed_tensors(from_gptq(tensors, "layer", GS))
    assert torch.equal(ct["weight_packed"], tensors["qweight"].t())
    assert torch.equal(ct["weight_scale"], tensors["scales"].t())
    assert torch.equal(dequantize_torch(from_compressed_tensors(ct, "layer", GS)), expected)


def test_gptq_v1_cannot_store_zero_0(ref):
    tensors, _ = _gptq_case(ref, v1=False, asym=True, seed=3)
    tensors["qzeros"] = torch.zeros_like(tensors["qzeros"])  # v2: every zero is 0
    weight = from_gptq(tensors, "layer", GS, "gptq_v2")
    with pytest.raises(UnsupportedFormatError, match="gptq_v2"):
        to_gptq(weight, "gptq")


def _awq_case(ref, asym: bool, dtype=torch.float16, seed: int = 0):
    q, scales, zero_points = ref.random_case(OUT, IN, GROUPS, dtype, asym, seed)
    zeros = (zero_points if asym else torch.zeros(OUT, GROUPS, dtype=torch.int16)) + 8
    qweight, qzeros = ref.pack_awq((q + 8).t().numpy(), zeros.t().numpy())
    tensors = {"qweight": qweight, "qzeros": qzeros, "scales": scales.t().contiguous()}
    # W[n, k] = (u[k, n] - z[k // gs, n]) * scales[k // gs, n] (FORMATS.md 4.3): no -1 offset.
    return tensors, ref.dense(q, scales, zero_points, torch.arange(IN) // GS)


@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_awq_dequantizes_exactly(ref, asym, dtype):
    tensors, expected = _awq_case(ref, asym, dtype)
    assert detect_format(tensors) == "awq"
    weight = from_awq(tensors, "layer", GS)
    assert torch.equal(dequantize_torch(weight), expected)
    back = to_awq(weight)
    for key in tensors:
        assert torch.equal(back[key], tensors[key]), key


def test_awq_column_to_slot_map(ref):
    """FORMATS.md 4.2: word = v0 | v2<<4 | v4<<8 | v6<<12 | v1<<16 | v3<<20 | v5<<24 | v7<<28."""
    values = list(range(1, 9))  # v_j = j + 1
    expected = sum(v << (4 * slot) for v, slot in zip([values[j] for j in AWQ_ORDER], range(8)))
    qweight, _ = ref.pack_awq(np.array([values]), np.full((1, 8), 8))
    assert int(qweight[0, 0]) & 0xFFFFFFFF == expected
    assert AWQ_REVERSE_ORDER == (0, 4, 1, 5, 2, 6, 3, 7)  # column j sits in slot REV[j]
    for j in range(8):
        assert (expected >> (4 * AWQ_REVERSE_ORDER[j])) & 0xF == values[j]
    ours = to_awq(from_awq({"qweight": qweight, "qzeros": _, "scales": torch.ones(1, 8)}, "l", -1))
    assert torch.equal(ours["qweight"], qweight)


def test_cross_format_round_trip_keeps_every_value(ref):
    tensors, expected = _awq_case(ref, asym=True, seed=4)
    weight = from_awq(tensors, "layer", GS)
    via_ct = from_compressed_tensors(to_compressed_tensors(weight), "layer", GS)
    via_gptq = from_gptq(to_gptq(via_ct, "gptq_v2"), "layer", GS, "gptq_v2")
    assert torch.equal(dequantize_torch(via_gptq), expected)
    assert torch.equal(to_awq(via_gptq)["qweight"], tensors["qweight"])


class FakeQuantLinear(torch.nn.Module):
    """A GPTQ / AWQ quant-linear as their libraries build it: int32 buffers and a few attributes."""

    def __init__(self, tensors: dict, **attributes):
        super().__init__()
        for key, value in tensors.items():
            self.register_buffer(key, value)
        for key, value in attributes.items():
            setattr(self, key, value)


def test_quant_linear_modules_are_read_by_their_tensors(ref):
    gptq, gptq_expected = _gptq_case(ref, v1=True, asym=True, desc_act=True)
    module = FakeQuantLinear(gptq, bits=4, group_size=GS, infeatures=IN, outfeatures=OUT)
    assert is_int4_module(module)
    assert torch.equal(dequantize_torch(read_module_int4_weight(module, "m")), gptq_expected)
    awq, awq_expected = _awq_case(ref, asym=True)
    module = FakeQuantLinear(awq, w_bit=4, group_size=GS, in_features=IN, out_features=OUT)
    assert torch.equal(dequantize_torch(read_module_int4_weight(module, "m")), awq_expected)


def test_gptqmodel_module_in_v2_memory_format_beats_the_v1_config(ref):
    """GPTQModel converts v1 qzeros to v2 at load and says so through qzero_format(); the config still says v1."""
    from int4lora_train.quant.checkpoint_config import WeightScheme

    tensors, expected = _gptq_case(ref, v1=False, asym=True)  # v2 tensors in memory
    module = FakeQuantLinear(tensors, bits=4, group_size=GS)
    module.qzero_format = lambda format=None: 2
    v1_scheme = WeightScheme(format="gptq", group_size=GS, symmetric=False, checkpoint_format="gptq")
    assert torch.equal(dequantize_torch(read_module_int4_weight(module, "m", v1_scheme)), expected)


def test_eight_bit_quant_linear_is_unsupported(ref):
    gptq, _ = _gptq_case(ref, v1=True, asym=False)
    module = FakeQuantLinear(gptq, bits=8, group_size=GS)
    assert not is_int4_module(module)
    with pytest.raises(UnsupportedFormatError, match=r"model.layers.0.q_proj: FakeQuantLinear is a 8-bit gptq"):
        read_module_int4_weight(module, "model.layers.0.q_proj")


def test_quant_linear_with_unmatched_scales_is_an_error(ref):
    gptq, _ = _gptq_case(ref, v1=True, asym=False)
    module = FakeQuantLinear(dict(gptq, scales=torch.ones(GROUPS, 5, dtype=torch.float16)))
    with pytest.raises(Int4FormatError, match="match neither GPTQ"):
        read_module_int4_weight(module, "m")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"qweight": torch.zeros(IN // 8, OUT)}, r"layer.qweight is torch.float32 \[8, 24\]; expected"),
        (
            {"qzeros": torch.zeros(GROUPS, 2, dtype=torch.int32)},
            r"layer.qzeros is torch.int32 \[4, 2\]; expected \[4, 3\]",
        ),
        ({"scales": torch.ones(GROUPS, OUT, dtype=torch.float64)}, r"layer.scales is torch.float64"),
        ({"scales": torch.full((GROUPS, OUT), float("nan"), dtype=torch.float16)}, "layer.scales .* NaN or inf"),
        ({"qzeros": None}, "layer.qzeros is missing"),
        (
            {"g_idx": torch.zeros(IN + 1, dtype=torch.int32)},
            r"layer.qweight is torch.int32 \[8, 24\] for in_features=65",
        ),
    ],
)
def test_bad_gptq_tensors(ref, change, message):
    tensors, _ = _gptq_case(ref, v1=True, asym=False)
    tensors = {k: v for k, v in {**tensors, **change}.items() if v is not None}
    with pytest.raises(Int4FormatError, match=message):
        from_gptq(tensors, "layer", GS)


def test_gptq_group_size_must_match_scales(ref):
    tensors, _ = _gptq_case(ref, v1=True, asym=False)
    with pytest.raises(Int4FormatError, match="group_size=32 needs 2"):
        from_gptq(tensors, "layer", 32)


def test_bad_awq_tensors(ref):
    tensors, _ = _awq_case(ref, asym=True)
    with pytest.raises(Int4FormatError, match=r"layer.qzeros is torch.int32 \[3, 3\]"):
        from_awq(dict(tensors, qzeros=tensors["qzeros"][:3]), "layer", GS)
    with pytest.raises(UnsupportedFormatError, match="not a multiple of 8"):
        to_awq(from_uint8(torch.zeros(5, 8, dtype=torch.uint8), torch.ones(5, 1), name="l"))


def test_detect_format_by_names_and_shapes():
    assert detect_format({"qweight": torch.zeros(8, 32, dtype=torch.int32), "scales": torch.ones(1, 32)}) == "gptq"
    assert detect_format({"qweight": torch.zeros(64, 4, dtype=torch.int32), "scales": torch.ones(1, 32)}) == "awq"
    assert detect_format({"qweight": torch.zeros(64, 5, dtype=torch.int32), "scales": torch.ones(1, 32)}) is None
    assert detect_format({"weight": torch.zeros(4, 4, dtype=torch.uint8), "weight_scale": torch.ones(4)}) == "uint8"
    assert detect_format({"weight": torch.zeros(4, 4)}) is None


# ------------------------------------------------------------------------------------------------------ uint8


@pytest.mark.parametrize(
    "scale_shape, zp_shape", [((1,), (1,)), ((OUT,), (OUT,)), ((OUT, GROUPS), (OUT, GROUPS)), ((OUT, 1), None)]
)
def test_uint8_layout(ref, scale_shape, zp_shape):
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (OUT, IN), generator=gen, dtype=torch.int16)
    u = (q + 8).numpy().astype(np.uint8)
    packed = torch.from_numpy(u[:, 0::2] | (u[:, 1::2] << 4))  # even column low nibble, odd high
    scales = (torch.rand(scale_shape, generator=gen) + 0.5).to(torch.bfloat16)
    zero_points = None if zp_shape is None else torch.randint(-8, 8, zp_shape, generator=gen).to(torch.float32)
    weight = read_int4_weight({"weight": packed, "weight_scale": scales, "weight_zero_point": zero_points}, "l")
    groups = scales.shape[1] if scales.dim() == 2 else 1
    s = scales.reshape(-1, 1).expand(OUT, 1) if scales.dim() == 1 else scales
    zp = (
        None
        if zero_points is None
        else zero_points.reshape(-1, 1).expand(OUT, 1)
        if zero_points.dim() == 1
        else zero_points
    )
    expected = ref.dense(q, s.contiguous(), zp, torch.arange(IN) // (IN // groups))
    assert torch.equal(dequantize_torch(weight), expected)


def test_uint8_rejects_fractional_zero_points_and_int32():
    with pytest.raises(Int4FormatError, match="non-integer"):
        from_uint8(torch.zeros(4, 4, dtype=torch.uint8), torch.ones(4), torch.full((4,), 0.5), name="l")
    with pytest.raises(Int4FormatError, match=r"l.weight is torch.int32 \[4, 4\]; expected uint8"):
        from_uint8(torch.zeros(4, 4, dtype=torch.int32), torch.ones(4), name="l")
