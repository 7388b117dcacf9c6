"""Two processes through ``accelerate launch`` (gloo on CPU) against one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_helpers import arithmetic_records, write_jsonl

from int4lora_train import cli

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_int4_dir):
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_records(32))
    config = {
        "model": {"path": str(tiny_int4_dir), "dtype": "float32", "device": "cpu"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train_files": [str(data)], "validation_split": 0.125, "format": "instruction", "max_length": 32},
        "train": {
            "max_steps": 4,
            "micro_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "lr": 5e-3,
            "log_every": 1,
            "save_every": 2,
            "eval_every": 2,
        },
        "output": {"dir": str(tmp_path / "two"), "tensorboard": False, "plot": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    # accelerate's --cpu flag alone starts ONE process; --multi_gpu with no GPU visible starts N on gloo
    # (model.device: cpu makes each of them join the CPU process group).
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(REPO / "scripts" / "train.py"),
        "--config",
        str(path),
        "-q",
    ]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
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
    adapters = [load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("one", "two")]
    assert adapters[0].keys() == adapters[1].keys()
    for key, tensor in adapters[0].items():
        torch.testing.assert_close(adapters[1][key], tensor, rtol=1e-4, atol=1e-5, msg=key)
    assert any(t.abs().max() > 1e-3 for k, t in adapters[0].items() if "lora_B" in k)  # it did train
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)
    assert two["train_loss_final"] == pytest.approx(one["train_loss_final"], rel=1e-4)
