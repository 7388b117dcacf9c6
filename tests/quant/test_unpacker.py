"""The seed's INT4Unpacker API: exact dequantization of real module layouts, clear errors, and the budgeted cache."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from int4lora_train.errors import Int4FormatError
from int4lora_train.quant import unpacker as unpacker_module
from int4lora_train.quant.dequant import dequantize
from int4lora_train.quant.formats import to_awq, to_compressed_tensors, to_gptq
from int4lora_train.quant.layout import pack_nibbles
from int4lora_train.quant.packer import quantize_rtn
from int4lora_train.quant.unpacker import INT4Unpacker, get_unpacker

OUT, IN = 16, 64


def _uint8(q: torch.Tensor) -> torch.Tensor:
    """Signed q [out, in] -> the seed's uint8 [out, in/2] (even column in the low nibble)."""
    u = (q + 8).numpy().astype(np.uint8)
    return torch.from_numpy(u[:, 0::2] | (u[:, 1::2] << 4))


@pytest.mark.parametrize("scale_shape", [(1,), (OUT,), (OUT, 4)])
def test_unpack_int4_weights_seed_layout(ref, scale_shape):
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (OUT, IN), generator=gen, dtype=torch.int16)
    scales = (torch.rand(scale_shape, generator=gen) + 0.1).to(torch.float16)
    zero_points = torch.randint(-8, 8, scale_shape, generator=gen, dtype=torch.int8)
    dense = INT4Unpacker().unpack_int4_weights(
        _uint8(q), scales, zero_points, group_size=16 if len(scale_shape) == 2 else None
    )
    assert dense.dtype == torch.float16 and dense.shape == (OUT, IN)
    s = scales.reshape(-1, 1).expand(OUT, 1) if len(scale_shape) == 1 else scales
    zp = zero_points.reshape(-1, 1).expand(OUT, 1) if len(scale_shape) == 1 else zero_points
    groups = torch.arange(IN) // (IN // s.shape[1])
    assert torch.equal(dense, ref.dense(q, s.contiguous(), zp.contiguous(), groups))


def test_unpack_int4_weights_accepts_compressed_tensors_words():
    weight = quantize_rtn(torch.randn(OUT, IN), 32, symmetric=False)
    ct = to_compressed_tensors(weight)
    dense = INT4Unpacker().unpack_int4_weights(
        ct["weight_packed"], ct["weight_scale"], ct["weight_zero_point"], 32, output_dtype=torch.bfloat16
    )
    assert torch.equal(dense, dequantize(weight, torch.bfloat16))


def test_unpack_int4_weights_errors_are_value_errors_naming_the_tensor():
    with pytest.raises(ValueError, match=r"packed_weights.weight is torch.float32 \[4, 4\]; expected uint8"):
        INT4Unpacker().unpack_int4_weights(torch.zeros(4, 4), torch.ones(4))
    with pytest.raises(Int4FormatError, match="group_size=16 needs 4"):
        INT4Unpacker().unpack_int4_weights(torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 2), group_size=16)


class Holder(torch.nn.Module):
    def __init__(self, tensors: dict, **attributes):
        super().__init__()
        for key, value in tensors.items():
            self.register_buffer(key, value)
        self.__dict__.update(attributes)


