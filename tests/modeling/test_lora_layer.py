"""Int4LoraLinear's fused INT4 + LoRA autograd node against PEFT's generic path and a hand-written reference; when it
falls back; gradient checkpointing (reentrant and not) with dropout; the dense weight kept for backward in a
recompute. PEFT registration and the options the layer refuses: test_peft.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from modeling_helpers import rel_diff, tiny_int4_lora_model
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from int4lora_train.kernels.dequantizer import TorchDequantizer
from int4lora_train.modeling import Int4Linear, Int4LoraLinear, lora_layer, prepare_for_training
from int4lora_train.modeling.int4_linear import dense_save_is_transient
from int4lora_train.modeling.lora_layer import dropout_with_mask
from int4lora_train.quant.packer import quantize_rtn

IN, OUT, R = 64, 48, 8


class _Wrapper(nn.Module):
    """One Int4Linear as ``proj`` so that get_peft_model can target it."""

    def __init__(self, bias: bool = False):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        weight = quantize_rtn(torch.randn(OUT, IN, generator=gen), group_size=16, symmetric=False)
        self.proj = Int4Linear(weight, bias=torch.randn(OUT, generator=gen) if bias else None)
        # PEFT reads the device of the model's first parameter; an INT4 layer without bias has none.
        self.norm = nn.LayerNorm(IN)

    def forward(self, x):
        return self.proj(x)


def _lora_layer(dropout: float = 0.0, bias: bool = False, rslora: bool = False) -> Int4LoraLinear:
    model = get_peft_model(
        _Wrapper(bias), LoraConfig(r=R, lora_alpha=16, target_modules=["proj"], lora_dropout=dropout, use_rslora=rslora)
    )
    layer = model.base_model.model.proj
    gen = torch.Generator().manual_seed(1)
    for name in layer.lora_B:
        layer.lora_B[name].weight.data.copy_(torch.randn(OUT, R, generator=gen) * 0.1)
    return layer


def _x(seed: int = 2, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(seed), dtype=dtype).requires_grad_(True)


def _run(layer: nn.Module, x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and gradients (input, adapter parameters, trainable bias) of ``sum(out * fixed weights)``."""
    for p in layer.parameters():
        p.grad = None
    x = x.detach().requires_grad_(True)
    torch.manual_seed(seed)
    out = layer(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    (out * weights).sum().backward()
    grads = {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters() if p.grad is not None}}
    return out, grads


