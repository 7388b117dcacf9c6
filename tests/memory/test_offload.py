"""Activation offloading: the checkpointed layers' inputs leave and come back bit-exact, once each, in order."""

from __future__ import annotations

import functools

import pytest
import torch
from memory_helpers import Stack, batch, int4_lora_model, step
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

from int4lora_train import memory, speed
from int4lora_train.errors import ConfigError
from int4lora_train.memory import MemoryConfig
from int4lora_train.memory.offload import (
    ActivationOffloader,
    activation_offloader,
    checkpointed_layers,
    enable_activation_offload,
)


def _top_hooks():
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


@pytest.mark.parametrize("with_speed", [False, True])
@pytest.mark.parametrize("reentrant", [False, True])
def test_loss_and_every_lora_gradient_are_bit_equal_to_plain_checkpointing(with_speed, reentrant):
    def run(offload: bool):
        model = int4_lora_model(reentrant=reentrant)
        if with_speed:
            speed.apply(model)
        if offload:
            offloader = enable_activation_offload(model, min_bytes=0, include_cpu=True)
        result = step(model, batch())
        if offload:
            assert offloader.stats["offloaded"] == 4 and offloader.stats["fetched"] + offloader.stats["prefetched"] == 4
        return result

    (ref_loss, ref_grads), (loss, grads) = run(False), run(True)
    assert torch.equal(loss, ref_loss)
    assert ref_grads.keys() == grads.keys() and len(grads) == 4 * 7 * 2
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name


def test_one_copy_per_layer_each_prefetched_while_the_layer_after_it_runs_backward():
    model = int4_lora_model(layers=4)
    offloader = enable_activation_offload(model, min_bytes=0, include_cpu=True)
    offloader.trace = []
    loss = model(input_ids=batch(), labels=batch(), use_cache=False).loss
    # Exactly the layer inputs: the final norm's and the loss's saved tensors are not the hooks' business.
    assert offloader.stats["offloaded"] == len(checkpointed_layers(model)) == 4
    assert offloader.stats["bytes"] == 4 * 2 * 12 * 128 * 4
    assert offloader.trace == [("offload", i) for i in range(1, 5)]
    assert not offloader.active and _top_hooks() is None
    offloader.trace.clear()
    loss.backward()
    # The last layer's input is fetched on demand; each earlier one was prefetched during the layer after it.
    assert offloader.trace == [
        ("fetch", 4),
        ("prefetch", 3),
        ("use", 4),
        ("prefetch", 2),
        ("use", 3),
        ("prefetch", 1),
        ("use", 2),
        ("use", 1),
    ]
    assert offloader.stats["fetched"] == 1 and offloader.stats["prefetched"] == 3


def test_a_tensor_saved_by_every_layer_is_copied_once_and_parameters_never():
    stack = Stack(layers=3)
    x = torch.randn(5, 8, requires_grad=True)
    table = torch.randn(5, 8)

    def run(offload: bool):
        if offload:
            offloader = enable_activation_offload(stack, min_bytes=0, include_cpu=True)
        stack.zero_grad()
        x.grad = None
        out = stack(x, table, pass_parameter=True)
        out.square().sum().backward()
        grads = [x.grad.clone(), stack.shared.grad.clone(), *(b.linear.weight.grad.clone() for b in stack.blocks)]
        return grads, (offloader if offload else None)

    reference, _ = run(False)
    grads, offloader = run(True)
    # Each block saved x_i, table and the shared parameter: three layer inputs, the table once, the parameter never.
    assert offloader.stats["offloaded"] == 3 + 1
    assert offloader.stats["deduplicated"] == 2
    assert all(torch.equal(a, b) for a, b in zip(grads, reference))


def test_views_of_parameters_are_not_offloaded():
    stack = Stack(layers=2)
    offloader = enable_activation_offload(stack, min_bytes=0, include_cpu=True)
    x = torch.randn(5, 8, requires_grad=True)
    table = stack.blocks[0].linear.weight.t()[:5]  # a view of a parameter, saved by every block
    stack(x, table).sum().backward()
    assert offloader.stats["offloaded"] == 2  # the two layer inputs only


