"""Every entry point names what failed, where, and the fix: damaged checkpoints are refused before anything is
restored, write failures name the path, bad settings are explained instead of surfacing a library's traceback."""

from __future__ import annotations

import errno
import json
import logging
import shutil

import pytest
import torch
import yaml
from train_helpers import arithmetic_records, write_jsonl

from int4lora_train import cli
from int4lora_train.errors import CheckpointError, ExportError, UnsupportedFormatError
from int4lora_train.train import checkpoint as ckpt
from int4lora_train.train.data import Datasets, Sample, check_positions


def _checkpoint(value: float = 1.0) -> dict:
    return {
        "state_dict": {"base_model.model.q_proj.lora_A.weight": torch.full((2, 4), value)},
        "optimizer": {"state": {}, "param_groups": []},
        "scheduler": {"last_epoch": 1},
        "trainer_state": {"step": 1},
    }


@pytest.fixture
def saved(tmp_path):
    return ckpt.save_checkpoint(tmp_path / "checkpoints", 1, _checkpoint())


def test_a_truncated_trainable_file_is_named(saved):
    tensors = saved / ckpt.TENSORS_FILE
    tensors.write_bytes(tensors.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match=rf"{ckpt.TENSORS_FILE}.*truncated"):
        ckpt.load_checkpoint(saved)


def test_a_garbage_optimizer_file_is_refused_without_unpickling_advice(saved):
    (saved / ckpt.OPTIMIZER_FILE).write_bytes(b"\x80\x04garbage that is no pickle")
    with pytest.raises(CheckpointError) as caught:
        ckpt.load_checkpoint(saved)
    message = str(caught.value)
    assert ckpt.OPTIMIZER_FILE in message and "weights_only=True" in message
    assert "weights_only=False" not in message and "step-N" in message


def test_a_checkpoint_with_non_finite_lora_tensors_is_never_resumed(tmp_path):
    bad = ckpt.save_checkpoint(tmp_path / "checkpoints", 2, _checkpoint(float("nan")))
    with pytest.raises(CheckpointError, match="non-finite.*earlier step-N"):
        ckpt.load_checkpoint(bad)


def test_a_failed_checkpoint_write_names_the_path_and_keeps_the_previous_one(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(root, 1, _checkpoint())

    def full(*args, **kwargs):
        raise OSError(errno.EFBIG, "File too large", str(root / "x"))

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(CheckpointError, match="writing checkpoint .*step-2 failed: File too large"):
        ckpt.save_checkpoint(root, 2, _checkpoint())
    assert [step for step, _ in ckpt.list_checkpoints(root)] == [1]
    assert not [p for p in root.iterdir() if p.name.startswith(".step-2")]


def test_a_failed_adapter_write_is_an_export_error_naming_the_path(tmp_path, monkeypatch):
    import safetensors.torch

    from int4lora_train.export import export_adapter

    source = tmp_path / "src"
    source.mkdir()
    (source / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    safetensors.torch.save_file(
        {f"{key}.lora_A.weight": torch.ones(2, 8), f"{key}.lora_B.weight": torch.ones(8, 2)},
        str(source / "adapter_model.safetensors"),
    )

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(ExportError, match="No space left on device.*nothing was replaced"):
        export_adapter(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rows_longer_than_the_models_positions_warn(caplog):
    rows = [Sample(*(torch.arange(n, dtype=torch.int32),) * 3) for n in (8, 40, 50)]
    with caplog.at_level(logging.WARNING, logger="int4lora_train.train.data"):
        assert check_positions(Datasets(rows[:2], rows[2:]), 32, 64) == 2
    assert "max_position_embeddings=32" in caplog.text and "data.max_length to at most 32" in caplog.text
    assert check_positions(Datasets(rows, []), None, 64) == 0


def test_custom_model_code_without_trust_remote_code_is_explained(tmp_path, tiny_int4_dir):
    from int4lora_train.modeling import load_int4_model

    model_dir = tmp_path / "remote"
    shutil.copytree(tiny_int4_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="my-model", auto_map={"AutoConfig": "configuration_my.MyConfig"})
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedFormatError, match="model.trust_remote_code: true"):
        load_int4_model(model_dir)


def _cli_config(tmp_path, model_dir, **lora) -> str:
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_records(16))
    config = {
        "model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
        "lora": {"r": 4, "alpha": 8, **lora},
        "data": {"train_files": [str(data)], "validation_split": 0.0, "format": "instruction", "max_length": 32},
        "train": {"max_steps": 2, "micro_batch_size": 2, "save_every": 1, "log_every": 1},
        "output": {"dir": str(tmp_path / "run"), "tensorboard": False, "plot": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_target_modules_matching_nothing_is_a_config_error(tmp_path, tiny_int4_dir, capsys):
    config = _cli_config(tmp_path, tiny_int4_dir, target_modules=["qproj"])
    assert cli.main(["train", "--config", config, "-q"]) == 2
    err = capsys.readouterr().err
    assert "lora.target_modules=['qproj'] matches no module" in err and "'q_proj'" in err
    assert "Traceback" not in err


def test_resuming_from_a_damaged_checkpoint_is_one_line_from_the_cli(tmp_path, tiny_int4_dir, capsys):
    config = _cli_config(tmp_path, tiny_int4_dir)
    assert cli.main(["train", "--config", config, "-q", "output.export.enabled=false"]) == 0
    step = tmp_path / "run" / "checkpoints" / "step-2"
    (step / ckpt.OPTIMIZER_FILE).write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert cli.main(["train", "--config", config, "-q", f"train.resume={step}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(step / ckpt.OPTIMIZER_FILE) in err


def test_a_full_disk_at_the_final_export_names_the_path_and_the_checkpoint(
    tmp_path, tiny_int4_dir, capsys, monkeypatch
):
    import int4lora_train.export.adapter as adapter

    def full(*args, **kwargs):
        raise OSError(errno.EFBIG, "File too large", "adapter_model.safetensors")

    monkeypatch.setattr(adapter, "_write_atomically", full)
    assert cli.main(["train", "--config", _cli_config(tmp_path, tiny_int4_dir), "-q"]) == 2
    err = capsys.readouterr().err
    assert "File too large" in err and "checkpoints/step-2" in err and "train.resume=latest" in err