def _count_fused(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = lora_layer.Int4LoraFunction.apply
    monkeypatch.setattr(lora_layer.Int4LoraFunction, "apply", lambda *a: calls.append(1) or original(*a))
    return calls


def _count_dequant(monkeypatch) -> list[int]:
    """Counts the dense weights made by the layers' dequantizers (the tiny models run on the CPU: torch)."""
    calls: list[int] = []
    original = TorchDequantizer.__call__
    monkeypatch.setattr(TorchDequantizer, "__call__", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rslora", [False, True])
def test_fused_equals_peft_generic_path_fp32(bias, rslora, monkeypatch):
    layer = _lora_layer(bias=bias, rslora=rslora)
    if bias:
        layer.get_base_layer().bias.requires_grad_(True)
    calls = _count_fused(monkeypatch)
    fused_out, fused_grads = _run(layer, _x())
    assert calls == [1]
    layer.fused_lora = False
    ref_out, ref_grads = _run(layer, _x())
    assert calls == [1]  # the generic path did not call the fused node
    assert rel_diff(fused_out, ref_out) <= 1e-5
    assert (
        set(fused_grads)
        == set(ref_grads)
        == {"x", "lora_A.default.weight", "lora_B.default.weight"} | ({"base_layer.bias"} if bias else set())
    )
    for name in ref_grads:
        assert rel_diff(fused_grads[name], ref_grads[name]) <= 1e-5, name


def test_fused_dropout_equals_reference_with_the_same_mask():
    p = 0.25
    layer = _lora_layer(dropout=p)
    x = _x()
    out, grads = _run(layer, x, seed=7)
    torch.manual_seed(7)
    mask = dropout_with_mask(x.reshape(-1, IN), p)[1].reshape(x.shape)
    assert 0 < mask.float().mean().item() < 1

    # The same function written with plain autograd ops on a dense copy of the base.
    xr = x.detach().requires_grad_(True)
    a = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
    b = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
    dense = layer.get_base_layer().dequantize(torch.float32)
    ref = F.linear(xr, dense) + F.linear(F.linear(xr * mask / (1 - p), a), b) * layer.scaling["default"]
    (ref * torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
    assert rel_diff(out, ref) <= 1e-5
    assert rel_diff(grads["x"], xr.grad) <= 1e-5
    assert rel_diff(grads["lora_A.default.weight"], a.grad) <= 1e-5
    assert rel_diff(grads["lora_B.default.weight"], b.grad) <= 1e-5


def test_dropout_is_off_in_eval_mode():
    layer = _lora_layer(dropout=0.5)
    layer.eval()
    first, _ = _run(layer, _x(), seed=0)
    second, _ = _run(layer, _x(), seed=1)
    assert torch.equal(first, second)


def test_falls_back_with_two_active_adapters_or_adapters_disabled(monkeypatch):
    layer = _lora_layer()
    layer.update_layer("other", R, lora_alpha=8, config=LoraConfig(r=R, lora_alpha=8, target_modules=["proj"]))
    layer.lora_B["other"].weight.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
    calls = _count_fused(monkeypatch)
    layer.set_adapter(["default", "other"])
    both, _ = _run(layer, _x())
    assert calls == []  # two adapters: PEFT's generic path
    layer.set_adapter("default")
    _run(layer, _x())
    assert calls == [1]
    layer.enable_adapters(False)
    base_only, _ = _run(layer, _x())
    assert calls == [1]
    assert torch.equal(base_only, layer.get_base_layer()(_x()))
    assert rel_diff(both, base_only) > 1e-2  # the adapters were applied


def test_falls_back_when_adapter_dtype_differs_outside_autocast(monkeypatch):
    layer = _lora_layer()
    layer.get_base_layer().compute_dtype = torch.bfloat16  # base in bf16, adapters in fp32: PEFT mixes dtypes
    calls = _count_fused(monkeypatch)
    out, _ = _run(layer, _x())
    assert calls == [] and out.dtype == torch.float32


def test_autocast_bf16_matches_generic_path_and_keeps_fp32_adapter_grads():
    layer = _lora_layer()
    results = []
    for fused in (True, False):
        layer.fused_lora = fused
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, grads = _run(layer, _x())
        results.append((out, grads))
    (fused_out, fused_grads), (ref_out, ref_grads) = results
    assert fused_out.dtype == ref_out.dtype == torch.bfloat16
    assert fused_grads["lora_A.default.weight"].dtype == torch.float32
    assert fused_grads["lora_B.default.weight"].dtype == torch.float32
    scale = ref_out.float().abs().max().item()
    assert rel_diff(fused_out, ref_out) <= 2e-2 * scale
    for name in ref_grads:
        ref = ref_grads[name].float()
        assert rel_diff(fused_grads[name], ref) <= 2e-2 * ref.abs().max().item(), name


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointing_with_dropout_gives_the_same_grads_and_dequantizes_twice(use_reentrant, monkeypatch):
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    layers = 2 * 7  # tiny llama: 2 decoder layers of 7 projections

    def grads(checkpointing: bool, keep_dense: bool = True):
        peft_model = tiny_int4_lora_model(lora_dropout=0.1)
        for module in peft_model.modules():
            if isinstance(module, Int4Linear):
                module.keep_dense_for_backward = keep_dense
        prepare_for_training(peft_model, gradient_checkpointing=checkpointing, use_reentrant=use_reentrant)
        peft_model.train()
        calls = _count_dequant(monkeypatch)
        torch.manual_seed(11)  # dropout masks
        peft_model(tokens, labels=tokens).loss.backward()
        monkeypatch.undo()
        return {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}, len(calls)

    plain, plain_calls = grads(False)
    kept, kept_calls = grads(True)
    redone, redone_calls = grads(True, keep_dense=False)
    # Without checkpointing layer 0's q/k/v see the embeddings' output, which needs no gradient: no grad_x, no
    # backward dequantization. gradient_checkpointing_enable makes it require one (enable_input_require_grads).
    assert plain_calls == layers + (layers - 3)  # forward + backward
    assert kept_calls == 2 * layers  # forward + recompute; the backward used the recompute's dense weight
    assert redone_calls == 3 * layers  # forward + recompute + backward
    for other in (kept, redone):
        assert set(other) == set(plain) and all(g is not None for g in other.values())
        assert max(rel_diff(plain[n], other[n]) for n in plain) <= 1e-6


def test_dense_save_is_transient_only_under_checkpointing():
    seen = {}

    def probe(tag):
        def fn(x):
            seen.setdefault(tag, []).append(dense_save_is_transient())
            return x.sin()

        return fn

    x = torch.randn(4, requires_grad=True)
    probe("plain")(x).sum().backward()
    checkpoint(probe("non_reentrant"), x, use_reentrant=False).sum().backward()
    checkpoint(probe("reentrant"), x, use_reentrant=True).sum().backward()
    with torch.autograd.graph.save_on_cpu():
        probe("offload")(x).sum().backward()
    assert seen["plain"] == [False]
    assert seen["non_reentrant"] == [True, True]  # the hook drops what the first forward saves; then the recompute
    assert seen["reentrant"][1] is True  # the recompute (the first forward ran under no_grad)
    assert seen["offload"] == [False]


def test_fused_path_reads_int4_tensors_registered_as_parameters():
    """FSDP sharding (train.distributed) re-registers the INT4 buffers as frozen parameters of the same names."""
    layer = _lora_layer()
    reference, _ = _run(layer, _x())
    base = layer.get_base_layer()
    for name in ("packed", "scales", "zero_points", "g_idx"):  # all of them, as train.distributed does
        if base._buffers.get(name) is not None:
            base._parameters[name] = nn.Parameter(base._buffers.pop(name), requires_grad=False)
    out, _ = _run(layer, _x())
    assert torch.equal(out, reference)
