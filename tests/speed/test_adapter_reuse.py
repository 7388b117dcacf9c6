"""Reusing the adapters' compute-dtype copies within one step (``lora_layer.reuse_adapter_weights``): bit-identical
losses and gradients, fewer operations, and fresh copies whenever the weights change."""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from modeling_helpers import tiny_int4_lora_model
from torch.utils._python_dispatch import TorchDispatchMode

from int4lora_train import speed
from int4lora_train.modeling import prepare_for_training
from int4lora_train.modeling.lora_layer import reuse_adapter_weights


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _model(dropout: float = 0.0):
    model = tiny_int4_lora_model(lora_dropout=dropout)
    prepare_for_training(model, gradient_checkpointing=True, use_reentrant=False)
    speed.apply(model)  # the defaults: fused nodes, q/k/v and gate/up groups, lean recompute, ...
    model.train()
    return model


def _batches(n: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2, 16), generator=generator) for _ in range(n)]


def _train(reuse: bool, fused: bool, dropout: float = 0.0, steps: int = 2, micro_batches: int = 2):
    """Losses and gradients of ``steps`` AdamW steps of ``micro_batches`` accumulated micro-batches each, under bf16
    autocast; with ``reuse`` each step's passes run inside ``reuse_adapter_weights()`` as in the trainer."""
    torch.manual_seed(0)
    model = _model(dropout)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, fused=fused, foreach=None if fused else True)
    losses, grads = [], []
    for _ in range(steps):
        with reuse_adapter_weights() if reuse else contextlib.nullcontext():
            for tokens in _batches(micro_batches):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(tokens, labels=tokens).loss
                loss.backward()
                losses.append(loss.detach())
        grads.append([p.grad.clone() for p in params])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, grads, [p.detach().clone() for p in params]


@pytest.mark.parametrize("fused,dropout", [(True, 0.0), (False, 0.0), (True, 0.1)])
def test_reuse_is_bit_identical_across_steps_and_micro_batches(fused, dropout):
    # fused AdamW does not bump the weights' _version: the copies must not outlive the block (the next step would
    # compute with the previous step's weights).
    ref_losses, ref_grads, ref_params = _train(False, fused, dropout)
    losses, grads, params = _train(True, fused, dropout)
    assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses))
    for step_grads, ref_step_grads in zip(grads, ref_grads):
        assert all(torch.equal(a, b) for a, b in zip(step_grads, ref_step_grads))
    assert all(torch.equal(a, b) for a, b in zip(params, ref_params))


def test_reuse_saves_the_recompute_and_backward_casts():
    """Per decoder layer, the copies the checkpoint recompute and backward no longer make: q/k/v group 3 + 3 casts,
    a cat, 3 scalings, a block_diag; gate/up 2 + 2 casts, a cat, 2 scalings, a block_diag; o and down A and B cast in
    the recompute and again in backward."""
    tokens = _batches(1)[0]

    def count(reuse: bool) -> collections.Counter:
        model = _model()
        ops = _Ops()
        with reuse_adapter_weights() if reuse else contextlib.nullcontext(), ops:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(tokens, labels=tokens).loss
            loss.backward()
        return ops.counts

    before, after = count(False), count(True)
    layers = 2
    saved = {
        "aten._to_copy.default": (6 + 4 + 4 + 4) * layers,
        "aten.cat.default": 2 * layers,
        "aten.mul.Tensor": 5 * layers,
        "aten.block_diag.default": 2 * layers,
    }
    assert {name: before[name] - after[name] for name in saved} == saved
    assert sum(before.values()) - sum(after.values()) == sum(saved.values())


def test_a_weight_written_inside_the_block_is_cast_again():
    model = _model()
    tokens = _batches(1)[0]
    lora_b = [p for n, p in model.named_parameters() if "o_proj.lora_B" in n or "q_proj.lora_B" in n]
    with reuse_adapter_weights():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            first = model(tokens, labels=tokens).loss
            with torch.no_grad():
                for p in lora_b:
                    p.add_(0.5)  # in place: _version moves on
            second = model(tokens, labels=tokens).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = model(tokens, labels=tokens).loss
    assert not torch.equal(first, second)
    assert torch.equal(second, fresh)


def test_nothing_is_reused_outside_the_block():
    from int4lora_train.modeling import lora_layer

    with reuse_adapter_weights():
        with reuse_adapter_weights():  # nested: the outer block's copies
            assert lora_layer._reused == {}
            weight = torch.ones(2, 3)
            cast = lora_layer.adapter_in(weight, torch.bfloat16)
            assert lora_layer.adapter_in(weight, torch.bfloat16) is cast
        assert lora_layer.adapter_in(weight, torch.bfloat16) is cast
    assert lora_layer._reused is None
    assert lora_layer.adapter_in(weight, torch.bfloat16) is not cast


def test_a_weight_whose_storage_is_swapped_inside_the_block_frees_no_address_a_copy_is_keyed_on():
    """``weight.data = ...`` gives the weight other memory and frees its old memory even while the block holds the
    weight object; a new tensor there (same shape, dtype and ``_version``) must not get the old weight's copy."""
    from int4lora_train.modeling import lora_layer

    for _ in range(20):
        with reuse_adapter_weights():
            weight = torch.randn(16, 4096)
            lora_layer.adapter_in(weight, torch.bfloat16)
            weight.data = torch.randn(16, 4096)
            others = [torch.randn(16, 4096) for _ in range(4)]  # the allocator may hand out the freed memory
            for other in others:
                assert torch.equal(lora_layer.adapter_in(other, torch.bfloat16), other.to(torch.bfloat16))
