"""Nothing the user owns is ever touched, and no crash loses both versions of a directory the toolkit replaces.

Every test plants foreign files (a README, notes, a user's own config.yaml or step-N) where the toolkit writes and
asserts they are byte-for-byte intact afterwards. The crash tests fork a child that writes a new version over an
old one and SIGKILLs itself at filesystem step k (:func:`int4lora_train.atomic.set_fault_hook`), for every k; the
target must then hold the old or the new version, complete (with ``renameat2(RENAME_EXCHANGE)`` at once, with the
fallback protocol after :func:`~int4lora_train.atomic.recover`, which every later write runs first).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from modeling_helpers import tiny_int4_checkpoint
from safetensors.torch import save_file

from int4lora_train import atomic, cli
from int4lora_train.atomic import MARKER, read_marker, recover, set_fault_hook
from int4lora_train.errors import CheckpointError, ConfigError
from int4lora_train.export import export_adapter
from int4lora_train.train import checkpoint as ckpt
from int4lora_train.train.config import load_config
from int4lora_train.train.job import check_run_dir, prepare_run_dir, resume_checkpoint

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file (bytes) and symlink (target) under ``root``, by relative path."""
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            found[rel] = path.read_bytes()
    return found


def plant(path: Path, text: str = "the user's own") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def run_config(tmp_path: Path, model_dir: Path, out_dir: str | Path, **sections) -> object:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}:", "completion": f"{a}{a}"}) + "\n" for a in range(10, 42)))
    raw = {
        "model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
        "lora": {"r": 4, "alpha": 8},
        "data": {"train_files": [str(data)], "validation_split": 0.125, "format": "instruction", "max_length": 32},
        "train": {"max_steps": 2, "micro_batch_size": 2, "log_every": 1, "save_every": 1, "keep_last": 1},
        "output": {"dir": str(out_dir), "tensorboard": False, "plot": False},
    }
    for section, values in sections.items():
        raw[section].update(values)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_int4_checkpoint(
        tmp_path_factory.mktemp("int4") / "model", dtype=torch.bfloat16, group_size=32, sizes=TINY
    )


def fake_previous_run(run: Path, config) -> None:
    """What a finished run leaves, written by the toolkit's own functions (so it carries the markers)."""
    prepare_run_dir(config, resuming=False)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "summary.json").write_text("{}")
    atomic.claim(run, ["metrics.jsonl", "summary.json"])
    with atomic.atomic_directory(run / "adapter", kind="adapter") as tmp:
        (tmp / "adapter_config.json").write_text("{}")


# ------------------------------------------------------------------------------------------------- run directory


def test_resume_latest_without_a_checkpoint_is_a_fresh_run_and_refuses_to_replace(tmp_path, model_dir):
    run = tmp_path / "run"
    config = load_config(run_config(tmp_path, model_dir, run))
    fake_previous_run(run, config)
    before = snapshot(run)
    resumed = load_config(run_config(tmp_path, model_dir, run), ["train.resume=latest"])
    assert resume_checkpoint(resumed) is None
    with pytest.raises(ConfigError, match="no checkpoint to continue from.*if_exists=overwrite"):
        check_run_dir(resumed, resuming=False)
    assert snapshot(run) == before


def test_a_users_own_config_yaml_is_never_replaced_even_with_overwrite(tmp_path, model_dir):
    run = tmp_path / "project"
    plant(run / "config.yaml", "my: own config\n")
    plant(run / "notes.txt")
    before = snapshot(run)
    for overrides in ([], ["output.if_exists=overwrite"], ["train.resume=latest"]):
        config = load_config(run_config(tmp_path, model_dir, run), overrides)
        with pytest.raises(ConfigError, match="config.yaml, which int4lora-train did not write"):
            check_run_dir(config, resuming=False)
    assert snapshot(run) == before


def test_dot_dot_paths_are_resolved_before_the_check(tmp_path, model_dir):
    project = tmp_path / "project"
    fake_previous_run(project, load_config(run_config(tmp_path, model_dir, project)))
    before = snapshot(project)
    config = load_config(run_config(tmp_path, model_dir, f"{project}/nonexistent/.."), ["output.if_exists=error"])
    with pytest.raises(ConfigError, match="already holds a run"):
        check_run_dir(config, resuming=False)
    assert snapshot(project) == before and not (project / "nonexistent").exists()


