"""Lean recompute (int4lora_train.speed.lean_recompute): the checkpoint recompute leaves the down projection's output
uncomputed, and every gradient stays bit-identical."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from modeling_helpers import tiny_int4_lora_model

from int4lora_train import speed
from int4lora_train.modeling import prepare_for_training
from int4lora_train.modeling.int4_linear import Int4Linear
from int4lora_train.speed.lean_recompute import set_lean_recompute


def _marked(model) -> list[str]:
    return sorted(
        name for name, m in model.named_modules() if isinstance(m, Int4Linear) and m.output_unread_in_recompute
    )


def _step(arch: str, lean: bool, *, reentrant: bool = False, dropout: float = 0.0, fused: bool = True):
    """Loss and LoRA gradients of one checkpointed step; also how many matmuls of down-projection size ran."""
    model = tiny_int4_lora_model(arch, lora_dropout=dropout)
    speed.apply(model, fused_lora=fused, lean_recompute=lean, group_projections=fused)
    prepare_for_training(model, gradient_checkpointing=True, use_reentrant=reentrant)
    model.train()
    intermediate = model.config.intermediate_size
    down_matmuls = []
    linear = F.linear

    def counting_linear(x, weight, bias=None):
        if weight.shape[-1] == intermediate and weight.shape[0] == model.config.hidden_size:
            down_matmuls.append(x.shape)
        return linear(x, weight, bias)

    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)  # the dropout masks
    F.linear = counting_linear
    try:
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
    finally:
        F.linear = linear
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, len(down_matmuls), model


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradients_are_bit_identical_and_the_recompute_skips_the_down_projection(arch, reentrant, dropout):
    loss0, plain, calls0, _ = _step(arch, False, reentrant=reentrant, dropout=dropout)
    loss1, lean, calls1, model = _step(arch, True, reentrant=reentrant, dropout=dropout)
    layers = model.config.num_hidden_layers
    assert _marked(model) == [f"base_model.model.model.layers.{i}.mlp.down_proj.base_layer" for i in range(layers)]
    assert torch.equal(loss0, loss1)
    assert plain.keys() == lean.keys()
    assert all(torch.equal(plain[k], lean[k]) for k in plain), [k for k in plain if not torch.equal(plain[k], lean[k])]
    assert any(g.abs().max() > 0 for k, g in lean.items() if "down_proj.lora_A" in k)  # its LoRA still learns
    assert calls0 == 2 * layers and calls1 == layers  # forward + recompute, then the forward alone


def test_the_unfused_int4_projection_skips_too():
    """Without the fused LoRA node PEFT calls the Int4Linear itself (Int4LinearFunction): same rule."""
    _, plain, calls0, _ = _step("llama", False, fused=False)
    _, lean, calls1, _ = _step("llama", True, fused=False)
    assert all(torch.equal(plain[k], lean[k]) for k in plain)
    assert (calls0, calls1) == (4, 2)


def test_without_checkpointing_nothing_is_skipped():
    model = tiny_int4_lora_model("llama")
    speed.apply(model, lean_recompute=True)
    prepare_for_training(model, gradient_checkpointing=False)
    tokens = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(2))
    reference = tiny_int4_lora_model("llama")
    prepare_for_training(reference, gradient_checkpointing=False)
    assert torch.equal(model(input_ids=tokens).logits, reference(input_ids=tokens).logits)
    assert torch.equal(model(input_ids=tokens, labels=tokens).loss, reference(input_ids=tokens, labels=tokens).loss)


@pytest.mark.parametrize("arch", ["gemma2", "phi3"])
def test_layers_whose_mlp_output_is_read_again_are_not_marked(arch):
    model = tiny_int4_lora_model(arch)
    assert speed.apply(model, lean_recompute=True)["lean_recompute"] == 0 and _marked(model) == []


def test_switching_off_unmarks_and_the_default_config_marks():
    model = tiny_int4_lora_model("llama")
    assert speed.apply(model)["lean_recompute"] == 2  # SpeedConfig(): on
    assert set_lean_recompute(model, False) == 0 and _marked(model) == []
