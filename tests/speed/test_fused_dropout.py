"""The LoRA dropout kernels in a model (:mod:`int4lora_train.kernels.lora_dropout`; the CPU interpreter without CUDA):

- ``fused_dropout_backward``: a tiny INT4 LoRA model with dropout, gradient checkpointing and projection groups
  gives the same loss and close LoRA gradients with the Triton dropout backward as with the torch ops;
- ``fused_dropout_forward``: the masks and A projections in one pass, from the kernel's own Philox stream, so a
  checkpoint's recompute must redraw exactly the forward's masks: a checkpointed step equals an unchecked one.

Off, or where Triton does not run, nothing changes. The kernels themselves: tests/kernels/test_lora_dropout.py."""

from __future__ import annotations

import pytest
import torch
from modeling_helpers import tiny_int4_lora_model

from int4lora_train import speed
from int4lora_train.errors import ConfigError
from int4lora_train.modeling import lora_layer, prepare_for_training
from int4lora_train.modeling.lora_layer import Int4LoraLinear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPTIONS = ("fused_dropout_backward", "fused_dropout_forward")
MEMBERS_GROUPED = [3, 1, 2, 1] * 2  # per layer of the 2: q/k/v, o, gate/up, down
MEMBERS_SINGLE = [1] * 14


@pytest.fixture
def kernel_calls(triton_kernels, monkeypatch) -> dict:
    """The Triton path on this device (compiled on CUDA, the interpreter on the CPU, where ``use_triton`` would
    say no), and the kernels' calls counted (members per call)."""
    kernels = triton_kernels.lora_dropout
    monkeypatch.setattr(lora_layer, "use_triton", lambda device: True)
    calls = {"grad_x": [], "grad_a": [], "forward": []}
    for name, key in (
        ("add_dropped_lora_grad_x", "grad_x"),
        ("dropped_lora_grad_a", "grad_a"),
        ("dropped_lora_projection", "forward"),
    ):
        original = getattr(kernels, name)

        def counted(*args, _original=original, _key=key):
            calls[_key].append(len(args[-2]))  # the ranks: one per member
            return _original(*args)

        monkeypatch.setattr(kernels, name, counted)
    return calls


def _step(*, backward=False, forward=False, checkpointing=True, groups=True, autocast=False, dropout=0.1):
    """Loss and LoRA gradients of one step of a 2-layer Llama with LoRA dropout on every projection (the global RNG
    seeded before the forward)."""
    model = tiny_int4_lora_model("llama", lora_dropout=dropout).to(DEVICE)
    report = speed.apply(
        model, fused_dropout_backward=backward, fused_dropout_forward=forward, group_projections=groups,
        cuda_graphs="off",
    )  # fmt: skip
    assert report["groups"] == (4 if groups else 0)
    layers = [m for m in model.modules() if isinstance(m, Int4LoraLinear)]
    assert all(m.fused_dropout_backward is backward and m.fused_dropout_forward is forward for m in layers)
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
def test_backward_kernels_keep_the_loss_and_lora_gradients_close(kernel_calls, autocast, groups):
    ref_loss, ref_grads = _step(autocast=autocast, groups=groups)
    assert kernel_calls == {"grad_x": [], "grad_a": [], "forward": []}  # off: the torch ops
    loss, grads = _step(backward=True, autocast=autocast, groups=groups)
    members = MEMBERS_GROUPED if groups else MEMBERS_SINGLE
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


