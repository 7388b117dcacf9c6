"""A layer's dequantizer: which one is chosen, and the Triton one's prepared launch, made once and replayed bit for
bit (the kernel in the CPU interpreter without CUDA, compiled with it)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from int4lora_train.kernels.dequantizer import (
    CachedDequantizer,
    TorchDequantizer,
    TritonDequantizer,
    select_dequantizer,
)
from int4lora_train.modeling import Int4Linear
from int4lora_train.quant.dequant import dequantize_torch
from int4lora_train.quant.packer import quantize_rtn
from int4lora_train.quant.unpacker import INT4Unpacker

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _weight(out_features=40, in_features=64, seed=0):
    dense = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    return quantize_rtn(dense, group_size=16, symmetric=False, scale_dtype=torch.bfloat16).to(DEVICE)


def _buffers(weight):
    return (weight.packed, weight.scales, weight.zero_points, weight.g_idx)


def _count_replays(monkeypatch) -> list[int]:
    from int4lora_train.kernels import dequantizer

    calls: list[int] = []
    original = dequantizer.Replay.__call__
    monkeypatch.setattr(dequantizer.Replay, "__call__", lambda self, out: calls.append(1) or original(self, out))
    return calls


def test_selection_follows_device_choice_and_cache():
    cpu = torch.device("cpu")
    assert type(select_dequantizer(cpu, 64, 16)) is TorchDequantizer
    assert type(select_dequantizer(cpu, 64, 16, backend="torch")) is TorchDequantizer
    cached = select_dequantizer(cpu, 64, 16, backend="triton", cache=INT4Unpacker(), cache_key="k")
    assert type(cached) is CachedDequantizer and cached.key == "k"
    if torch.cuda.is_available():
        assert type(select_dequantizer(torch.device("cuda"), 64, 16)) is TritonDequantizer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_dequantizer_replays_bit_exact_into_fresh_and_sliced_outputs(triton_kernels, dtype, monkeypatch):
    weight = _weight()
    expected = dequantize_torch(weight, dtype)
    dequantizer = TritonDequantizer(torch.device(DEVICE), weight.in_features, weight.group_size)
    replays = _count_replays(monkeypatch)
    assert torch.equal(dequantizer(_buffers(weight), dtype), expected)  # the first launch, made the ordinary way
    assert replays == []
    ((held, replay),) = dequantizer._replays.values()
    assert held[0] is weight.packed and replay.args[replay.out_index] is None  # it keeps no output alive
    assert torch.equal(dequantizer(_buffers(weight), dtype), expected) and replays == [1]

    stacked = torch.full((3 * weight.shape[0], weight.shape[1]), float("nan"), dtype=dtype, device=DEVICE)
    rows = slice(weight.shape[0], 2 * weight.shape[0])  # a projection group's row slice: the same placement
    assert dequantizer(_buffers(weight), dtype, out=stacked[rows]) is not None
    assert torch.equal(stacked[rows], expected) and stacked[: weight.shape[0]].isnan().all()
    assert replays == [1, 1]


def test_triton_dequantizer_prepares_again_for_other_buffers_or_dtypes(triton_kernels):
    weight, other = _weight(seed=0), _weight(seed=1)
    dequantizer = TritonDequantizer(torch.device(DEVICE), weight.in_features, weight.group_size)
    dequantizer(_buffers(weight), torch.bfloat16)
    assert torch.equal(dequantizer(_buffers(other), torch.bfloat16), dequantize_torch(other, torch.bfloat16))
    assert torch.equal(dequantizer(_buffers(other), torch.float16), dequantize_torch(other, torch.float16))
    assert len(dequantizer._replays) == 2  # one per dtype; the bf16 one now holds the other buffers
    held = dequantizer._replays[(torch.bfloat16, weight.in_features, True)][0]
    assert held[0] is other.packed


def test_layer_chooses_its_dequantizer_once_per_device_and_copies_drop_it(triton_kernels):
    layer = Int4Linear(_weight(), backend="triton")
    first = layer.dequantizer
    assert type(first) is TritonDequantizer and layer.dequantizer is first
    x = torch.randn(3, 64, device=DEVICE)
    reference = torch.nn.functional.linear(x, dequantize_torch(layer.int4_weight(), torch.float32))
    assert torch.equal(layer(x), reference) and torch.equal(layer(x), reference)  # prepared, then replayed
    clone = copy.deepcopy(layer)
    assert "_dequantizer" not in clone.__dict__ and torch.equal(clone(x), reference)
    layer.to(torch.float32)  # moves nothing, but its launches would refer to the buffers .to() may replace
    assert "_dequantizer" not in layer.__dict__
    layer.set_cache(INT4Unpacker())
    assert type(layer.dequantizer) is CachedDequantizer and torch.equal(layer(x), reference)


def test_buffers_registered_as_parameters_get_a_new_launch(triton_kernels):
    """FSDP sharding (train.distributed) re-registers the INT4 buffers as frozen parameters of the same names."""
    layer = Int4Linear(_weight(), backend="triton")
    x = torch.randn(2, 64, device=DEVICE)
    reference = layer(x)
    for name in ("packed", "scales", "zero_points"):
        layer._parameters[name] = nn.Parameter(layer._buffers.pop(name), requires_grad=False)
    assert torch.equal(layer(x), reference)
    ((held, _),) = layer.dequantizer._replays.values()
    assert held[0] is layer.packed and isinstance(held[0], nn.Parameter)
