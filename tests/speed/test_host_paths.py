"""The per-call host fast paths (``Int4Linear.weight_spec`` kept between calls, no-op dtype casts skipped):
bit-identical losses and gradients against the previous behaviour, and a kept spec that follows every change of the
layer (compute dtype, policy flags set by ``speed.apply``, a move, a cache, a copy)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from modeling_helpers import tiny_int4_lora_model

from int4lora_train import speed
from int4lora_train.kernels.dequantizer import TorchDequantizer
from int4lora_train.modeling import Int4Linear, prepare_for_training
from int4lora_train.modeling import int4_linear as int4_linear_module
from int4lora_train.modeling import lora_layer as lora_layer_module
from int4lora_train.modeling.int4_linear import _WeightSpec
from int4lora_train.quant.unpacker import INT4Unpacker
from int4lora_train.speed import projection_groups as projection_groups_module


def _fresh_spec(layer: Int4Linear, dtype: torch.dtype) -> _WeightSpec:
    """The previous ``weight_spec``: a new spec on every call."""
    return _WeightSpec(
        dtype, layer.dequantizer, bool(layer.keep_dense_for_backward), bool(layer.output_unread_in_recompute)
    )


def _always_cast(t, dtype):
    """The previous casts: ``.to`` on every call."""
    return None if t is None else t.to(dtype)


def _previous_behaviour(monkeypatch) -> None:
    monkeypatch.setattr(Int4Linear, "weight_spec", _fresh_spec)
    for module in (int4_linear_module, lora_layer_module, projection_groups_module):
        monkeypatch.setattr(module, "in_dtype", _always_cast)


def _train(autocast: bool, dropout: float, reentrant: bool, features: dict, steps: int = 2):
    """Losses and gradients of ``steps`` SGD steps of a tiny INT4 LoRA model with gradient checkpointing; between
    the steps the speed features flip (``features`` then their opposite), so a kept spec must follow them."""
    torch.manual_seed(0)
    model = tiny_int4_lora_model(lora_dropout=dropout)
    prepare_for_training(model, gradient_checkpointing=True, use_reentrant=reentrant)
    speed.apply(model, **features)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    losses, grads = [], []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(tokens, labels=tokens).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in params])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        speed.apply(model, **{name: not value for name, value in features.items()})
    return losses, grads


@pytest.mark.parametrize(
    "autocast,dropout,reentrant,features",
    [
        (True, 0.0, False, {"group_projections": True, "lean_recompute": True, "keep_dense_for_backward": True}),
        (True, 0.1, True, {"group_projections": False, "lean_recompute": True, "keep_dense_for_backward": False}),
        (False, 0.0, False, {"group_projections": True, "lean_recompute": False, "keep_dense_for_backward": True}),
        (False, 0.1, False, {"fused_lora": False, "lean_recompute": True, "keep_dense_for_backward": True}),
    ],
)
def test_fast_paths_are_bit_identical_to_the_previous_behaviour(monkeypatch, autocast, dropout, reentrant, features):
    losses, grads = _train(autocast, dropout, reentrant, features)
    with monkeypatch.context() as previous:
        _previous_behaviour(previous)
        ref_losses, ref_grads = _train(autocast, dropout, reentrant, features)
    assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses))
    for step_grads, ref_step_grads in zip(grads, ref_grads):
        assert all(torch.equal(a, b) for a, b in zip(step_grads, ref_step_grads))


def _dequantizations(model, monkeypatch) -> int:
    """Dense weights made in one forward and backward of ``model`` under bf16 autocast."""
    calls = []
    original = TorchDequantizer.__call__

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with monkeypatch.context() as patch:
        patch.setattr(TorchDequantizer, "__call__", counted)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(tokens, labels=tokens).loss
        loss.backward()
    return len(calls)


def _checkpointed(**features):
    model = tiny_int4_lora_model()
    prepare_for_training(model, gradient_checkpointing=True, use_reentrant=False)
    speed.apply(model, **features)
    model.train()
    return model


@pytest.mark.parametrize("keep_dense", [True, False])
@pytest.mark.parametrize("lean", [True, False])
def test_a_kept_spec_follows_the_policy_flags_speed_apply_sets(monkeypatch, keep_dense, lean):
    """The flags only change which tensors are saved and how often a weight is dequantized, not the values: the
    dequantizations of a step after ``speed.apply`` flipped them are those of a model built with the new flags."""
    model = _checkpointed(keep_dense_for_backward=not keep_dense, lean_recompute=not lean)
    before = _dequantizations(model, monkeypatch)
    speed.apply(model, keep_dense_for_backward=keep_dense, lean_recompute=lean)
    after = _dequantizations(model, monkeypatch)
    expected = _dequantizations(_checkpointed(keep_dense_for_backward=keep_dense, lean_recompute=lean), monkeypatch)
    assert after == expected != before


def _layer() -> Int4Linear:
    model = tiny_int4_lora_model()
    return model.get_base_model().model.layers[0].self_attn.o_proj.base_layer


def test_the_spec_is_kept_between_calls_and_made_again_for_another_dtype():
    layer = _layer()
    spec = layer.weight_spec(torch.float32)
    assert layer.weight_spec(torch.float32) is spec
    bf16 = layer.weight_spec(torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.dequantizer is spec.dequantizer
    assert layer.weight_spec(torch.float32) == _fresh_spec(layer, torch.float32)


def test_a_move_or_a_cache_drops_the_kept_spec_with_the_dequantizer():
    layer = _layer()
    spec = layer.weight_spec(torch.float32)
    layer.to(torch.float64)  # a module cast: the buffers are replaced (the scales keep their dtype)
    assert "_weight_spec" not in layer.__dict__  # the old dequantizer (and the launches it holds) is released
    moved = layer.weight_spec(torch.float32)
    assert moved.dequantizer is not spec.dequantizer and moved.dequantizer is layer.dequantizer
    layer.set_cache(INT4Unpacker())
    assert "_weight_spec" not in layer.__dict__
    cached = layer.weight_spec(torch.float32)
    assert cached.dequantizer is layer.dequantizer and cached.dequantizer is not moved.dequantizer


@pytest.mark.parametrize("duplicate", [copy.deepcopy, lambda layer: pickle.loads(pickle.dumps(layer))])
def test_a_copy_makes_its_own_spec(duplicate):
    layer = _layer()
    spec = layer.weight_spec(torch.float32)
    clone = duplicate(layer)
    assert "_weight_spec" not in clone.__dict__
    assert clone.weight_spec(torch.float32).dequantizer is not spec.dequantizer


def test_in_dtype_returns_the_tensor_itself_or_its_cast():
    t = torch.ones(2, dtype=torch.float32)
    assert int4_linear_module.in_dtype(t, torch.float32) is t
    assert int4_linear_module.in_dtype(None, torch.float32) is None
    cast = int4_linear_module.in_dtype(t, torch.bfloat16)
    assert cast.dtype == torch.bfloat16 and torch.equal(cast, t.to(torch.bfloat16))
