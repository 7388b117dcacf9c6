"""What the benchmark scripts compute without a GPU: the search of the ones that decide what to run, and op_count's
counts of a tiny trainer step."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def _load(name: str):
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


longest_seq = _load("longest_seq")


@pytest.mark.parametrize(
    ("fits_up_to", "expected", "tried"),
    [
        (100_000, 98_304, [8192, 16384, 32768, 65536, 131072, 98304, 114688, 106496]),
        (5_000, None, [8192]),  # the first length fails: nothing fits
        (10**9, 262_144, [8192, 16384, 32768, 65536, 131072, 262144]),  # --max reached without a failure
    ],
)
def test_the_longest_length_doubles_then_bisects_to_the_granularity(fits_up_to, expected, tried):
    seen = []

    def outcome(seq):
        seen.append(seq)
        return seq <= fits_up_to

    assert longest_seq.lengths_to_try(8192, 262_144, 8192, outcome) == expected
    assert seen == tried


def test_op_count_attributes_a_trainer_step_and_sees_the_reused_adapter_casts(tmp_path, monkeypatch):
    """op_count runs ``Trainer._train_step``; reusing the adapters' bf16 copies within the step (the trainer's
    ``reuse_adapter_weights``) leaves the loss and gradient norm bit-identical and saves 27 operations per decoder
    layer in its recompute and backward (tests/speed/test_adapter_reuse.py lists them), none in its forward."""
    import contextlib

    from int4lora_train.memory import MemoryPlan
    from int4lora_train.train import trainer

    op_count = _load("op_count")

    def measure(tmp):
        counter, step, layers = op_count.build_step(tmp, "llama", fp32=False, seq=48, num_hidden_layers=2)
        loss, grad_norm, _, _ = step()
        return loss, grad_norm, [op_count.per_layer_totals(counter, i, views=True) for i in range(layers)]

    loss, grad_norm, totals = measure(tmp_path / "reuse")
    with monkeypatch.context() as memory_first:  # a run whose memory plan saves device memory keeps no copies
        memory_first.setattr(MemoryPlan, "saves_device_memory", property(lambda plan: True))
        _, _, memory_first_totals = measure(tmp_path / "memory-first")
    monkeypatch.setattr(trainer, "reuse_adapter_weights", contextlib.nullcontext)
    ref_loss, ref_grad_norm, ref_totals = measure(tmp_path / "plain")
    assert memory_first_totals == ref_totals
    assert (loss, grad_norm) == (ref_loss, ref_grad_norm)
    for layer, ref in zip(totals, ref_totals):
        assert all(layer[phase] > 0 for phase in op_count.PHASES)
        assert layer["forward"] == ref["forward"]
        assert ref["recompute"] - layer["recompute"] == 23 and ref["backward"] - layer["backward"] == 4
