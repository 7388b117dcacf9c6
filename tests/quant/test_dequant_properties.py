"""Property test: random shapes, group sizes, zero points, activation orders and formats, packed by the
independent reference packers, read by the toolkit and dequantized, equal an independent float reference."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from int4lora_train.quant.checkpoint_config import WeightScheme
from int4lora_train.quant.dequant import dequantize_torch
from int4lora_train.quant.formats import read_int4_weight

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@st.composite
def cases(draw):
    fmt = draw(st.sampled_from(["compressed-tensors", "gptq_v1", "gptq_v2", "awq", "uint8"]))
    out_features = draw(st.integers(1, 24)) * (8 if fmt == "awq" else 1)
    if fmt == "awq":
        out_features = min(out_features, 40)
    in_unit = 8 if fmt.startswith("gptq") else 2 if fmt == "uint8" else 1
    in_features = draw(st.integers(1, 80 // in_unit)) * in_unit
    per_channel = draw(st.booleans())
    if per_channel:
        group_size = in_features
    elif fmt == "awq":
        group_size = draw(st.sampled_from([d for d in range(1, in_features + 1) if in_features % d == 0]))
    else:
        group_size = draw(st.integers(1, in_features))
    groups = -(-in_features // group_size)
    activation_order = fmt in ("compressed-tensors", "gptq_v1", "gptq_v2") and draw(st.booleans())
    return {
        "format": fmt,
        "out": out_features,
        "in": in_features,
        "group_size": group_size,
        "groups": groups,
        "asym": draw(st.booleans()),
        "activation_order": activation_order,
        "dtype": draw(st.sampled_from(DTYPES)),
        "output_dtype": draw(st.sampled_from((None, *DTYPES))),
        "seed": draw(st.integers(0, 2**16)),
    }


def _tensors(ref, case, q, scales, zero_points, g_idx):
    """The case's integers in its format, packed by the reference loops."""
    fmt, out_features, in_features = case["format"], case["out"], case["in"]
    if fmt == "compressed-tensors":
        tensors = {
            "weight_packed": ref.pack_sequential((q + 8).numpy()),
            "weight_scale": scales,
            "weight_shape": torch.tensor([out_features, in_features]),
        }
        if zero_points is not None:
            tensors["weight_zero_point"] = ref.pack_sequential((zero_points + 8).t().numpy()).t().contiguous()
        if case["activation_order"]:
            tensors["weight_g_idx"] = g_idx.to(torch.int32)
        return tensors
    zeros = (zero_points if zero_points is not None else torch.zeros_like(scales, dtype=torch.int16)) + 8
    if fmt.startswith("gptq"):
        qweight, qzeros = ref.pack_gptq((q + 8).t().numpy(), zeros.t().numpy(), v1=fmt == "gptq_v1")
        return {"qweight": qweight, "qzeros": qzeros, "scales": scales.t().contiguous(), "g_idx": g_idx.to(torch.int32)}
    if fmt == "awq":
        qweight, qzeros = ref.pack_awq((q + 8).t().numpy(), zeros.t().numpy())
        return {"qweight": qweight, "qzeros": qzeros, "scales": scales.t().contiguous()}
    u = (q + 8).to(torch.uint8)
    return {"weight": u[:, 0::2] | (u[:, 1::2] << 4), "weight_scale": scales, "weight_zero_point": zero_points}


@settings(max_examples=80, deadline=None)
@given(case=cases())
def test_every_format_dequantizes_to_the_float_reference(ref, case):
    gen = torch.Generator().manual_seed(case["seed"])
    q, scales, zero_points = ref.random_case(
        case["out"], case["in"], case["groups"], case["dtype"], case["asym"], case["seed"]
    )
    if zero_points is not None and case["format"] == "gptq_v1":
        zero_points = zero_points + 1  # v1 stores zero - 1 >= 0: zero points 1..16, i.e. zp -7..8
    if case["activation_order"]:
        g_idx = torch.randint(0, case["groups"], (case["in"],), generator=gen)
    else:
        g_idx = torch.arange(case["in"]) // case["group_size"]
    tensors = _tensors(ref, case, q, scales, zero_points, g_idx)
    checkpoint_format = "gptq_v2" if case["format"] == "gptq_v2" else "gptq"
    scheme = WeightScheme(
        group_size=case["group_size"], symmetric=not case["asym"], checkpoint_format=checkpoint_format
    )
    weight = read_int4_weight(tensors, "layer", scheme)

    expected = ref.dense(q, scales, zero_points, g_idx)
    output_dtype = case["output_dtype"]
    dense = dequantize_torch(weight, output_dtype)
    assert dense.dtype == (output_dtype or case["dtype"])
    assert torch.equal(dense, expected.to(dense.dtype))
