"""Fused RoPE in a model: the patched ``apply_rotary_pos_emb`` gives the same loss and LoRA gradients bit for bit,
which modules get patched, reference counting, and the inputs handed back to transformers' function. The kernels
themselves: tests/kernels/test_rope.py."""

from __future__ import annotations

import gc

import pytest
import torch
import transformers.models.llama.modeling_llama as modeling_llama
import transformers.models.phi3.modeling_phi3 as modeling_phi3
from peft import LoraConfig, get_peft_model

from int4lora_train import speed
from int4lora_train.errors import ConfigError
from int4lora_train.modeling import prepare_for_training, quantize_model_rtn
from int4lora_train.modeling.tiny_models import build_tiny_model
from int4lora_train.speed import SpeedConfig, fused_rope
from int4lora_train.speed.fused_rope import disable_fused_rope, enable_fused_rope, fused_rope_modules

LLAMA = "transformers.models.llama.modeling_llama"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels: compiled on CUDA, interpreted on the CPU
ORIGINAL = modeling_llama.apply_rotary_pos_emb


@pytest.fixture(autouse=True)
def _nothing_stays_patched():
    yield
    assert fused_rope_modules() == [] and modeling_llama.apply_rotary_pos_emb is ORIGINAL


@pytest.fixture
def fused_calls(monkeypatch) -> list:
    """The fused node's calls (one per ``apply`` that took the fused path)."""
    calls = []
    apply = fused_rope.RotaryEmbeddingFunction.apply
    monkeypatch.setattr(fused_rope.RotaryEmbeddingFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


@pytest.fixture
def kernels_on_this_device(triton_kernels, monkeypatch):
    """The Triton path on this device: compiled on CUDA, Triton's interpreter on the CPU (where ``use_triton``
    would otherwise pick transformers' function)."""
    monkeypatch.setattr(fused_rope, "use_triton", lambda device: True)
    return triton_kernels.rope


def _int4_lora_model(dtype: torch.dtype):
    """A tiny Llama (2 layers, 4 q / 2 k heads, head dim 32) in ``dtype``, INT4, LoRA on every projection, prepared
    for training with gradient checkpointing (the recompute calls RoPE again)."""
    model = build_tiny_model("llama", seed=0, dtype=dtype)
    quantize_model_rtn(model, 32, symmetric=False)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    for name, param in sorted(peft_model.named_parameters()):
        if "lora_B" in name:
            param.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(sum(map(ord, name))))
    prepare_for_training(peft_model, gradient_checkpointing=True, use_reentrant=False)
    return peft_model.to(DEVICE)


