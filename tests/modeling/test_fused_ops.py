"""Fused RMSNorm / SwiGLU against transformers' own modules (values and gradients), the Triton kernels against the
torch references (CPU interpreter without CUDA), and which modules get patched."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from modeling_helpers import rel_diff, tiny_int4_lora_model

from int4lora_train.errors import ConfigError
from int4lora_train.modeling.fused_ops import (
    disable_fused_kernels,
    enable_fused_kernels,
    rms_norm_bwd_torch,
    rms_norm_fwd_torch,
    swiglu_bwd_torch,
    swiglu_fwd_torch,
)
from int4lora_train.modeling.tiny_models import build_tiny_model


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
    from int4lora_train.modeling import fused_ops

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


@pytest.fixture(scope="module")
def kernels():
    """The Triton kernels: compiled on CUDA, else in Triton's CPU interpreter (set before the module loads)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        from int4lora_train.modeling import triton_norm_mlp

        return triton_norm_mlp
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from int4lora_train.modeling import triton_norm_mlp

        if not triton_norm_mlp.interpreting():
            triton_norm_mlp = importlib.reload(triton_norm_mlp)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return triton_norm_mlp


def test_rms_norm_kernels_equal_torch(kernels):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 48, generator=gen) * 3).to(device)  # 48: not a power of two, masked tail
    w = (torch.rand(48, generator=gen) + 0.5).to(device)
    g = torch.randn(5, 48, generator=gen).to(device)
    ref_y, ref_rstd = rms_norm_fwd_torch(x, w, 1e-6)
    ref_dx = rms_norm_bwd_torch(g, x, w, ref_rstd)
    for _ in range(2):  # the second launch of a specialization goes straight to the compiled kernel (on CUDA)
        y, rstd = kernels.rms_norm_fwd(x, w, 1e-6)
        assert rel_diff(y, ref_y) <= 1e-6 and rel_diff(rstd, ref_rstd) <= 1e-6
        assert rel_diff(kernels.rms_norm_bwd(g, x, w, rstd), ref_dx) <= 1e-6


def test_swiglu_kernels_equal_torch(kernels):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    # 1100 columns: a partial block; gate and up as column slices of one [3, 2200] buffer, as a projection group
    # hands them over (strided rows)
    both = torch.randn(3, 2200, generator=gen).to(device) * 4
    gate, up = both[:, :1100], both[:, 1100:]
    dh = torch.randn(3, 1100, generator=gen).to(device)
    for _ in range(2):  # the second launch goes straight to the compiled kernel (on CUDA)
        assert rel_diff(kernels.swiglu_fwd(gate, up), swiglu_fwd_torch(gate, up)) <= 1e-6
        for got, ref in zip(kernels.swiglu_bwd(dh, gate, up), swiglu_bwd_torch(dh, gate, up)):
            assert rel_diff(got, ref) <= 1e-6
