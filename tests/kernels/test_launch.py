"""Launches with less host work (kernels/launch.py): a replay repeats a launch into new outputs and keeps none; the
prepared path steps aside when Triton's internals are not the expected ones."""

from __future__ import annotations

import logging

import torch

from int4lora_train.kernels import launch
from int4lora_train.kernels.launch import DirectLauncher, KernelLaunch, Replay


class _RecordingKernel:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def test_replay_swaps_in_each_output_and_keeps_none():
    kernel, packed = _RecordingKernel(), torch.zeros(4)
    first, second = torch.empty(4), torch.empty(4)
    replay = Replay(KernelLaunch(kernel, (2, 1), (packed, first, 4), {"BLOCK": 8}, out_index=1))
    assert kernel.calls == [((2, 1), (packed, first, 4), {"BLOCK": 8})]  # made once, the ordinary way
    assert replay.prepared is None  # not a compiled Triton kernel: replays launch the ordinary way too
    assert replay.args[1] is None
    assert replay(second) is second
    assert kernel.calls[-1] == ((2, 1), (packed, second, 4), {"BLOCK": 8}) and replay.args[1] is None


def test_prepare_gives_up_once_when_triton_internals_differ(monkeypatch, caplog):
    class _OtherTriton(_RecordingKernel):
        arg_names = ["x", "BLOCK"]
        warmups = 0

        def warmup(self, *args, **kwargs):
            type(self).warmups += 1
            raise AttributeError("no such internal")

    kernel = _OtherTriton()
    monkeypatch.setattr(launch, "_compiled_jit", lambda k: True)
    monkeypatch.setattr(launch, "_UNPREPARABLE", set())  # by id(): keep this kernel's id out of the real set
    with caplog.at_level(logging.INFO, logger="int4lora_train.kernels.launch"):
        assert launch._prepare(kernel, (1,), (torch.zeros(1),), {"BLOCK": 8}) is None
        assert launch._prepare(kernel, (1,), (torch.zeros(1),), {"BLOCK": 8}) is None
    assert _OtherTriton.warmups == 1 and "prepared Triton launch unavailable" in caplog.text
    launcher = DirectLauncher(kernel)
    launcher((1,), torch.zeros(1), BLOCK=8)
    launcher((1,), torch.zeros(1), BLOCK=8)
    assert len(kernel.calls) == 2 and not launcher._direct  # ordinary launches from then on
