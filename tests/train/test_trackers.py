"""train.report_to: accelerate's trackers, offline and inside the run directory by default; a missing package is a
ConfigError naming the extra. wandb and mlflow are stand-ins here (the real packages are optional extras)."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
from train_helpers import arithmetic_records, tiny_peft_model, write_jsonl

from int4lora_train.errors import ConfigError
from int4lora_train.modeling.tiny_models import build_tokenizer
from int4lora_train.train import metrics
from int4lora_train.train.config import load_config
from int4lora_train.train.data import load_datasets
from int4lora_train.train.module import LoraModule
from int4lora_train.train.trainer import Trainer


def _run(tmp_path, report_to: str, *overrides: str):
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_records(16))
    config = load_config(
        None,
        [
            f"data.train_files={data}",
            "data.max_length=32",
            "train.max_steps=2",
            "train.log_every=1",
            f"train.report_to={report_to}",
            f"output.dir={tmp_path / 'run'}",
            *overrides,
        ],
    )
    datasets = load_datasets(config.data, build_tokenizer(), config.train.seed)
    trainer = Trainer(config.train, tmp_path / "run", device="cpu", progress_bar=False)
    trainer.fit(LoraModule(tiny_peft_model(), config.train), datasets.train)
    return trainer


def _fake_module(monkeypatch, name: str, **functions) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec() sees it as installed
    for key, value in functions.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_wandb_runs_offline_in_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    seen: dict = {"logged": []}

    class Run:
        def log(self, values, step=None, **kwargs):
            seen["logged"].append((step, values))

        def finish(self):
            seen["finished"] = True

    def init(**kwargs):
        seen["init"] = kwargs
        return Run()

    _fake_module(monkeypatch, "wandb", init=init)
    trainer = _run(tmp_path, "[wandb]")
    assert seen["init"] == {"project": "int4lora-train", "name": "run", "dir": str(tmp_path / "run"), "mode": "offline"}
    assert [step for step, values in seen["logged"] if "train/loss" in values] == [1, 2]
    assert seen["finished"] and trainer.report_to == ["wandb"] and trainer.tensorboard_dir is None


def test_mlflow_writes_a_local_store_in_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    seen: dict = {"metrics": []}
    _fake_module(
        monkeypatch,
        "mlflow",
        set_tracking_uri=lambda uri: seen.setdefault("uri", uri),
        search_experiments=lambda filter_string: [],
        create_experiment=lambda name, artifact_location, tags: seen.setdefault("experiment", name),
        start_run=lambda **kwargs: seen.setdefault("run", kwargs),
        log_metrics=lambda values, step=None: seen["metrics"].append((step, values)),
        end_run=lambda: seen.setdefault("ended", True),
    )
    _run(tmp_path, "[mlflow, tensorboard]")
    assert seen["uri"] == (tmp_path / "run" / "mlruns").resolve().as_uri()
    assert (seen["experiment"], seen["run"]["run_name"]) == ("int4lora-train", "run")
    assert [step for step, values in seen["metrics"] if "train/loss" in values] == [1, 2]
    assert seen["ended"] and list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("name", ["wandb", "mlflow", "tensorboard"])
def test_a_missing_tracker_package_names_its_extra(tmp_path, monkeypatch, name):
    monkeypatch.setattr(metrics, "tracker_installed", lambda package: False)
    with pytest.raises(ConfigError, match=rf"pip install 'int4lora-train\[{name}\]'"):
        _run(tmp_path, f"[{name}]")


def test_report_to_is_checked_against_output_tensorboard():
    with pytest.raises(ConfigError, match="train.report_to lists tensorboard but output.tensorboard is false"):
        load_config(None, ["train.report_to=[tensorboard]", "output.tensorboard=false"])
    with pytest.raises(ConfigError, match=r"train.report_to\[0\] must be one of"):
        load_config(None, ["train.report_to=[neptune]"])
    assert load_config(None, ["train.report_to=wandb"]).train.report_to == ["wandb"]


def test_tracker_directories_belong_to_the_run(tmp_path, monkeypatch, tiny_int4_dir):
    """A wandb directory written during a run is the run's: `output.if_exists: overwrite` replaces it."""
    import yaml

    from int4lora_train import cli

    monkeypatch.delenv("WANDB_MODE", raising=False)
    runs = []

    class Run:
        def log(self, values, step=None, **kwargs):
            pass

        def finish(self):
            pass

    def init(dir, **kwargs):
        offline = tmp_path / "run" / "wandb" / f"offline-run-{len(runs)}"
        offline.mkdir(parents=True)
        (offline / "run.wandb").write_text("events", encoding="utf-8")
        runs.append(offline)
        return Run()

    _fake_module(monkeypatch, "wandb", init=init)
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_records(16))
    config = {
        "model": {"path": str(tiny_int4_dir), "dtype": "float32", "device": "cpu"},
        "data": {"train_files": [str(data)], "max_length": 32},
        "train": {"max_steps": 1, "report_to": ["wandb"]},
        "output": {"dir": str(tmp_path / "run"), "export": {"enabled": False}, "plot": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert cli.main(["train", "--config", str(path), "-q"]) == 0
    assert not (tmp_path / "run" / "tb").exists()
    assert cli.main(["train", "--config", str(path), "-q", "output.if_exists=overwrite"]) == 0
    assert not runs[0].exists() and (runs[1] / "run.wandb").is_file()
