"""Two processes through ``accelerate launch`` (gloo on CPU) against one process with the same global batch."""

from __future__ import annotations

import json

import pytest
import yaml
from train_helpers import (
    REPO,
    arithmetic_records,
    assert_same_adapter,
    launch_two_processes,
    run_adapter,
    small_run_config,
    write_jsonl,
)

from int4lora_train import cli


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_int4_dir):
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_records(32))
    config = small_run_config(tiny_int4_dir, data, tmp_path / "two")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    launch_two_processes(REPO / "scripts" / "train.py", "--config", str(path), "-q")
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["world_size"] == 2 and two["ranks_in_sync"] is True
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "step-4" / "rng").iterdir()) == [
        "rank-0.pt",
        "rank-1.pt",
    ]

    # One process, twice the micro-batch: the same rows in every optimizer step.
    assert (
        cli.main(["train", "--config", str(path), "-q", "train.micro_batch_size=4", f"output.dir={tmp_path / 'one'}"])
        == 0
    )
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert one["world_size"] == 1
    assert_same_adapter(tmp_path / "two", tmp_path / "one")
    assert any(t.abs().max() > 1e-3 for k, t in run_adapter(tmp_path / "one").items() if "lora_B" in k)  # it trained
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)
    assert two["train_loss_final"] == pytest.approx(one["train_loss_final"], rel=1e-4)