def test_an_export_dir_around_or_inside_the_run_is_refused(tmp_path, model_dir):
    run = tmp_path / "runs" / "a"
    plant(tmp_path / "runs" / "notes.txt")
    for export_dir in (tmp_path / "runs", run, run / "checkpoints", tmp_path):
        config = load_config(run_config(tmp_path, model_dir, run, output={"export": {"dir": str(export_dir)}}))
        with pytest.raises(ConfigError, match="the run directory"):
            check_run_dir(config, resuming=False)
    assert (tmp_path / "runs" / "notes.txt").read_text() == "the user's own"


def test_an_export_dir_holding_foreign_files_is_refused_before_training(tmp_path, model_dir):
    served = tmp_path / "served"
    plant(served / "README.txt")
    config = load_config(
        run_config(
            tmp_path, model_dir, tmp_path / "run", output={"export": {"dir": str(served)}, "if_exists": "overwrite"}
        )
    )
    with pytest.raises(ConfigError, match="README.txt"):
        check_run_dir(config, resuming=False)
    assert (served / "README.txt").read_text() == "the user's own"


@pytest.mark.parametrize("problem", ["file", "under-a-file", "unwritable", "inside-model"])
def test_output_paths_are_checked_before_anything_loads(tmp_path, model_dir, problem, monkeypatch):
    if problem == "file":
        out, match = plant(tmp_path / "taken"), "is not a directory"
    elif problem == "under-a-file":
        out, match = plant(tmp_path / "taken") / "run", "is a file, not a directory"
    elif problem == "unwritable":
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        if os.geteuid() == 0:  # root writes everywhere: let os.access answer as for a user
            real_access = os.access
            monkeypatch.setattr(os, "access", lambda p, m: Path(p) != locked and real_access(p, m))
        out, match = locked / "run", "not writable"
    else:
        out, match = model_dir / "run", "inside the model directory"
    config = load_config(run_config(tmp_path, model_dir, out))
    with pytest.raises(ConfigError, match=match):
        check_run_dir(config, resuming=False)


def test_if_exists_overwrite_removes_only_what_the_toolkit_wrote(tmp_path, model_dir, caplog):
    run = tmp_path / "run"
    config = load_config(run_config(tmp_path, model_dir, run), ["output.if_exists=overwrite"])
    fake_previous_run(run, config)
    theirs = [
        plant(run / "notes.txt"),
        plant(run / "checkpoints" / "my-analysis.txt"),
        plant(run / "tb" / "my-events.txt"),
        plant(run / "checkpoints" / "step-1" / "trainer_state.json", '{"mine": true}'),  # a step-N of the user's
    ]
    plant(run / "adapter" / "README.txt")  # inside an owned directory: now it holds a foreign file
    theirs.append(run / "adapter" / "README.txt")
    before = {p: p.read_bytes() for p in theirs}
    with caplog.at_level("WARNING"):
        prepare_run_dir(config, resuming=False)
    assert {p: p.read_bytes() for p in theirs} == before
    assert not (run / "metrics.jsonl").exists() and not (run / "adapter" / "adapter_config.json").exists()
    assert "replaced the previous run" in caplog.text and "kept what int4lora-train did not write" in caplog.text


