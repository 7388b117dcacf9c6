"""HostAdamW: AdamW's update with the state in host memory, step for step the same as torch.optim.AdamW."""

from __future__ import annotations

import pytest
import torch
from transformers import get_scheduler

from int4lora_train.memory.host_optimizer import HostAdamW


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((16, 8), (8, 16), (16,))]


def _groups(params):
    return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]


def _run(optimizer_class, params, steps: int, start: int = 0, optimizer=None):
    optimizer = optimizer or optimizer_class(_groups(params), lr=1e-2, betas=(0.9, 0.95))
    scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=2, num_training_steps=10)
    for _ in range(start):
        scheduler.step()
    for step in range(start, start + steps):
        generator = torch.Generator().manual_seed(100 + step)
        for i, p in enumerate(params):
            # the third parameter gets no gradient every other step: AdamW skips it, and so must HostAdamW
            p.grad = None if (i == 2 and step % 2) else torch.randn(p.shape, generator=generator)
        optimizer.step()
        scheduler.step()
    return optimizer


def test_steps_equal_adamw_bit_for_bit_with_groups_a_schedule_and_missing_gradients():
    reference, host = _params(), _params()
    expected = _run(torch.optim.AdamW, reference, steps=6)
    got = _run(HostAdamW, host, steps=6)
    assert all(torch.equal(a, b) for a, b in zip(host, reference))
    ours, theirs = got.state_dict(), expected.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    for index, state in theirs["state"].items():
        assert all(torch.equal(ours["state"][index][k], v) for k, v in state.items())


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")
def test_checkpoints_move_between_host_adamw_and_adamw_both_ways():
    reference = _params()
    _run(torch.optim.AdamW, reference, steps=6)
    for first, second in ((HostAdamW, torch.optim.AdamW), (torch.optim.AdamW, HostAdamW)):
        params = _params()
        saved = _run(first, params, steps=3).state_dict()
        resumed = second(_groups(params), lr=1e-2, betas=(0.9, 0.95))
        resumed.load_state_dict(saved)
        _run(second, params, steps=3, start=3, optimizer=resumed)
        assert all(torch.equal(a, b) for a, b in zip(params, reference)), (first, second)


def test_the_state_and_the_copies_live_on_the_host_and_are_counted():
    params = _params()
    optimizer = _run(HostAdamW, params, steps=2)
    assert all(v.device.type == "cpu" for s in optimizer.state.values() for v in s.values())
    elements = sum(p.numel() for p in params)
    assert optimizer.host_bytes() == 4 * elements * 4  # exp_avg, exp_avg_sq, a parameter and a gradient copy


@pytest.mark.parametrize("option", ["foreach", "fused", "capturable"])
def test_device_only_options_are_refused(option):
    with pytest.raises(ValueError, match=option):
        HostAdamW(_params(), lr=1e-3, **{option: True})
