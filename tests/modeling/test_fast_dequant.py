"""Prepared dequantization launches: recorded from ``launch_dequant`` once, replayed bit for bit (the Triton kernel in
the CPU interpreter without CUDA, compiled with it)."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from int4lora_train.modeling import Int4Linear
from int4lora_train.modeling.fast_dequant import DequantPlan, fast_dequantize
from int4lora_train.quant.dequant import dequantize_torch
from int4lora_train.quant.packer import quantize_rtn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", autouse=True)
def triton_kernel():
    """``triton_dequant`` compiled on CUDA, else reloaded under Triton's CPU interpreter."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from int4lora_train.quant import triton_dequant

        if not triton_dequant._interpreting():
            importlib.reload(triton_dequant)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _weight(out_features=40, in_features=64, seed=0):
    dense = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    return quantize_rtn(dense, group_size=16, symmetric=False, scale_dtype=torch.bfloat16).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_plan_replays_bit_exact_into_fresh_and_sliced_outputs(dtype):
    weight = _weight()
    expected = dequantize_torch(weight, dtype)
    first = torch.full(weight.shape, float("nan"), dtype=dtype, device=DEVICE)
    plan = DequantPlan(weight, dtype, first)  # records (and performs) the first launch
    assert torch.equal(first, expected)
    assert all(a is not first for a in plan.args)  # the plan must not keep its first output alive
    again = torch.full_like(first, float("nan"))
    assert plan(again) is again and torch.equal(again, expected)

    stacked = torch.full((3 * weight.shape[0], weight.shape[1]), float("nan"), dtype=dtype, device=DEVICE)
    rows = slice(weight.shape[0], 2 * weight.shape[0])
    sliced_plan = DequantPlan(weight, dtype, stacked[rows])
    assert torch.equal(stacked[rows], expected)
    stacked.fill_(float("nan"))
    sliced_plan(stacked[rows])
    assert torch.equal(stacked[rows], expected) and stacked[: weight.shape[0]].isnan().all()


def test_plan_is_invalid_for_other_buffers_or_dtypes():
    weight, other = _weight(seed=0), _weight(seed=1)
    out = torch.empty(weight.shape, dtype=torch.bfloat16, device=DEVICE)
    plan = DequantPlan(weight, torch.bfloat16, out)
    buffers = (weight.packed, weight.scales, weight.zero_points, weight.g_idx)
    assert plan.valid_for(buffers, torch.bfloat16, out)
    assert not plan.valid_for((other.packed, *buffers[1:]), torch.bfloat16, out)
    assert not plan.valid_for(buffers, torch.float16, out)


def test_fast_dequantize_through_a_layer_equals_the_reference():
    weight = _weight()
    layer = Int4Linear(weight)
    for _ in range(2):  # the second call replays the plan on CUDA
        got = fast_dequantize(layer, layer.int4_weight(), torch.bfloat16)
        assert torch.equal(got, dequantize_torch(weight, torch.bfloat16))
    out = torch.empty(weight.shape, dtype=torch.float32, device=DEVICE)
    assert fast_dequantize(layer, layer.int4_weight(), torch.float32, out=out) is out
    assert torch.equal(out, dequantize_torch(weight, torch.float32))