def test_empty_tensors_stay_even_with_no_size_floor():
    """torch <= 2.11's non-reentrant checkpoint saves a 0-element marker beside each layer's inputs: nothing to copy."""
    offloader = ActivationOffloader(Stack(layers=1), min_bytes=0, include_cpu=True)
    empty, full = torch.empty(0, requires_grad=True), torch.ones(3)
    assert offloader._pack(empty) is empty and offloader._pack(full) is not full
    assert offloader.stats["offloaded"] == 1


def test_small_and_cpu_tensors_stay_unless_asked():
    model = int4_lora_model(layers=2)
    offloader = enable_activation_offload(model)  # CUDA only, >= 1 MiB: nothing here
    step(model, batch())
    assert offloader.stats["offloaded"] == 0
    offloader = enable_activation_offload(model, min_bytes=1 << 30, include_cpu=True)
    step(model, batch())
    assert offloader.stats["offloaded"] == 0


def test_an_exception_inside_the_forward_leaves_no_hooks_active():
    model = int4_lora_model(layers=3)
    offloader = enable_activation_offload(model, min_bytes=0, include_cpu=True)
    attention = checkpointed_layers(model)[1].self_attn
    original = attention.forward

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    attention.forward = boom
    with pytest.raises(RuntimeError, match="boom"):
        model(input_ids=batch(), labels=batch(), use_cache=False)
    assert _top_hooks() is None and not offloader.active
    attention.forward = original
    loss, grads = step(model, batch())
    reference_loss, reference_grads = step(int4_lora_model(layers=3), batch())
    assert torch.equal(loss, reference_loss)
    assert all(torch.equal(grads[n], reference_grads[n]) for n in grads)


def test_apply_twice_keeps_one_set_of_hooks_and_off_removes_them():
    model = int4_lora_model(layers=2)
    layers = checkpointed_layers(model)
    plain = [layer._gradient_checkpointing_func for layer in layers]
    for _ in range(2):
        report = memory.apply(model, MemoryConfig(offload_activations="on", embeddings_on_cpu="off"))
        assert report["offloaded_layers"] == 2
        wrapped = [layer._gradient_checkpointing_func for layer in layers]
        assert all(w._int4lora_original is p for w, p in zip(wrapped, plain))  # wrapped once, not twice
    first = activation_offloader(model)
    memory.apply(model, offload_activations="off", embeddings_on_cpu="off")
    assert activation_offloader(model) is None and first is not None
    assert [layer._gradient_checkpointing_func for layer in layers] == plain
    step(model, batch())  # still trains


