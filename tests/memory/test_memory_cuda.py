"""The CUDA paths of the memory features (skipped without a GPU): side-stream copies, pinned tables, peak memory."""

from __future__ import annotations

import pytest
import torch
from memory_helpers import batch, int4_lora_model

from int4lora_train import memory
from int4lora_train.memory import MemoryConfig
from int4lora_train.memory.offload import enable_activation_offload

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

EAGER = {"attn_implementation": "eager"}  # deterministic kernels: runs compare bit for bit


def _cuda_model(layers: int = 4, sizes: dict | None = None):
    return int4_lora_model(layers=layers, sizes={**EAGER, **(sizes or {})}).cuda()


def _step(model, ids):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    torch.cuda.synchronize()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_offloading_on_side_streams_is_bit_exact():
    ids = batch(rows=2, tokens=64).cuda()
    reference = _step(_cuda_model(), ids)
    again = _step(_cuda_model(), ids)
    assert torch.equal(reference[0], again[0])  # the plain path is deterministic here
    model = _cuda_model()
    offloader = enable_activation_offload(model, min_bytes=0)
    offloader.trace = []
    loss, grads = _step(model, ids)
    assert offloader.stats["offloaded"] == 4 and offloader.stats["prefetched"] == 3 and offloader.stats["fetched"] == 1
    assert torch.equal(loss, reference[0])
    assert all(torch.equal(grads[n], reference[1][n]) for n in grads)


def test_offloading_is_bit_exact_where_the_allocator_reuses_the_inputs_blocks():
    """Long enough rows that every freed layer input's block is reused by a later one (the 70B / 64k NaN of the
    address-keyed dedupe); two steps, with host embeddings and the chunked MLP as the benchmarks run them."""
    sizes = {"hidden_size": 512, "intermediate_size": 1024, "max_position_embeddings": 4096}
    ids = batch(rows=1, tokens=2048).cuda()
    plain, features = _cuda_model(8, sizes), _cuda_model(8, sizes)
    report = memory.apply(features, MemoryConfig(offload_activations="on", embeddings_on_cpu="on", mlp_chunk_tokens=0))
    offloader = enable_activation_offload(features, min_bytes=0) if report["offloaded_layers"] else None
    for _ in range(2):
        expected, got = _step(plain, ids), _step(features, ids)
        assert offloader.stats["offloaded"] == 8  # the layer inputs; not the layers' or the recomputes' tensors
        assert torch.equal(got[0], expected[0])
        assert all(torch.equal(grad, expected[1][name]) for name, grad in got[1].items())
        for model in (plain, features):
            model.zero_grad(set_to_none=True)


def test_offloading_lowers_the_peak_by_the_checkpointed_inputs():
    layers, tokens, hidden = 8, 2048, 512
    sizes = {"hidden_size": hidden, "intermediate_size": 1024, "max_position_embeddings": 4096}
    ids = batch(rows=1, tokens=tokens).cuda()

    def peak(offload: bool) -> int:
        model = _cuda_model(layers, sizes)
        if offload:
            enable_activation_offload(model, min_bytes=0)
        _step(model, ids)  # warm-up: kernels, pinned buffers
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        _step(model, ids)
        return torch.cuda.max_memory_allocated()

    layer_input = tokens * hidden * 4  # fp32 hidden states (the tiny model's dtype)
    saved = peak(False) - peak(True)
    assert saved >= (layers - 3) * layer_input // 2, (saved, layer_input)


def test_host_embeddings_on_cuda_keep_a_pinned_table_and_the_same_gradients():
    ids = batch(rows=2, tokens=64).cuda()
    reference = _step(_cuda_model(), ids)
    model = _cuda_model()
    report = memory.apply(model, MemoryConfig(embeddings_on_cpu="on", offload_activations="on", mlp_chunk_tokens=0))
    assert report["embeddings_on_cpu"] and report["offloaded_layers"] == 4
    weight = model.get_input_embeddings().weight
    assert weight.device.type == "cpu" and weight.is_pinned()
    loss, grads = _step(model, ids)
    assert torch.equal(loss, reference[0])
    assert all(torch.equal(grads[n], reference[1][n]) for n in grads)


def test_the_plan_reads_the_device():
    model = _cuda_model()
    chosen = memory.plan(model, 1, 1 << 15)
    free, total = torch.cuda.mem_get_info()
    assert chosen.estimate["device_total_bytes"] == total and chosen.estimate["weights_on_device_bytes"] > 0
    assert chosen.offload_activations and chosen.mlp_chunk_tokens == memory.MLP_CHUNK_TOKENS