def test_quiet_cli_still_reports_a_replacement(tmp_path, model_dir, capsys):
    run = tmp_path / "run"
    config = str(run_config(tmp_path, model_dir, run))
    assert cli.main(["train", "--config", config, "-q"]) == 0
    plant(run / "notes.txt")
    assert cli.main(["train", "--config", config, "-q", "train.resume=latest", "output.if_exists=error"]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--config", config, "-q", "output.if_exists=overwrite"]) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "replaced the previous run" in err
    assert (run / "notes.txt").read_text() == "the user's own"


# --------------------------------------------------------------------------------------------------- checkpoints


def _checkpoint(value: float) -> dict:
    return {
        "state_dict": {"lora.weight": torch.full((4, 4), value)},
        "optimizer": {"state": {}, "param_groups": []},
        "scheduler": {"last_epoch": 0},
        "trainer_state": {"step": int(value)},
    }


def test_keep_last_removes_only_checkpoints_the_toolkit_wrote(tmp_path):
    root = tmp_path / "checkpoints"
    users = plant(root / "step-1" / ckpt.STATE_FILE, '{"step": 1}')
    for step in (2, 3, 4):
        ckpt.save_checkpoint(root, step, _checkpoint(step), keep_last=1)
    assert users.read_text() == '{"step": 1}'
    assert sorted(p.name for p in root.iterdir() if p.name != MARKER) == ["step-1", "step-4"]


def test_a_step_symlink_is_refused_before_anything_is_written(tmp_path):
    root = tmp_path / "checkpoints"
    elsewhere = plant(tmp_path / "precious" / "data.txt").parent
    root.mkdir()
    (root / "step-2").symlink_to(elsewhere)
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="not written by int4lora-train"):
        ckpt.save_checkpoint(root, 2, _checkpoint(2))
    assert snapshot(tmp_path) == before


def test_leftovers_are_removed_only_when_marked(tmp_path):
    target = tmp_path / "adapter"
    ours = tmp_path / ".adapter.tmp-deadbeef"
    ours.mkdir()
    atomic.write_marker(ours, "adapter", state="writing")
    theirs = plant(tmp_path / ".adapter.old-cafecafe" / "mine.txt").parent
    with atomic.atomic_directory(target, kind="adapter") as tmp:
        (tmp / "x").write_text("new")
    assert not ours.exists() and (theirs / "mine.txt").read_text() == "the user's own"


# -------------------------------------------------------------------------------------------- crash at every step


def _crash_at(k: int | str):
    """SIGKILL at the k-th fault point, or at the one named k."""
    count = 0

    def hook(step: str) -> None:
        nonlocal count
        count += 1
        if count == k or step == k:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _in_child(k: int | str, work) -> bool:
    """Run ``work()`` in a forked child killed (SIGKILL) at fault point ``k``; True if it was killed."""
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            set_fault_hook(_crash_at(k))
            work()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, "the write failed without being killed"
    return False


def _adapter_source(directory: Path, value: float) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "bias": "none"}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {f"{key}.lora_A.weight": torch.full((2, 8), value), f"{key}.lora_B.weight": torch.full((8, 2), value)}
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


def _version(target: Path, weights: str, versions: dict[bytes, str]) -> str:
    assert target.is_dir(), f"{target} is missing"
    assert read_marker(target)["state"] == "complete"
    return versions[(target / weights).read_bytes()]


@pytest.fixture(params=["exchange", "fallback"])
def protocol(request):
    if request.param == "exchange" and atomic._renameat2_exchange() is None:
        pytest.skip("no renameat2 in this libc")
    atomic.use_exchange(request.param == "exchange")
    yield request.param
    atomic.use_exchange(True)


def test_a_crash_at_any_step_of_an_export_leaves_the_old_or_the_new_adapter(tmp_path, protocol):
    old_src, new_src = _adapter_source(tmp_path / "old", 1.0), _adapter_source(tmp_path / "new", 2.0)
    weights = "adapter_model.safetensors"
    seen, k = set(), 1
    while True:
        case = tmp_path / f"case-{k}"
        target = case / "served"
        export_adapter(old_src, target)
        versions = {(target / weights).read_bytes(): "old"}
        export_adapter(new_src, case / "reference")
        versions[(case / "reference" / weights).read_bytes()] = "new"
        killed = _in_child(k, lambda target=target: export_adapter(new_src, target, overwrite=True))
        if protocol == "exchange" or not killed:
            seen.add(_version(target, weights, versions))  # at once, before any recovery
        recover(target)  # what the next start does
        seen.add(_version(target, weights, versions))
        assert not [p for p in case.iterdir() if p.name.startswith(".served.")]  # leftovers cleaned up
        if not killed:
            break
        k += 1
    assert k > 5 and seen == {"old", "new"}


