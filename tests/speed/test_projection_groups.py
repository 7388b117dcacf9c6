"""Projection groups (q/k/v, gate/up as one node) against the separate projections: values and gradients, with and
without gradient checkpointing, unequal ranks, and when a group steps aside."""

from __future__ import annotations

import pytest
import torch
from modeling_helpers import rel_diff, tiny_int4_lora_model
from peft import LoraConfig, get_peft_model

from int4lora_train import speed
from int4lora_train.modeling import lora_layer, prepare_for_training, quantize_model_rtn
from int4lora_train.modeling.tiny_models import build_tiny_model
from int4lora_train.speed import projection_groups


def _count_calls(monkeypatch, cls) -> list[int]:
    calls: list[int] = []
    original = cls.apply
    monkeypatch.setattr(cls, "apply", lambda *a: calls.append(1) or original(*a))
    return calls


@pytest.mark.parametrize("checkpointing,use_reentrant", [(False, False), (True, False), (True, True)])
def test_projection_groups_equal_separate_projections(checkpointing, use_reentrant, monkeypatch):
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))

    def run(grouped: bool):
        peft_model = tiny_int4_lora_model()
        counts = speed.apply(peft_model, group_projections=grouped)
        assert counts["groups"] == (4 if grouped else 0)  # 2 layers x (q/k/v, gate/up)
        prepare_for_training(peft_model, gradient_checkpointing=checkpointing, use_reentrant=use_reentrant)
        peft_model.train()
        group_calls = _count_calls(monkeypatch, projection_groups.Int4LoraGroupFunction)
        single_calls = _count_calls(monkeypatch, lora_layer.Int4LoraFunction)
        out = peft_model(tokens, labels=tokens)
        out.loss.backward()
        monkeypatch.undo()
        grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
        return out.logits.detach(), grads, len(group_calls), len(single_calls)

    ref_logits, ref_grads, _, ref_single = run(False)
    logits, grads, group_calls, single_calls = run(True)
    passes = 2 if checkpointing else 1  # forward (+ recompute)
    assert group_calls == 2 * 2 * passes and single_calls == 2 * 2 * passes  # per layer: 2 groups, o and down
    assert ref_single == 7 * 2 * passes
    assert rel_diff(logits, ref_logits) <= 1e-5
    assert set(grads) == set(ref_grads)
    assert max(rel_diff(grads[n], ref_grads[n]) for n in grads) <= 1e-5


def test_projection_groups_with_unequal_ranks_and_fallbacks(monkeypatch):
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))

    def build(dropout: float):
        model = build_tiny_model("llama", seed=0, dtype=torch.float32)
        quantize_model_rtn(model, 32, symmetric=False)
        torch.manual_seed(0)
        config = LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout, rank_pattern={"k_proj": 8})
        peft_model = get_peft_model(model, config)
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_B" in name:
                param.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(sum(map(ord, name))))
        return peft_model

    results = []
    for grouped in (False, True):
        peft_model = build(0.0)
        speed.apply(peft_model, group_projections=grouped)
        peft_model(tokens, labels=tokens).loss.backward()
        results.append({n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad})
    assert max(rel_diff(results[1][n], results[0][n]) for n in results[0]) <= 1e-5

    # Dropout: the group draws each member's own mask in member order, as the separate projections do, so with the
    # same seed the values and gradients are the same; different rates step aside.
    with_dropout = []
    for grouped in (False, True):
        peft_model = build(0.1)
        speed.apply(peft_model, group_projections=grouped)
        peft_model.train()
        calls = _count_calls(monkeypatch, projection_groups.Int4LoraGroupFunction)
        torch.manual_seed(5)
        out = peft_model(tokens, labels=tokens)
        out.loss.backward()
        monkeypatch.undo()
        assert len(calls) == (4 if grouped else 0)
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        with_dropout.append((out.logits.detach(), grads))
    assert rel_diff(with_dropout[1][0], with_dropout[0][0]) <= 1e-5
    assert max(rel_diff(with_dropout[1][1][n], with_dropout[0][1][n]) for n in with_dropout[0][1]) <= 1e-5
    peft_model.zero_grad()
    torch.manual_seed(6)  # and the masks did something: another seed gives other gradients
    peft_model(tokens, labels=tokens).loss.backward()
    other = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert max(rel_diff(other[n], with_dropout[1][1][n]) for n in other) > 1e-3

    peft_model.base_model.model.model.layers[0].self_attn.k_proj.lora_dropout["default"].p = 0.2
    group_calls = _count_calls(monkeypatch, projection_groups.Int4LoraGroupFunction)
    peft_model(tokens, labels=tokens)
    assert len(group_calls) == 3  # layer 0's q/k/v now differ in rate: computed alone

    peft_model.eval()  # no dropout in eval: grouped again
    peft_model(tokens)
    assert len(group_calls) == 3 + 4
    # A member called alone still gets its own output; the next input replaces what the group kept for the others.
    attention = peft_model.base_model.model.model.layers[0].self_attn
    h, h2 = torch.randn(1, 5, 128), torch.randn(1, 5, 128)
    grouped = [attention.k_proj(h), attention.k_proj(h2), attention.v_proj(h2), attention.q_proj(h2)]
    assert len(group_calls) == 3 + 4 + 2
    speed.apply(peft_model, group_projections=False)
    alone = [attention.k_proj(h), attention.k_proj(h2), attention.v_proj(h2), attention.q_proj(h2)]
    assert max(rel_diff(a, b) for a, b in zip(grouped, alone)) <= 1e-6
