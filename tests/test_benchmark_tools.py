"""What the benchmark scripts compute without a GPU: the search of the ones that decide what to run, op_count's
counts of a tiny trainer step, and trace_gaps' reading of a profiler timeline."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest


def _load(name: str):
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
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


def test_trace_gaps_finds_the_idle_stretches_and_who_ended_them(tmp_path):
    trace_gaps = _load("trace_gaps")

    def x(cat, name, ts, dur, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": args}

    events = [
        x("user_annotation", "int4lora/loss-sync", 0, 100),
        x("cuda_runtime", "cudaStreamSynchronize", 10, 80),
        x("user_annotation", "int4lora/forward", 150, 300),
        x("cpu_op", "aten::mm", 160, 20),
        x("cuda_runtime", "cudaLaunchKernel", 165, 5, correlation=7),
        x("kernel", "gemm", 0, 50, correlation=1),
        x("kernel", "gemm", 40, 30, correlation=2),  # overlaps the first: one busy stretch until 70
        x("kernel", "gemm", 200, 10, correlation=7),  # 130 us idle before it
        x("gpu_memset", "memset", 215, 1, correlation=8),  # 5 us: below --min-us
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    gaps, span = trace_gaps.attribute(trace_gaps.load_events(path), min_us=20)
    assert span == 216
    assert [(g.start, g.end, g.phase, g.host) for g in gaps] == [(70, 200, "int4lora/forward", "cudaStreamSynchronize")]
    text = trace_gaps.report(gaps, span, steps=1, top=5)
    assert "0.1 ms per step" in text and "int4lora/forward" in text