def test_a_crash_at_any_step_of_a_checkpoint_save_leaves_the_old_or_the_new_checkpoint(tmp_path, protocol):
    seen, k = set(), 1
    while True:
        root = tmp_path / f"case-{k}" / "checkpoints"
        ckpt.save_checkpoint(root, 3, _checkpoint(1.0))
        killed = _in_child(k, lambda root=root: ckpt.save_checkpoint(root, 3, _checkpoint(2.0)))
        final = root / "step-3"
        if protocol == "fallback" and killed:
            recover(final)
        assert read_marker(final)["state"] == "complete"
        value = float(ckpt.load_checkpoint(final)["state_dict"]["lora.weight"][0, 0])
        assert value in (1.0, 2.0)
        seen.add(value)
        recover(final)
        assert [step for step, _ in ckpt.list_checkpoints(root)] == [3]
        assert not [p for p in root.iterdir() if p.name.startswith(".step-3.")]
        if not killed:
            break
        k += 1
    assert k > 5 and seen == {1.0, 2.0}


def test_export_cli_never_replaces_a_directory_it_did_not_write(tmp_path, capsys):
    source = _adapter_source(tmp_path / "runs" / "adapter", 1.0)
    served = tmp_path / "served"
    readme = plant(served / "README.txt")
    assert cli.main(["export", str(source), "--out", str(served), "--overwrite"]) == 2
    assert "not written by int4lora-train" in capsys.readouterr().err and readme.read_text() == "the user's own"
    for around in (source, source.parent):  # the adapter itself, or the directory that holds it
        assert cli.main(["export", str(source), "--out", str(around), "--overwrite"]) == 2
        assert "the adapter being exported" in capsys.readouterr().err
    assert (source / "adapter_model.safetensors").is_file()
    assert cli.main(["export", str(source), "--out", str(tmp_path / "fresh")]) == 0
    assert cli.main(["export", str(source), "--out", str(tmp_path / "fresh"), "--overwrite"]) == 0  # its own


def test_resume_latest_finishes_a_checkpoint_swap_a_crash_interrupted(tmp_path, model_dir):
    run = tmp_path / "run"
    config = load_config(run_config(tmp_path, model_dir, run), ["train.resume=latest"])
    root = run / "checkpoints"
    ckpt.save_checkpoint(root, 2, _checkpoint(1.0))
    atomic.use_exchange(False)
    try:
        assert _in_child("moved old aside", lambda: ckpt.save_checkpoint(root, 2, _checkpoint(2.0)))
    finally:
        atomic.use_exchange(True)
    assert not (root / "step-2").exists()  # the fallback's one window: neither version at the target
    assert resume_checkpoint(config) == root / "step-2"  # the next start puts the complete new one in place
    assert float(ckpt.load_checkpoint(root / "step-2")["state_dict"]["lora.weight"][0, 0]) == 2.0


def test_merged_exports_follow_the_same_rule(tmp_path):
    from modeling_helpers import tiny_int4_lora_model

    from int4lora_train.export.merge import merge_to_dense

    model = tiny_int4_lora_model()
    merged = tmp_path / "merged"
    readme = plant(merged / "README.txt")
    with pytest.raises(CheckpointError, match="not written by int4lora-train"):
        merge_to_dense(model, merged, overwrite=True)
    assert readme.read_text() == "the user's own"
    merge_to_dense(model, tmp_path / "mine")
    merge_to_dense(model, tmp_path / "mine", overwrite=True)  # its own: replaced
    assert read_marker(tmp_path / "mine")["kind"] == "merged-dense"


def test_resume_latest_without_a_checkpoint_keeps_the_previous_run_from_the_cli(tmp_path, model_dir, capsys):
    run = tmp_path / "run"
    config = str(run_config(tmp_path, model_dir, run))
    assert cli.main(["train", "--config", config, "-q"]) == 0
    for step in (run / "checkpoints").glob("step-*"):  # the user freed the space: no checkpoint to resume
        shutil.rmtree(step)
    plant(run / "notes.txt")
    before = snapshot(run)
    capsys.readouterr()
    assert cli.main(["train", "--config", config, "-q", "train.resume=latest", "train.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "no checkpoint to continue from" in err
    assert snapshot(run) == before  # adapter, config.yaml, metrics, summary: all as they were