@pytest.mark.parametrize("groups", [True, False], ids=["groups", "single"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_the_forward_kernel_is_redrawn_alike_by_the_recompute(kernel_calls, groups, autocast):
    """With checkpointing the recompute runs the kernel again (from the restored generator): the gradients are those
    of the same step without checkpointing, whose backward uses the forward's own masks."""
    loss, grads = _step(forward=True, backward=True, groups=groups, autocast=autocast)
    members = MEMBERS_GROUPED if groups else MEMBERS_SINGLE
    assert sorted(kernel_calls["forward"]) == sorted(members * 2)  # forward and recompute
    kernel_calls["forward"].clear()
    plain_loss, plain_grads = _step(forward=True, backward=True, checkpointing=False, groups=groups, autocast=autocast)
    assert sorted(kernel_calls["forward"]) == sorted(members)
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys() and len(grads) == 2 * 7 * 2
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_forward_kernel_draws_other_masks_than_native_dropout(kernel_calls):
    """Another mask stream (the losses differ from the torch path's, not by much); without dropout no kernel runs
    and nothing changes."""
    fused_loss, _ = _step(forward=True)
    torch_loss, _ = _step()
    assert not torch.equal(fused_loss, torch_loss)
    assert abs(fused_loss.item() - torch_loss.item()) < 0.05 * abs(torch_loss.item())
    kernel_calls["forward"].clear()
    no_dropout = _step(forward=True, backward=True, dropout=0.0)[0]
    assert torch.equal(no_dropout, _step(dropout=0.0)[0])
    assert kernel_calls == {"grad_x": [], "grad_a": [], "forward": []}


@pytest.mark.parametrize("option", OPTIONS)
def test_without_triton_the_switches_change_nothing(triton_kernels, monkeypatch, option):
    """Where ``use_triton`` says no (the CPU, a device without Triton) the torch ops run: bit-identical."""
    monkeypatch.setattr(lora_layer, "use_triton", lambda device: False)
    ref_loss, ref_grads = _step(autocast=True)
    loss, grads = _step(autocast=True, **{option.removeprefix("fused_dropout_"): True})
    assert torch.equal(loss, ref_loss)
    if DEVICE == "cpu":
        assert all(torch.equal(grads[n], ref_grads[n]) for n in grads)
    else:  # CUDA's flash-attention backward sums dq with atomics: run-to-run last-bit noise, switches or not
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-3, atol=1e-6, msg=name)


def test_the_backward_kernels_are_chosen_only_when_on_and_triton_runs(monkeypatch):
    torch_pair = (lora_layer.add_dropped_lora_grad_x_torch, lora_layer.dropped_lora_grad_a_torch)
    cpu = torch.device("cpu")
    assert lora_layer.dropout_backward_kernels(False, cpu) == torch_pair
    monkeypatch.setattr(lora_layer, "use_triton", lambda device: False)
    assert lora_layer.dropout_backward_kernels(True, cpu) == torch_pair
    pytest.importorskip("triton")
    monkeypatch.setattr(lora_layer, "use_triton", lambda device: True)
    assert lora_layer.dropout_backward_kernels(False, cpu) == torch_pair
    assert lora_layer.dropout_backward_kernels(True, cpu)[0].__name__ == "add_dropped_lora_grad_x"


@pytest.mark.parametrize(("option", "default"), [(OPTIONS[0], True), (OPTIONS[1], False)])
def test_speed_config_defaults_and_checked_values(option, default):
    assert getattr(speed.SpeedConfig(), option) is default
    model = tiny_int4_lora_model("llama", lora_dropout=0.1)
    layers = [m for m in model.modules() if isinstance(m, Int4LoraLinear)]
    assert layers and not any(getattr(m, option) for m in layers)  # a layer speed.apply has not seen
    speed.apply(model)
    assert all(getattr(m, option) is default for m in layers)
    speed.apply(model, **{option: not default})
    assert all(getattr(m, option) is (not default) for m in layers)
    with pytest.raises(ConfigError, match=option):
        speed.apply(model, **{option: "on"})


def test_without_dropout_the_switches_are_not_passed_on(kernel_calls):
    """p = 0: no masks, nothing for the kernels (the call says so too)."""
    model = tiny_int4_lora_model("llama", lora_dropout=0.0).to(DEVICE)
    speed.apply(model, fused_dropout_backward=True, fused_dropout_forward=True)
    prepare_for_training(model, gradient_checkpointing=True, use_reentrant=False)
    model.train()
    tokens = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    model(input_ids=tokens, labels=tokens).loss.backward()
    assert kernel_calls == {"grad_x": [], "grad_a": [], "forward": []}


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("on", [False, True])
def test_the_trainer_passes_train_speed_dropout_options(tmp_path, option, on):
    from int4lora_train.train.config import SpeedConfig, TrainConfig
    from int4lora_train.train.module import LoraModule
    from int4lora_train.train.trainer import Trainer

    config = TrainConfig(micro_batch_size=1, max_steps=1, speed=SpeedConfig(**{option: on}))
    trainer = Trainer(config, run_dir=tmp_path / "run", device="cpu", tensorboard=False, progress_bar=False)
    module = LoraModule(tiny_int4_lora_model("llama", lora_dropout=0.1), config)
    trainer.prepare_model(module, [], 1)
    layers = [m for m in module.unwrapped_model.modules() if isinstance(m, Int4LoraLinear)]
    assert len(layers) == 14 and all(getattr(m, option) is on for m in layers)