def _modules():
    weight = quantize_rtn(torch.randn(OUT, IN, generator=torch.Generator().manual_seed(1)), 16, symmetric=False)
    ct = torch.nn.Linear(IN, OUT, bias=False)
    del ct.weight
    for key, value in to_compressed_tensors(weight).items():
        ct.register_parameter(key, torch.nn.Parameter(value, requires_grad=False))
    return weight, {
        "compressed-tensors": ct,
        "gptq": Holder(to_gptq(weight, "gptq_v2"), bits=4, group_size=16, checkpoint_format="gptq_v2"),
        "awq": Holder(to_awq(weight), w_bit=4, group_size=16),
        "uint8": Holder(
            {
                "weight": weight.packed[:, : IN // 2].contiguous(),
                "weight_scale": weight.scales,
                "weight_zero_point": weight.zero_points,
            },
            quantization_scheme=None,
        ),
    }


def test_unpack_module_reads_every_real_layout():
    weight, modules = _modules()
    unpacker = INT4Unpacker()
    expected = dequantize(weight, torch.float16)
    for name, module in modules.items():
        assert unpacker.is_int4_quantized(module), name
        assert torch.equal(unpacker.unpack_module(module, name), expected), name
    assert unpacker.unpack_module(torch.nn.Linear(4, 4), "dense") is None
    assert not unpacker.is_int4_quantized(torch.nn.Linear(4, 4))


def test_unpack_module_raises_instead_of_returning_none():
    module = torch.nn.Linear(IN, OUT)
    module.weight_packed = torch.nn.Parameter(torch.zeros(OUT, IN // 8, dtype=torch.int32), requires_grad=False)
    with pytest.raises(Int4FormatError, match="layers.0.q_proj.weight_scale is missing"):
        INT4Unpacker().unpack_module(module, "layers.0.q_proj")


def test_cache_hits_misses_dtype_keys_and_force():
    weight, modules = _modules()
    module = modules["compressed-tensors"]
    unpacker = INT4Unpacker()
    first = unpacker.unpack_module(module, "m")
    assert unpacker.unpack_module(module, "m") is first
    bf16 = unpacker.unpack_module(module, "m", output_dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    stats = unpacker.get_cache_stats()
    assert (stats["size"], stats["hits"], stats["misses"]) == (2, 1, 2)
    assert stats["hit_rate"] == pytest.approx(1 / 3)
    assert stats["bytes"] == OUT * IN * 2 * 2 and stats["max_bytes"] is None
    assert unpacker.unpack_module(module, "m", force=True) is not first
    unpacker.clear_cache()
    assert unpacker.get_cache_stats() == {
        "size": 0,
        "hits": 0,
        "misses": 0,
        "hit_rate": 0.0,
        "bytes": 0,
        "max_bytes": None,
        "evictions": 0,
    }


def test_an_in_place_change_of_the_packed_weight_is_not_served_stale():
    weight, modules = _modules()
    module = modules["compressed-tensors"]
    unpacker = INT4Unpacker()
    before = unpacker.unpack_module(module, "m").clone()
    with torch.no_grad():
        module.weight_packed.zero_()
    after = unpacker.unpack_module(module, "m")
    assert not torch.equal(before, after)
    assert unpacker.get_cache_stats()["hits"] == 0


def test_lru_eviction_under_the_byte_budget():
    entry = OUT * IN * 4  # fp32
    unpacker = INT4Unpacker(max_cache_bytes=2 * entry)
    weights = [quantize_rtn(torch.randn(OUT, IN), 16, scale_dtype=torch.float32) for _ in range(3)]
    unpacker.get_dense("a", weights[0], torch.float32)
    unpacker.get_dense("b", weights[1], torch.float32)
    unpacker.get_dense("a", weights[0], torch.float32)  # a is now the most recently used
    unpacker.get_dense("c", weights[2], torch.float32)  # evicts b
    stats = unpacker.get_cache_stats()
    assert (stats["size"], stats["bytes"], stats["evictions"], stats["hits"]) == (2, 2 * entry, 1, 1)
    unpacker.get_dense("a", weights[0], torch.float32)
    assert unpacker.get_cache_stats()["hits"] == 2  # a survived
    unpacker.get_dense("b", weights[1], torch.float32)
    assert unpacker.get_cache_stats()["hits"] == 2  # b was evicted
    unpacker.set_max_cache_bytes(entry)
    assert unpacker.get_cache_stats()["size"] == 1


def test_an_entry_larger_than_the_budget_is_returned_but_not_cached():
    unpacker = INT4Unpacker(max_cache_bytes=100)
    weight = quantize_rtn(torch.randn(OUT, IN), 16)
    dense = unpacker.get_dense("big", weight)
    assert torch.equal(dense, dequantize(weight))
    assert unpacker.get_cache_stats()["size"] == 0 and unpacker.get_cache_stats()["bytes"] == 0


def test_get_dense_recomputes_for_a_different_weight_under_the_same_key():
    unpacker = INT4Unpacker()
    one, two = (quantize_rtn(torch.randn(OUT, IN), 16) for _ in range(2))
    assert torch.equal(unpacker.get_dense("k", one), dequantize(one))
    assert torch.equal(unpacker.get_dense("k", two), dequantize(two))
    assert unpacker.get_cache_stats()["size"] == 1


def test_concurrent_use_keeps_the_books_balanced():
    unpacker = INT4Unpacker(max_cache_bytes=3 * OUT * IN * 2)
    weights = [quantize_rtn(torch.randn(OUT, IN), 16) for _ in range(5)]
    errors = []

    def work(offset: int):
        try:
            for i in range(20):
                index = (i + offset) % 5
                assert torch.equal(unpacker.get_dense(index, weights[index]), dequantize(weights[index]))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = unpacker.get_cache_stats()
    assert not errors
    assert stats["hits"] + stats["misses"] == 80
    assert stats["bytes"] <= stats["max_bytes"] and stats["size"] <= 3


def test_module_level_functions_use_the_singleton():
    assert get_unpacker() is get_unpacker()
    unpacker_module.clear_cache()
    weight, modules = _modules()
    dense = unpacker_module.unpack_module(modules["awq"], "test.awq")
    assert torch.equal(dense, dequantize(weight, torch.float16))
    assert unpacker_module.is_int4_quantized(modules["awq"])
    assert unpacker_module.get_cache_stats()["size"] == 1
    packed = pack_nibbles(torch.full((2, 8), 9, dtype=torch.uint8))
    assert unpacker_module.unpack_int4_weights(packed[:, :4], torch.ones(1)).tolist() == [[1.0] * 8] * 2
    unpacker_module.clear_cache()
    assert unpacker_module.get_cache_stats()["size"] == 0
