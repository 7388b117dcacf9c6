"""Int4Linear: forward / backward against a dense nn.Linear holding the dequantized weight, what autograd saves,
autocast, cache mode, dtype casts, state_dict and the missing dense weight."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from int4lora_train.errors import Int4FormatError, UnsupportedFormatError
from int4lora_train.modeling import DenseWeightUnavailableError, Int4Linear
from int4lora_train.quant.dequant import dequantize
from int4lora_train.quant.layout import Int4Weight
from int4lora_train.quant.packer import quantize_rtn
from int4lora_train.quant.unpacker import INT4Unpacker

OUT, IN = 48, 64


def _weight(kind: str, scale_dtype=torch.float32, seed: int = 0) -> Int4Weight:
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(OUT, IN, generator=gen)
    if kind == "sym":
        return quantize_rtn(dense, group_size=16, symmetric=True, scale_dtype=scale_dtype)
    if kind == "asym":
        return quantize_rtn(dense, group_size=16, symmetric=False, scale_dtype=scale_dtype)
    if kind == "tensor":
        return quantize_rtn(dense, strategy="tensor", symmetric=True, scale_dtype=scale_dtype)
    if kind == "g_idx":  # activation order: columns' groups permuted
        packed = torch.randint(0, 256, (OUT, IN // 2), dtype=torch.uint8, generator=gen)
        scales = (torch.rand(OUT, 4, generator=gen) + 0.1).to(scale_dtype)
        zero_points = torch.randint(-8, 8, (OUT, 4), generator=gen, dtype=torch.int8)
        g_idx = (torch.randperm(IN, generator=gen) // 16).to(torch.int32)
        return Int4Weight.create(packed, scales, IN, 16, zero_points=zero_points, g_idx=g_idx)
    raise ValueError(kind)


def _x(dtype=torch.float32, requires_grad=True) -> torch.Tensor:
    x = torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(1), dtype=dtype)
    return x.requires_grad_(requires_grad)


@pytest.mark.parametrize("kind", ["sym", "asym", "tensor", "g_idx"])
def test_forward_and_grad_input_equal_dense_linear(kind):
    weight = _weight(kind)
    bias = torch.randn(OUT)
    layer = Int4Linear(weight, bias=bias)
    dense = dequantize(weight, torch.float32)

    x_int4, x_dense = _x(), _x()
    y_int4 = layer(x_int4)
    y_dense = F.linear(x_dense, dense, bias)
    assert torch.allclose(y_int4, y_dense, atol=1e-5, rtol=0)

    grad = torch.randn_like(y_dense)
    y_int4.backward(grad)
    y_dense.backward(grad)
    assert torch.allclose(x_int4.grad, x_dense.grad, atol=1e-5, rtol=0)
    assert not any(t.requires_grad for t in layer.buffers())
    assert layer.bias.grad is None  # frozen


def test_bias_gradient_when_bias_is_trained():
    layer = Int4Linear(_weight("sym"), bias=torch.zeros(OUT))
    layer.bias.requires_grad_(True)
    out = layer(_x(requires_grad=False))
    out.sum().backward()
    assert torch.equal(layer.bias.grad, torch.full((OUT,), 10.0))  # 2 x 5 positions


def test_backward_saves_only_packed_tensors():
    """The autograd graph must not keep a dense [out, in] weight: only the packed buffers are saved."""
    layer = Int4Linear(_weight("asym"))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(_x())
    assert {t.data_ptr() for t in saved} <= {b.data_ptr() for b in layer.buffers()}
    assert not [t for t in saved if t.is_floating_point() and tuple(t.shape) == (OUT, IN)]
    out.sum().backward()


def test_autocast_bf16_on_cpu_runs_in_bf16():
    weight = _weight("sym", scale_dtype=torch.bfloat16)
    layer = Int4Linear(weight)
    x = _x()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = F.linear(x.detach().to(torch.bfloat16), dequantize(weight, torch.bfloat16))
    assert torch.equal(out.detach(), expected)
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


def test_compute_dtype_keeps_output_in_input_dtype():
    weight = _weight("sym", scale_dtype=torch.bfloat16)
    layer = Int4Linear(weight, compute_dtype=torch.bfloat16)
    x = _x(requires_grad=False)
    out = layer(x)
    assert out.dtype == torch.float32
    expected = F.linear(x.to(torch.bfloat16), dequantize(weight, torch.bfloat16)).float()
    assert torch.equal(out, expected)


def test_cache_mode_equals_on_the_fly_and_hits_the_cache():
    weight = _weight("asym")
    on_the_fly = Int4Linear(weight)
    cache = INT4Unpacker(max_cache_bytes=1 << 20)
    cached = Int4Linear(weight, cache=cache, cache_key="layer")
    assert cached.mode == "cache" and on_the_fly.mode == "on_the_fly"
    x1, x2 = _x(), _x()
    y1, y2 = on_the_fly(x1), cached(x2)
    assert torch.equal(y1, y2)
    y1.sum().backward()
    y2.sum().backward()
    assert torch.equal(x1.grad, x2.grad)
    stats = cache.get_cache_stats()
    assert stats["misses"] == 1 and stats["hits"] == 1  # forward filled it, backward reused it
    twin = copy.deepcopy(cached)  # the cache is one budget: shared by copies, not copied
    assert twin.cache is cache and torch.equal(twin.packed, cached.packed)
    assert twin.packed.data_ptr() != cached.packed.data_ptr()


def test_dtype_cast_moves_but_never_rerounds_scales():
    weight = _weight("sym", scale_dtype=torch.float16)
    layer = Int4Linear(weight, bias=torch.randn(OUT))
    before = layer.dequantize(torch.float32)
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16  # bf16 would re-round the scales
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dequantize(torch.float32), before)
    layer.float()
    assert layer.scales.dtype == torch.float16


def test_state_dict_round_trip_with_per_tensor_scale():
    layer = Int4Linear(_weight("tensor"))
    assert layer.scales.shape == (1, 1)  # the stride-0 view is stored as its one value
    assert layer.int4_weight().scales.shape == (OUT, 1)
    state = copy.deepcopy(layer.state_dict())
    assert set(state) == {"packed", "scales"}
    other = Int4Linear(_weight("tensor", seed=5))
    other.load_state_dict(state)
    assert torch.equal(other.dequantize(), layer.dequantize())


def test_no_dense_weight_attribute():
    layer = Int4Linear(_weight("sym"))
    assert not hasattr(layer, "weight")
    assert getattr(layer, "weight", None) is None
    with pytest.raises(DenseWeightUnavailableError, match="dequantize"):
        _ = layer.weight
    with pytest.raises(UnsupportedFormatError):  # the same error, caught as the toolkit's type
        _ = layer.weight
    assert isinstance(layer, torch.nn.Linear)
    assert list(layer.parameters()) == []
    assert layer.qweight is layer.packed


def test_repr_and_attributes():
    layer = Int4Linear(_weight("g_idx"), bias=torch.zeros(OUT))
    text = repr(layer)
    for part in ("in_features=64", "out_features=48", "group_size=16", "asym", "g_idx", "bias=True", "on_the_fly"):
        assert part in text
    assert (layer.in_features, layer.out_features, layer.group_size) == (IN, OUT, 16)
    assert "per-tensor" in repr(Int4Linear(_weight("tensor")))


def test_bias_shape_is_checked():
    with pytest.raises(Int4FormatError, match=r"\[48\]"):
        Int4Linear(_weight("sym"), bias=torch.zeros(OUT + 1))
