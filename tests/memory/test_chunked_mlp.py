"""Chunked MLP: the decoder MLPs run on a few tokens at a time; loss and LoRA gradients stay (nearly) the same."""

from __future__ import annotations

import pytest
import torch
from memory_helpers import batch, int4_lora_model, step

from int4lora_train import memory, speed
from int4lora_train.memory import MLP_CHUNK_TOKENS, MemoryConfig
from int4lora_train.memory.chunked_mlp import chunked_mlp_tokens, disable_chunked_mlp, enable_chunked_mlp
from int4lora_train.speed import SpeedConfig
from int4lora_train.speed.fused_ops import _fused_mlp_forward


def _mlps(model):
    return [m for n, m in model.named_modules() if n.endswith(".mlp")]


@pytest.mark.parametrize("speed_features", [None, SpeedConfig(fused_kernels="on")])
def test_loss_and_lora_gradients_match_the_unchunked_mlp(speed_features):
    def run(chunk: int | None):
        model = int4_lora_model(layers=2)
        if speed_features is not None:  # fused SwiGLU and gate/up groups under the chunking
            speed.apply(model, speed_features)
        if chunk:
            assert enable_chunked_mlp(model, chunk) == 2
            calls = []
            for mlp in _mlps(model):
                inner = mlp.__dict__["_int4lora_mlp_inner"]
                mlp.__dict__["_int4lora_mlp_inner"] = lambda x, inner=inner: calls.append(x.shape[0]) or inner(x)
        loss, grads = step(model, batch(rows=2, tokens=12))
        if chunk:
            # The 24 tokens in chunks of 5, 5, 5, 5, 4 per layer: the forward; then, per layer from the last, the
            # layer's recompute (its last chunk's intermediates serve that chunk's backward), and the other chunks
            # recomputed one at a time right before their backward.
            assert calls == [5, 5, 5, 5, 4] * 2 + [5, 5, 5, 5, 4, 5, 5, 5, 5] * 2
        return loss, grads

    (ref_loss, ref_grads), (loss, grads) = run(None), run(5)
    # Not bit-exact on the CPU: a LoRA weight's gradient sums over tokens chunk by chunk (fp32 rounding).
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_short_inputs_take_the_wrapped_forward_and_disable_restores_it():
    model = int4_lora_model(layers=2)
    speed.apply(model, SpeedConfig(fused_kernels="on"))
    enable_chunked_mlp(model, 64)
    assert chunked_mlp_tokens(model) == 64
    reference = step(int4_lora_model(layers=2), batch())
    loss, _ = step(model, batch())  # 24 tokens <= 64: one call, no checkpoint
    torch.testing.assert_close(loss, reference[0], rtol=1e-6, atol=0)
    enable_chunked_mlp(model, 8)  # again: replaces, does not stack
    assert all(m.__dict__["_int4lora_mlp_inner"].__func__ is _fused_mlp_forward for m in _mlps(model))
    assert disable_chunked_mlp(model) == 2 and chunked_mlp_tokens(model) is None
    assert all(m.forward.__func__ is _fused_mlp_forward for m in _mlps(model))  # speed's patch is back
    speed.apply(model, fused_kernels="off")
    enable_chunked_mlp(model, 8)
    disable_chunked_mlp(model)
    assert all("forward" not in m.__dict__ for m in _mlps(model))


def test_no_grad_runs_chunks_without_checkpoints():
    model = int4_lora_model(layers=2)
    with torch.no_grad():
        expected = model(input_ids=batch(), use_cache=False).logits
        enable_chunked_mlp(model, 7)
        torch.testing.assert_close(model(input_ids=batch(), use_cache=False).logits, expected, rtol=1e-5, atol=1e-6)


def test_auto_chunks_long_micro_batches_only():
    model = int4_lora_model(layers=2)
    assert memory.plan(model, 1, 16 * 1024).mlp_chunk_tokens == 0
    long = memory.plan(model, 2, 16 * 1024)
    assert long.mlp_chunk_tokens == MLP_CHUNK_TOKENS and "32768 tokens" in long.reasons["mlp_chunk_tokens"]
    assert memory.plan(model, 4, 1 << 16, config=MemoryConfig(mlp_chunk_tokens=0)).mlp_chunk_tokens == 0
    report = memory.apply(model, mlp_chunk_tokens=5, offload_activations="off", embeddings_on_cpu="off")
    assert report["chunked_mlps"] == 2 and chunked_mlp_tokens(model) == 5
    memory.apply(model, mlp_chunk_tokens=0, offload_activations="off", embeddings_on_cpu="off")
    assert chunked_mlp_tokens(model) is None
