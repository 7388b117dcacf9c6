"""The main job through the command line: run directory, resume, errors, export, inspect, the demo."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from train_helpers import arithmetic_records, write_jsonl

from int4lora_train import cli
from int4lora_train.train.module import LoraModule


def _config(tmp_path, model_dir, **train) -> str:
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_records(32))
    config = {
        "model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
        "lora": {"r": 8, "alpha": 16},
        "data": {
            "train_files": [str(data)],
            "validation_split": 0.125,
            "format": "instruction",
            "max_length": 32,
            "packing": True,
        },
        "train": {
            "max_steps": 6,
            "micro_batch_size": 2,
            "lr": 5e-3,
            "log_every": 1,
            "eval_every": 3,
            "eval_at_start": True,
            "save_every": 3,
            **train,
        },
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


def test_train_writes_the_whole_run_directory(tmp_path, tiny_int4_dir, capsys):
    assert cli.main(["train", "--config", _config(tmp_path, tiny_int4_dir), "-q"]) == 0
    run = tmp_path / "run"
    for name in (
        "config.yaml",
        "checkpoints/step-3",
        "checkpoints/step-6",
        "metrics.jsonl",
        "tb",
        "loss.png",
        "summary.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ):
        assert (run / name).exists(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 6 and summary["world_size"] == 1
    assert summary["val_loss"] < summary["val_loss_initial"]
    assert summary["adapter_dir"] == str((run / "adapter").absolute())
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((run / "tb").rglob("events.out.tfevents*"))
    out = capsys.readouterr().out
    assert "Run finished: 6/6 steps" in out and "--enable-lora" in out
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["path"] == str(tiny_int4_dir) and saved["train"]["max_steps"] == 6


def test_existing_run_is_refused_then_resumed_or_overwritten(tmp_path, tiny_int4_dir, capsys):
    config = _config(tmp_path, tiny_int4_dir)
    assert cli.main(["train", "--config", config, "-q"]) == 0
    tokens = json.loads((tmp_path / "run" / "summary.json").read_text())["tokens"]
    (tmp_path / "run" / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert cli.main(["train", "--config", config, "-q"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    # A finished run resumed: nothing left to train, the adapter is exported again; the counts are the whole run's.
    assert cli.main(["train", "--config", config, "-q", "train.resume=latest"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["tokens"] == tokens > 0 and summary["resumed_from"].endswith("step-6")
    assert cli.main(["train", "--config", config, "-q", "output.if_exists=overwrite", "train.max_steps=3"]) == 0
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"  # only the toolkit's own files are replaced
    assert not (tmp_path / "run" / "checkpoints" / "step-6").exists()


def test_errors_reach_the_user_as_one_line(tmp_path, tiny_int4_dir, capsys):
    assert cli.main(["train", "--config", _config(tmp_path, tiny_int4_dir), "-q", "train.lrr=1"]) == 2
    assert "did you mean 'train.lr'?" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a"}])
    config = _config(tmp_path, tiny_int4_dir)
    assert cli.main(["train", "--config", config, "-q", f"data.train_files={bad}"]) == 2
    assert f"{bad}:2: the record has no 'completion' field" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # inputs are checked before the run directory is touched


def test_bf16_autocast_run_and_its_exported_adapter_reload_exactly(tmp_path, tiny_int4_dir, capsys):
    """After fit the model has its plain forward again (no autocast wrapper): reloading the exported adapter onto
    a fresh base gives the very same logits."""
    overrides = ["model.dtype=bfloat16", "train.mixed_precision=bf16", "output.export.check_reload=true"]
    assert cli.main(["train", "--config", _config(tmp_path, tiny_int4_dir), "-q", *overrides]) == 0
    assert "reproduces the trained model: max |logit difference| 0 on 3 prompts" in capsys.readouterr().out


def test_a_refused_export_keeps_the_trained_adapter(tmp_path, tiny_int4_dir, capsys):
    config = _config(tmp_path, tiny_int4_dir)
    assert cli.main(["train", "--config", config, "-q", "lora.r=600", "train.max_steps=2"]) == 2
    err = capsys.readouterr().err
    assert "the vLLM export failed: LoRA rank 600" in err and "saved with PEFT" in err
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["completed"]


def test_export_from_a_run_directory(tmp_path, tiny_int4_dir, capsys):
    assert cli.main(["train", "--config", _config(tmp_path, tiny_int4_dir), "-q", "output.export.enabled=false"]) == 0
    run = tmp_path / "run"
    assert not (run / "adapter").exists()  # export off: nothing written
    assert cli.main(["train", "--config", _config(tmp_path, tiny_int4_dir), "-q", "train.resume=latest"]) == 0
    capsys.readouterr()
    assert cli.main(["export", str(run), "--out", str(tmp_path / "served")]) == 0
    assert (tmp_path / "served" / "adapter_model.safetensors").is_file()
    assert "--max-lora-rank 8" in capsys.readouterr().out
    assert cli.main(["export", str(run), "--out", str(tmp_path / "served")]) == 2
    err = capsys.readouterr().err
    assert "already exists; pass --overwrite to replace it" in err and "overwrite=True" not in err
    assert cli.main(["export", str(run), "--out", str(tmp_path / "served"), "--overwrite"]) == 0


def test_inspect_prints_the_int4_layout(tiny_int4_dir, capsys):
    assert cli.main(["inspect", str(tiny_int4_dir)]) == 0
    out = capsys.readouterr().out
    assert "quant_method compressed-tensors, 14 INT4 modules" in out
    q_proj = next(line for line in out.splitlines() if line.startswith("model.layers.*.self_attn.q_proj (x2)"))
    # format, out x in, group, sym/asym, g_idx, scale dtype; then bytes and the ratio to bf16
    assert q_proj.split()[2:10] == ["compressed-tensors", "64", "x", "64", "32", "sym", "no", "bfloat16"]
    assert "INT4 linears:" in out


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    """The embedded demo, shortened: builds and packs the demo model, trains, exports."""
    rc = cli.main(
        [
            "demo",
            "-q",
            f"output.dir={tmp_path / 'demo'}",
            "train.max_steps=4",
            "train.eval_every=2",
            "train.save_every=2",
        ]
    )
    assert rc == 0
    run = tmp_path / "demo"
    config = json.loads((run / "demo-model" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["val_loss"] < summary["val_loss_initial"]


@pytest.mark.parametrize("problem", ["does not exist", "holds no config.json"])
def test_a_wrong_model_path_is_named_before_anything_loads(tmp_path, tiny_int4_dir, capsys, problem):
    model_dir = tmp_path / "models" / "mine"
    if problem == "holds no config.json":  # a tokenizer alone does not make a model directory
        model_dir.mkdir(parents=True)
        (model_dir / "tokenizer.json").write_bytes((tiny_int4_dir / "tokenizer.json").read_bytes())
    config = _config(tmp_path, tiny_int4_dir)
    assert cli.main(["train", "--config", config, "-q", f"model.path={model_dir}"]) == 2
    err = capsys.readouterr().err
    assert f"model directory {model_dir} (model.path) {problem}" in err
    assert "config.json (with a quantization_config" in err and "safetensors" in err and "tokenizer" in err
    assert "no loadable tokenizer" not in err
    assert not (tmp_path / "run").exists()


def test_the_loader_names_a_missing_model_directory(tmp_path):
    from int4lora_train.errors import CheckpointError
    from int4lora_train.modeling.loader import load_int4_model, load_tokenizer

    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match=f"model directory {missing} .* does not exist; an INT4 model dir"):
        load_int4_model(missing)
    with pytest.raises(CheckpointError, match=f"model directory {missing} .* does not exist"):
        load_tokenizer(missing)


def test_ctrl_c_saves_a_checkpoint_and_prints_the_command_that_resumes(tmp_path, tiny_int4_dir, capsys, monkeypatch):
    def ctrl_c_after_step_4(self, step, metrics):
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(LoraModule, "on_train_step_end", ctrl_c_after_step_4)
    assert cli.main(["train", "--config", _config(tmp_path, tiny_int4_dir), "-q"]) == 130
    err = capsys.readouterr().err
    run = tmp_path / "run"
    assert f"Interrupted at step 4/6; the newest checkpoint is {run / 'checkpoints' / 'step-4'}." in err
    assert "Traceback" not in err
    command = f"int4lora-train train --config {run / 'config.yaml'} train.resume=latest"
    assert f"Resume with:\n  {command}" in err
    monkeypatch.undo()
    assert cli.main([*command.split()[1:], "-q"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 6 and summary["resumed_from"].endswith("step-4")


def test_the_adapter_records_its_base_as_an_absolute_path(tmp_path, tiny_int4_dir, capsys, monkeypatch):
    """A relative model.path (and the demo's model, built under a relative output.dir) is recorded absolute, so the
    printed `vllm serve` command works from any directory."""
    from int4lora_train import demo

    monkeypatch.chdir(tiny_int4_dir.parent)
    base = Path.cwd() / tiny_int4_dir.name
    config = _config(tmp_path, tiny_int4_dir)
    assert cli.main(["train", "--config", config, "-q", f"model.path={tiny_int4_dir.name}", "train.max_steps=1"]) == 0
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "int4lora_base.json").read_text())["base_model"] == str(base)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    assert f"vllm serve {base} " in capsys.readouterr().out

    monkeypatch.setattr(demo, "build_demo_checkpoint", lambda out_dir: out_dir)  # where it would be built
    resolved = demo.resolve_demo(demo.demo_config(["output.dir=runs/demo"]))
    assert resolved.model.path == str(Path.cwd() / "runs" / "demo" / "demo-model")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_log_lines_print_above_the_bar_never_inside_it(tmp_path, tiny_int4_dir, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)  # before main: the log handler and the bar both write here
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert cli.main(["train", "--config", _config(tmp_path, tiny_int4_dir), "train.log_every=1"]) == 0
    text = terminal.getvalue()
    assert "train: " in text and ("step/s" in text or "s/step" in text)  # the bar was drawn
    shown = [line.split("\r")[-1] for line in text.split("\n")]  # what each terminal line ends up showing
    logged = [line for line in shown if " INFO " in line]
    assert any("step 3/6  loss" in line for line in logged)
    assert all(re.match(r"\d\d:\d\d:\d\d INFO int4lora_train", line) for line in logged), logged


def test_keep_best_is_in_the_summary_and_export_checkpoint_best_exports_it(tmp_path, tiny_int4_dir, capsys):
    from safetensors.torch import load_file

    from int4lora_train.train.checkpoint import load_checkpoint

    config = _config(tmp_path, tiny_int4_dir, keep_best=True, keep_last=1)
    assert cli.main(["train", "--config", config, "-q", "output.export.enabled=false"]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    best = Path(summary["best_checkpoint"])
    assert summary["best_step"] in (3, 6) and best == run / "checkpoints" / f"step-{summary['best_step']}"
    assert best.is_dir()
    capsys.readouterr()
    assert cli.main(["export", str(run), "--checkpoint", "best", "--out", str(tmp_path / "best")]) == 0
    exported = load_file(tmp_path / "best" / "adapter_model.safetensors")
    trained = load_checkpoint(best)["state_dict"]
    assert len(exported) == len(trained) > 0
    for name, tensor in trained.items():  # PEFT's adapter keys drop the adapter name
        assert torch.equal(exported[name.replace(".default", "")], tensor), name
    assert cli.main(["export", str(run), "--checkpoint", "step-99"]) == 2
    assert "step-99 does not exist" in capsys.readouterr().err


def test_export_checkpoint_best_without_keep_best_says_so(tmp_path, tiny_int4_dir, capsys):
    assert cli.main(["train", "--config", _config(tmp_path, tiny_int4_dir, max_steps=3), "-q"]) == 0
    capsys.readouterr()
    assert cli.main(["export", str(tmp_path / "run"), "--checkpoint", "best"]) == 2
    assert "recorded no best checkpoint" in capsys.readouterr().err


def test_eval_prompts_reach_the_metrics_log_through_the_main_job(tmp_path, tiny_int4_dir):
    config = _config(tmp_path, tiny_int4_dir, max_steps=3, eval_prompts=["12+30="], eval_max_new_tokens=3)
    assert cli.main(["train", "--config", config, "-q", "output.export.enabled=false"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    samples = [r for r in records if "eval/completion_0" in r]
    assert [r["step"] for r in samples] == [0, 3] and samples[0]["eval/prompt_0"] == "12+30="
