"""``fused_dropout_forward`` in a model: the LoRA dropout masks and A projections of the fused nodes in one Triton
pass (:func:`int4lora_train.kernels.lora_dropout.dropped_lora_projection`; the CPU interpreter without CUDA). Its
masks come from its own Philox stream, so a checkpoint's recompute must redraw exactly the forward's: a checkpointed
step equals an unchecked one. Off, or where Triton does not run, nothing changes. The kernel itself:
tests/kernels/test_lora_dropout.py."""

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
def projection_calls(triton_kernels, monkeypatch) -> list[int]:
    """The Triton path on this device (the interpreter on the CPU), and the kernel's calls counted (members each)."""
    kernels = triton_kernels.lora_dropout
    monkeypatch.setattr(lora_layer, "use_triton", lambda device: True)
    calls: list[int] = []
    original = kernels.dropped_lora_projection

    def counted(x2, a_cat, ranks, p):
        calls.append(len(ranks))
        return original(x2, a_cat, ranks, p)

    monkeypatch.setattr(kernels, "dropped_lora_projection", counted)
    return calls


def _step(fused: bool, *, checkpointing: bool = True, groups: bool = True, autocast: bool = False, dropout=0.1):
    """Loss and LoRA gradients of one step of a 2-layer Llama with LoRA dropout on every projection (the global RNG
    seeded before the forward)."""
    model = tiny_int4_lora_model("llama", lora_dropout=dropout).to(DEVICE)
    speed.apply(model, fused_dropout_forward=fused, group_projections=groups, cuda_graphs="off")
    assert all(m.fused_dropout_forward is fused for m in model.modules() if isinstance(m, Int4LoraLinear))
    prepare_for_training(model, gradient_checkpointing=checkpointing, use_reentrant=False)
    model.train()
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    torch.manual_seed(5)  # the dropout masks
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("groups", [True, False], ids=["groups", "single"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_the_recompute_redraws_the_forward_masks(projection_calls, groups, autocast):
    """With checkpointing the recompute runs the kernel again (from the restored generator): the gradients are those
    of the same step without checkpointing, whose backward uses the forward's own masks."""
    loss, grads = _step(True, checkpointing=True, groups=groups, autocast=autocast)
    members = [3, 1, 2, 1] * 2 if groups else [1] * 14  # per layer: q/k/v, o, gate/up, down
    assert sorted(projection_calls) == sorted(members * 2)  # forward and recompute
    projection_calls.clear()
    plain_loss, plain_grads = _step(True, checkpointing=False, groups=groups, autocast=autocast)
    assert sorted(projection_calls) == sorted(members)
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys() and len(grads) == 2 * 7 * 2
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_it_draws_other_masks_than_native_dropout_and_keeps_the_rate(projection_calls):
    """Another mask stream (the losses differ from the torch path's), the same model otherwise: without dropout the
    kernel is not called and nothing changes."""
    fused_loss, _ = _step(True)
    torch_loss, _ = _step(False)
    assert not torch.equal(fused_loss, torch_loss)
    assert abs(fused_loss.item() - torch_loss.item()) < 0.05 * abs(torch_loss.item())
    projection_calls.clear()
    assert torch.equal(_step(True, dropout=0.0)[0], _step(False, dropout=0.0)[0]) and projection_calls == []


def test_without_triton_the_switch_changes_nothing(triton_kernels, monkeypatch):
    """Where ``use_triton`` says no (the CPU, a device without Triton) native_dropout runs: bit-identical."""
    monkeypatch.setattr(lora_layer, "use_triton", lambda device: False)
    ref_loss, ref_grads = _step(False, autocast=True)
    loss, grads = _step(True, autocast=True)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(grads[n], ref_grads[n]) for n in grads)


def test_speed_config_default_is_off_and_the_value_is_checked():
    assert speed.SpeedConfig().fused_dropout_forward is False
    model = tiny_int4_lora_model("llama", lora_dropout=0.1)
    speed.apply(model, fused_dropout_forward=True)
    assert all(m.fused_dropout_forward for m in model.modules() if isinstance(m, Int4LoraLinear))
    speed.apply(model)
    assert not any(m.fused_dropout_forward for m in model.modules() if isinstance(m, Int4LoraLinear))
    with pytest.raises(ConfigError, match="fused_dropout_forward"):
        speed.apply(model, fused_dropout_forward="on")


@pytest.mark.parametrize("on", [False, True])
def test_the_trainer_passes_train_speed_fused_dropout_forward(tmp_path, on):
    from int4lora_train.train.config import SpeedConfig, TrainConfig
    from int4lora_train.train.module import LoraModule
    from int4lora_train.train.trainer import Trainer

    config = TrainConfig(micro_batch_size=1, max_steps=1, speed=SpeedConfig(fused_dropout_forward=on))
    trainer = Trainer(config, run_dir=tmp_path / "run", device="cpu", tensorboard=False, progress_bar=False)
    module = LoraModule(tiny_int4_lora_model("llama", lora_dropout=0.1), config)
    trainer.prepare_model(module, [], 1)
    layers = [m for m in module.unwrapped_model.modules() if isinstance(m, Int4LoraLinear)]
    assert len(layers) == 14 and all(m.fused_dropout_forward is on for m in layers)
