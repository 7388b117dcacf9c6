"""``fused_dropout_backward`` in a model: a tiny INT4 LoRA model with dropout, gradient checkpointing and projection
groups gives the same loss and close LoRA gradients with the Triton dropout backward
(:mod:`int4lora_train.kernels.lora_dropout`, the CPU interpreter without CUDA) as with the torch ops; off, or where
Triton does not run, nothing changes. The kernels themselves: tests/kernels/test_lora_dropout.py."""

from __future__ import annotations

import pytest
import torch
from modeling_helpers import tiny_int4_lora_model

from int4lora_train import speed
from int4lora_train.errors import ConfigError
from int4lora_train.modeling import lora_layer, prepare_for_training
from int4lora_train.modeling.lora_layer import Int4LoraLinear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernel_calls(triton_kernels, monkeypatch) -> dict:
    """The Triton path on this device (compiled on CUDA, the interpreter on the CPU, where ``use_triton`` would
    say no), and the kernels' calls counted."""
    kernels = triton_kernels.lora_dropout
    monkeypatch.setattr(lora_layer, "use_triton", lambda device: True)
    calls = {"grad_x": [], "grad_a": []}
    for name, key in (("add_dropped_lora_grad_x", "grad_x"), ("dropped_lora_grad_a", "grad_a")):
        original = getattr(kernels, name)

        def counted(*args, _original=original, _key=key):
            calls[_key].append(len(args[-2]))  # the members
            return _original(*args)

        monkeypatch.setattr(kernels, name, counted)
    return calls


def _step(fused: bool, autocast: bool, *, groups: bool = True):
    """Loss and LoRA gradients of one checkpointed step of a 2-layer Llama with LoRA dropout 0.1 on every
    projection (the same masks each time: the global RNG seeded before the forward)."""
    model = tiny_int4_lora_model("llama", lora_dropout=0.1).to(DEVICE)
    report = speed.apply(model, fused_dropout_backward=fused, group_projections=groups, cuda_graphs="off")
    assert report["groups"] == (4 if groups else 0)
    assert all(m.fused_dropout_backward is fused for m in model.modules() if isinstance(m, Int4LoraLinear))
    prepare_for_training(model, gradient_checkpointing=True, use_reentrant=False)
    model.train()
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    torch.manual_seed(5)  # the dropout masks
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("groups", [True, False], ids=["groups", "single"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_loss_is_equal_and_lora_gradients_are_close(kernel_calls, autocast, groups):
    ref_loss, ref_grads = _step(False, autocast, groups=groups)
    assert kernel_calls == {"grad_x": [], "grad_a": []}  # off: the torch ops
    loss, grads = _step(True, autocast, groups=groups)
    # 2 layers: groups q/k/v (3 members) and gate/up (2) and o / down alone; else 7 projections alone
    members = [3, 1, 2, 1] * 2 if groups else [1] * 14
    assert sorted(kernel_calls["grad_a"]) == sorted(members)
    assert sorted(kernel_calls["grad_x"]) == sorted(members)
    assert torch.equal(loss, ref_loss)  # the forward is untouched
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7 * 2
    for name, grad in grads.items():
        ref = ref_grads[name]
        peak = ref.abs().max().item()
        assert peak > 0, name
        # fp32: summation order; bf16: the torch ops round each product, dropout and sum (and grad_A) to bf16
        rtol, atol = (1e-4, 1e-5 * peak) if not autocast else (3e-2, 3e-2 * peak)
        torch.testing.assert_close(grad, ref, rtol=rtol, atol=atol, msg=name)


def test_without_triton_the_switch_changes_nothing(triton_kernels, monkeypatch):
    """Where ``use_triton`` says no (the CPU, a device without Triton) the torch ops run: bit-identical."""
    monkeypatch.setattr(lora_layer, "use_triton", lambda device: False)
    ref_loss, ref_grads = _step(False, autocast=True)
    loss, grads = _step(True, autocast=True)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(grads[n], ref_grads[n]) for n in grads)


def test_the_kernels_are_chosen_only_when_on_and_triton_runs(monkeypatch):
    torch_pair = (lora_layer.add_dropped_lora_grad_x_torch, lora_layer.dropped_lora_grad_a_torch)
    cpu = torch.device("cpu")
    assert lora_layer.dropout_backward_kernels(False, cpu) == torch_pair
    monkeypatch.setattr(lora_layer, "use_triton", lambda device: False)
    assert lora_layer.dropout_backward_kernels(True, cpu) == torch_pair
    pytest.importorskip("triton")
    monkeypatch.setattr(lora_layer, "use_triton", lambda device: True)
    assert lora_layer.dropout_backward_kernels(False, cpu) == torch_pair
    assert lora_layer.dropout_backward_kernels(True, cpu)[0].__name__ == "add_dropped_lora_grad_x"


def test_speed_config_default_is_on_and_the_value_is_checked():
    assert speed.SpeedConfig().fused_dropout_backward is True
    model = tiny_int4_lora_model("llama", lora_dropout=0.1)
    layers = [m for m in model.modules() if isinstance(m, Int4LoraLinear)]
    assert layers and not any(m.fused_dropout_backward for m in layers)  # a layer speed.apply has not seen
    speed.apply(model)
    assert all(m.fused_dropout_backward for m in layers)
    speed.apply(model, fused_dropout_backward=False)
    assert not any(m.fused_dropout_backward for m in layers)
    with pytest.raises(ConfigError, match="fused_dropout_backward"):
        speed.apply(model, fused_dropout_backward="on")


def test_without_dropout_the_switch_is_not_passed_on(kernel_calls):
    """p = 0: no masks, nothing for the kernels (the call says so too)."""
    model = tiny_int4_lora_model("llama", lora_dropout=0.0)
    speed.apply(model, fused_dropout_backward=True)
    prepare_for_training(model, gradient_checkpointing=True, use_reentrant=False)
    model.train()
    tokens = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(2))
    model(input_ids=tokens, labels=tokens).loss.backward()
    assert kernel_calls == {"grad_x": [], "grad_a": []}


@pytest.mark.parametrize("on", [False, True])
def test_the_trainer_passes_train_speed_fused_dropout_backward(tmp_path, on):
    from int4lora_train.train.config import SpeedConfig, TrainConfig
    from int4lora_train.train.module import LoraModule
    from int4lora_train.train.trainer import Trainer

    config = TrainConfig(micro_batch_size=1, max_steps=1, speed=SpeedConfig(fused_dropout_backward=on))
    trainer = Trainer(config, run_dir=tmp_path / "run", device="cpu", tensorboard=False, progress_bar=False)
    module = LoraModule(tiny_int4_lora_model("llama", lora_dropout=0.1), config)
    trainer.prepare_model(module, [], 1)
    layers = [m for m in module.unwrapped_model.modules() if isinstance(m, Int4LoraLinear)]
    assert len(layers) == 14 and all(m.fused_dropout_backward is on for m in layers)