def _loss_and_grads(peft_model, rope: bool):
    # q/k/v grouped: q and k are column slices; no layer graphs (their captures would call RoPE more often)
    report = speed.apply(peft_model, SpeedConfig(fused_rope=rope, cuda_graphs="off"))
    assert report["fused_rope"] == int(rope)
    peft_model.train()
    tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)  # odd length
    try:
        loss = peft_model(input_ids=tokens, labels=tokens, use_cache=False).loss
        loss.backward()
    finally:
        disable_fused_rope(peft_model)
    return loss.detach(), {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_training_step_is_bit_identical(kernels_on_this_device, fused_calls, dtype):
    ref_loss, ref_grads = _loss_and_grads(_int4_lora_model(dtype), rope=False)
    assert fused_calls == []
    loss, grads = _loss_and_grads(_int4_lora_model(dtype), rope=True)
    assert len(fused_calls) == 2 * 2  # 2 layers, forward and checkpoint recompute
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7 * 2
    assert all(torch.equal(grads[n], ref_grads[n]) for n in grads)


def test_standard_modules_are_patched_and_disable_restores():
    model = build_tiny_model("llama", seed=0)
    assert enable_fused_rope(model) == [LLAMA]
    assert modeling_llama.apply_rotary_pos_emb is not ORIGINAL
    assert modeling_llama.apply_rotary_pos_emb.__wrapped__ is ORIGINAL
    assert enable_fused_rope(model) == [LLAMA]  # twice: no second reference
    assert disable_fused_rope(model) == [LLAMA]
    assert modeling_llama.apply_rotary_pos_emb is ORIGINAL
    assert disable_fused_rope(model) == []


def test_other_rope_functions_are_left_alone():
    original = modeling_phi3.apply_rotary_pos_emb  # partial rotary inside the function: not the standard one
    phi3 = build_tiny_model("phi3", seed=0)
    assert not fused_rope.has_standard_rope(modeling_phi3) and fused_rope.has_standard_rope(modeling_llama)
    assert enable_fused_rope(phi3) == [] and modeling_phi3.apply_rotary_pos_emb is original
    assert disable_fused_rope(phi3) == []


def test_patches_are_reference_counted_over_models():
    first, second = build_tiny_model("llama", seed=0), build_tiny_model("llama", seed=1)
    enable_fused_rope(first)
    enable_fused_rope(second)
    patched = modeling_llama.apply_rotary_pos_emb
    disable_fused_rope(first)
    assert modeling_llama.apply_rotary_pos_emb is patched  # the second model still uses it
    enable_fused_rope(first)
    disable_fused_rope(second)
    assert modeling_llama.apply_rotary_pos_emb is patched
    disable_fused_rope(first)
    assert modeling_llama.apply_rotary_pos_emb is ORIGINAL
    forgotten = build_tiny_model("llama", seed=0)
    enable_fused_rope(forgotten)
    del forgotten
    gc.collect()  # a model freed while enabled releases its reference
    assert modeling_llama.apply_rotary_pos_emb is ORIGINAL


def _rope_inputs(dtype=torch.bfloat16, dim=32, device=DEVICE):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 4, dim, generator=gen).to(dtype).to(device).transpose(1, 2)
    k = torch.randn(2, 5, 2, dim, generator=gen).to(dtype).to(device).transpose(1, 2)
    cos = torch.randn(2, 5, dim, generator=gen).to(dtype).to(device)
    sin = torch.randn(2, 5, dim, generator=gen).to(dtype).to(device)
    return q, k, cos, sin


def test_inputs_it_does_not_handle_go_to_the_original(kernels_on_this_device, fused_calls):
    model = build_tiny_model("llama", seed=0)
    enable_fused_rope(model)
    try:
        fused = modeling_llama.apply_rotary_pos_emb
        q, k, cos, sin = _rope_inputs()
        assert all(torch.equal(a, b) for a, b in zip(fused(q, k, cos, sin), ORIGINAL(q, k, cos, sin)))
        assert len(fused_calls) == 1
        unhandled = [
            (q.transpose(1, 2), k.transpose(1, 2), cos, sin, 2),  # [B, T, H, D] with unsqueeze_dim=2
            (q, k, cos.float(), sin.float(), 1),  # cos / sin in another dtype: fp32 results
            (q[..., :31], k[..., :31], cos[..., :31], sin[..., :31], 1),  # odd head dim
            (q, k, cos.clone().requires_grad_(True), sin, 1),  # a gradient for cos
            (*_rope_inputs(torch.float64), 1),  # a dtype without a kernel
            (q[:1], k, cos, sin, 1),  # batch sizes that differ
        ]
        for case in unhandled:
            want = ORIGINAL(*case)
            got = fused(*case)
            assert all(g.dtype == w.dtype and torch.equal(g, w) for g, w in zip(got, want))
        assert len(fused_calls) == 1
    finally:
        disable_fused_rope(model)


def test_cpu_without_the_interpreter_keeps_the_original(fused_calls):
    model = build_tiny_model("llama", seed=0)
    enable_fused_rope(model)
    try:
        q, k, cos, sin = _rope_inputs(device="cpu")
        got = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
        assert all(torch.equal(a, b) for a, b in zip(got, ORIGINAL(q, k, cos, sin)))
        assert fused_calls == []  # use_triton: no Triton for CPU tensors
    finally:
        disable_fused_rope(model)


def test_speed_apply_switches_it_and_checks_the_value():
    model = build_tiny_model("llama", seed=0)
    assert speed.apply(model, fused_rope=True)["fused_rope"] == 1
    assert speed.apply(model, fused_rope=True)["fused_rope"] == 1  # again: still one reference
    assert speed.apply(model, SpeedConfig())["fused_rope"] == 1  # the default is on
    assert speed.apply(model, fused_rope=False)["fused_rope"] == 0
    assert modeling_llama.apply_rotary_pos_emb is ORIGINAL
    with pytest.raises(ConfigError, match="fused_rope must be true or false"):
        speed.apply(model, fused_rope="on")
