"""Helpers shared by the trainer tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from int4lora_train.modeling.tiny_models import build_tiny_model
from int4lora_train.train.metrics import read_metrics
from int4lora_train.train.trainer import METRICS_FILE

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}

TEST_DEVICE = os.environ.get("INT4LORA_TEST_DEVICE", "cpu")
"""Where the multi-process tests run: ``cpu`` (2 gloo processes; CI) or ``cuda`` (2 GPUs over NCCL, one per process:
``INT4LORA_TEST_DEVICE=cuda pytest tests/train/test_train_ddp.py tests/train/test_train_fsdp.py`` on a 2-GPU machine).
"""


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def arithmetic_records(n: int = 48) -> list[dict]:
    """Short prompt/completion pairs with an easy pattern (the completion repeats the prompt's digits)."""
    return [{"prompt": f"{a} {a}:", "completion": f"{a}{a}"} for a in range(10, 10 + n)]


def tiny_peft_model(seed: int = 0, dropout: float = 0.0):
    """A dense tiny Llama with plain PEFT LoRA on all linears (the trainer does not care what the base is)."""
    from peft import LoraConfig, get_peft_model

    model = build_tiny_model("llama", seed=seed, **TINY)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))


REPO = Path(__file__).resolve().parents[2]


def run_adapter(run: Path) -> dict:
    """The tensors of a run directory's exported adapter."""
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(run: Path, reference: Path) -> None:
    """The two runs exported the same adapter keys, with tensors equal up to fp32 reduction order.

    On GPUs the absolute tolerance is 5e-5: a process's GEMMs over half the batch accumulate in another order than
    one process's over all of it, and AdamW's normalised update turns that into up to ~1.7e-5 on an element whose
    gradient is near zero (1 of 1024 elements of one tensor, FSDP vs one GPU, while both loss curves agree to 1e-6;
    BENCHMARKS.md, issue 12). On CPUs 1e-5 holds."""
    import torch

    adapter, expected = run_adapter(run), run_adapter(reference)
    assert adapter.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(
            adapter[key],
            tensor,
            rtol=1e-4,
            atol=5e-5 if TEST_DEVICE == "cuda" else 1e-5,
            msg=lambda default, key=key: (
                f"{run.name} vs {reference.name}: {key}: {default}\nloss curves (step, train loss, grad norm):\n"
                f"  {run.name}: {loss_curve(run)}\n  {reference.name}: {loss_curve(reference)}"
            ),
        )


def loss_curve(run: Path) -> list[tuple[int, float, float]]:
    """``(step, train loss, gradient norm)`` of each logged step of a run directory (its metrics.jsonl)."""
    rows = read_metrics(run / METRICS_FILE)
    return [(r["step"], round(r["train/loss"], 6), round(r["train/grad_norm"], 5)) for r in rows if "train/loss" in r]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_processes(script: Path, *arguments: str) -> None:
    """``accelerate launch`` ``script`` on 2 processes and check it succeeded: 2 CPU processes (gloo), or with
    ``INT4LORA_TEST_DEVICE=cuda`` one per GPU (NCCL).

    ``--multi_gpu`` with no GPU visible starts 2 gloo processes (accelerate's ``--cpu`` alone starts one).
    """
    import subprocess
    import sys

    # PYTHONFAULTHANDLER: a rank that aborts in C++ (SIGABRT) also prints where its Python was
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    if TEST_DEVICE == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.pop("ACCELERATE_USE_FSDP", None)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(script), *arguments,
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-12000:]  # the failing rank's own output, not only torchrun's


def small_run_config(model_dir: Path, data: Path, out_dir: Path, **train) -> dict:
    """A 4-step run on the tiny INT4 model (global batch 2 x 2 per process), checkpoints and eval every 2 steps."""
    return {
        "model": {"path": str(model_dir), "dtype": "float32", "device": TEST_DEVICE},
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
            **train,
        },
        "output": {"dir": str(out_dir), "tensorboard": False, "plot": False},
    }