class CallCheckpointedBlock(GradientCheckpointingLayer):
    """A decoder layer as transformers <= 5.17 checkpoints it: ``__call__`` (module hooks included) inside the
    checkpoint, so forward pre-hooks run inside it and again in the recompute."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def __call__(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training:  # also without grad: 5.17 checks only these two
            return self._gradient_checkpointing_func(functools.partial(nn.Module.__call__, self, **kwargs), *args)
        return nn.Module.__call__(self, *args, **kwargs)


CallCheckpointedBlock.forward = lambda self, x: torch.tanh(self.linear(x)) * 2  # no 5.24-style forward wrapper


def test_only_the_layer_inputs_are_offloaded_when_the_checkpoint_wraps_call():
    torch.manual_seed(0)
    blocks = nn.Sequential(*(CallCheckpointedBlock(8) for _ in range(3)))
    for block in blocks:
        block.gradient_checkpointing = True
        block._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
    x = torch.randn(4, 8, requires_grad=True)

    def grads(offload: bool):
        offloader = enable_activation_offload(blocks, min_bytes=0, include_cpu=True) if offload else None
        blocks.zero_grad()
        x.grad = None
        blocks(x).square().sum().backward()
        return offloader, [x.grad.clone(), *(b.linear.weight.grad.clone() for b in blocks)]

    _, reference = grads(False)
    offloader, got = grads(True)
    assert offloader.stats["offloaded"] == 3  # the inputs; not the tanh output, the linear's input, the recompute's
    assert all(torch.equal(a, b) for a, b in zip(got, reference))


def test_on_without_gradient_checkpointing_is_a_config_error_and_auto_stays_off():
    model = int4_lora_model(layers=2, checkpointing=False)
    with pytest.raises(ConfigError, match="gradient_checkpointing: true"):
        memory.plan(model, 1, 64, config=MemoryConfig(offload_activations="on"))
    chosen = memory.plan(model, 1, 1 << 17, config=MemoryConfig())
    assert not chosen.offload_activations
    assert "no gradient checkpointing" in chosen.reasons["offload_activations"]


def test_on_the_cpu_auto_does_nothing_and_on_says_so():
    model = int4_lora_model(layers=2)
    chosen = memory.plan(model, 1, 1 << 17)
    assert not chosen.offload_activations and "cpu" in chosen.reasons["offload_activations"]
    chosen = memory.plan(model, 1, 1 << 17, config=MemoryConfig(offload_activations="on"))
    assert chosen.offload_activations and "no effect on cpu" in chosen.reasons["offload_activations"]


def test_a_tensor_at_a_freed_inputs_address_gets_its_own_copy():
    """A layer input freed after its copy leaves its address, shape and version to the next layer's input (the
    allocator reuses blocks): that input is new data and must get its own copy, not the freed one's."""
    offloader = ActivationOffloader(nn.Linear(1, 1), min_bytes=0, include_cpu=True)
    storage = torch.full((16,), 1.0).untyped_storage()
    alias = torch.empty(0).set_(storage, 0, (4, 4))

    def at_the_address() -> torch.Tensor:
        return torch.empty(0).set_(storage, 0, (4, 4))

    first = at_the_address()
    first_copy = offloader._pack(first)
    del first  # freed; its block now holds the next layer's input
    with torch.no_grad():
        alias.fill_(2.0)
    second = at_the_address()
    second_copy = offloader._pack(second)
    assert second_copy is not first_copy and offloader.stats == {**offloader.stats, "offloaded": 2, "deduplicated": 0}
    assert torch.equal(offloader._unpack(first_copy), torch.full((4, 4), 1.0))
    assert torch.equal(offloader._unpack(second_copy), torch.full((4, 4), 2.0))
    assert offloader._pack(second) is second_copy  # the same live tensor saved again still shares its copy


def test_no_grad_forwards_and_several_forwards_before_one_backward():
    """A forward without grad in training mode (5.17 checkpoints it all the same) offloads nothing and leaves no
    hook; two forwards before one backward (each forward keeps its handles and its prefetch order) give the
    gradients of plain checkpointing."""
    torch.manual_seed(0)
    blocks = nn.Sequential(*(CallCheckpointedBlock(8) for _ in range(3)))
    for block in blocks:
        block.gradient_checkpointing = True
        block._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
    x, y = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)

    def grads(offload: bool):
        offloader = enable_activation_offload(blocks, min_bytes=0, include_cpu=True) if offload else None
        blocks.zero_grad()
        x.grad = y.grad = None
        first = blocks(x).square().sum()
        with torch.no_grad():
            plain = blocks(x)
        assert _top_hooks() is None and (offloader is None or offloader.stats["offloaded"] == 0)
        (first + blocks(y).square().sum()).backward()
        return offloader, plain, [x.grad.clone(), y.grad.clone(), *(b.linear.weight.grad.clone() for b in blocks)]

    _, plain, reference = grads(False)
    offloader, got_plain, got = grads(True)
    assert offloader.stats["offloaded"] == 3 and torch.equal(got_plain, plain)
    assert all(torch.equal(a, b) for a, b in zip(got, reference))


class WithTower(nn.Module):
    """A checkpointed block first in module order that the forward does not run (a vision tower on text-only
    batches), then the toy stack."""

    def __init__(self):
        super().__init__()
        self.tower = Stack(layers=1)
        self.text = Stack(layers=3)

    def forward(self, x, table):
        return self.text(x, table)


def test_a_forward_starts_anew_when_the_first_checkpointed_layer_does_not_run():
    """A layer run again starts a new forward too: the stats (and the dedupe table, the prefetch order) are the
    current forward's, not those of every forward since the offloader was made."""
    model = WithTower()
    assert checkpointed_layers(model)[0] is model.tower.blocks[0]
    offloader = enable_activation_offload(model, min_bytes=0, include_cpu=True)
    x, table = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8)
    for _ in range(3):
        model(x, table).sum().backward()
        assert offloader.stats == {
            "offloaded": 4,
            "bytes": 4 * 5 * 8 * 4,
            "deduplicated": 2,
            "prefetched": 2,
            "fetched": 2,
        }
