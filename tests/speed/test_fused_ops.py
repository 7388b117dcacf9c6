"""Fused RMSNorm / SwiGLU against transformers' own modules (values and gradients), and which modules get patched.
The Triton kernels against the torch references: tests/kernels/test_norm_mlp.py."""

from __future__ import annotations

import pytest
import torch
from modeling_helpers import rel_diff, tiny_int4_lora_model

from int4lora_train.errors import ConfigError
from int4lora_train.modeling.tiny_models import build_tiny_model
from int4lora_train.speed.fused_ops import disable_fused_kernels, enable_fused_kernels


def _fwd_bwd(module, x: torch.Tensor):
    x = x.detach().requires_grad_(True)
    out = module(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.dtype))
    return out.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_norm_and_mlp_equal_the_modules(dtype):
    model = build_tiny_model("llama", seed=0, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.input_layernorm.weight.normal_(1.0, 0.2, generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(1)).to(dtype)
    reference = [_fwd_bwd(layer.input_layernorm, x), _fwd_bwd(layer.mlp, x)]
    assert enable_fused_kernels(model) == {"rmsnorm": 2 * 2 + 1, "swiglu": 2}
    fused = [_fwd_bwd(layer.input_layernorm, x), _fwd_bwd(layer.mlp, x)]
    exact_forward = torch.equal(fused[0][0], reference[0][0])
    assert exact_forward  # the torch path does the module's operations in the module's order
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16 gradients: one rounding, sums in another order
    for (out, grad), (ref_out, ref_grad) in zip(fused, reference):
        assert rel_diff(out, ref_out) <= tol and rel_diff(grad, ref_grad) <= tol


def test_trainable_norm_weight_falls_back_to_the_module():
    model = build_tiny_model("llama", seed=0, dtype=torch.float32)
    enable_fused_kernels(model)
    norm = model.model.norm
    x = torch.randn(3, model.config.hidden_size)
    norm(x).sum().backward()
    assert norm.weight.grad is not None  # the module's own forward ran: the weight got its gradient


def test_peft_int4_model_gradients_unchanged_by_the_patch():
    def grads(fused: bool):
        peft_model = tiny_int4_lora_model("qwen3")  # qwen3: q_norm / k_norm too
        if fused:
            counts = enable_fused_kernels(peft_model)
            assert counts["rmsnorm"] == 2 * 4 + 1 and counts["swiglu"] == 2
        tokens = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
        peft_model(input_ids=tokens, labels=tokens).loss.backward()
        return {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}

    plain, fused = grads(False), grads(True)
    assert max(rel_diff(fused[n], plain[n]) for n in plain) <= 1e-5


def test_other_layouts_are_left_alone_and_disable_restores():
    gemma = build_tiny_model("gemma2", seed=0)  # 1 + weight norms, gelu MLP
    assert enable_fused_kernels(gemma) == {"rmsnorm": 0, "swiglu": 0}
    phi3 = build_tiny_model("phi3", seed=0)  # fused gate_up_proj
    counts = enable_fused_kernels(phi3)
    assert counts["swiglu"] == 0 and counts["rmsnorm"] > 0
    assert disable_fused_kernels(phi3) == counts["rmsnorm"]
    assert all("forward" not in m.__dict__ for m in phi3.modules())
    with pytest.raises(ConfigError, match="rmsnorm must be true or false"):
        enable_fused_kernels(phi3, rmsnorm=1)
    with pytest.raises(ConfigError, match="min_elements must be"):
        enable_fused_kernels(phi3, min_elements=-1)


def test_min_elements_keeps_small_inputs_on_the_module_forward(monkeypatch):
    from int4lora_train.speed import fused_ops

    model = build_tiny_model("llama", seed=0, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    calls = []
    original = fused_ops.RMSNormFunction.apply
    monkeypatch.setattr(fused_ops.RMSNormFunction, "apply", lambda *a: calls.append(1) or original(*a))
    enable_fused_kernels(model, min_elements=10 * model.config.hidden_size)
    norm = model.model.norm
    small, large = torch.randn(9, model.config.hidden_size), torch.randn(10, model.config.hidden_size)
    assert torch.equal(norm(small), type(norm).forward(norm, small)) and calls == []
    norm(large)
    assert calls == [1]
    enable_fused_kernels(model, min_elements="auto")
    assert norm._int4lora_fused_min_elements == fused_ops.AUTO_MIN_ELEMENTS
