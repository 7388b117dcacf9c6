"""The main job: config -> run directory -> INT4 model + LoRA -> Trainer.fit -> adapter, plot, summary.

Run directory (``output.dir``)::

    config.yaml            the resolved config of this run
    checkpoints/step-N/    resumable checkpoints (the newest ``train.keep_last``)
    adapter/               the trained adapter (exported for vLLM when an exporter is given)
    metrics.jsonl          one JSON object per log line (train/loss, train/lr, val/loss, val/ppl, ...)
    sharding.json          FSDP runs: what each process holds of the INT4 weights and LoRA
    tb/                    TensorBoard logs
    loss.png               the loss curve
    summary.json           what the run did and where everything is

Exporting sits one layer above training, so :func:`run_training` takes the exporter as an argument (the CLI passes
:mod:`int4lora_train.export`'s); without one the adapter is written with ``PeftModel.save_pretrained``.

Where the model is loaded and what the exporter receives are the run's
:class:`~int4lora_train.train.strategy.Strategy`'s: FSDP runs (``train.strategy: fsdp``) load the INT4 model on the
CPU (memory-mapped) and let the sharding move each process's part to its device, so no process ever holds the whole
model on a GPU; at the end every process gathers the LoRA tensors and the main process hands the gathered adapter
directory to the exporter.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import (
    atomic_directory,
    check_output_path,
    claim,
    foreign_entries,
    is_within,
    read_marker,
    recover,
    recover_children,
    remove_owned,
    resolve_path,
    write_marker,
)
from ..errors import CheckpointError, ConfigError, ExportError, check_model_dir
from . import checkpoint as ckpt
from .config import DEMO, RunConfig, save_config
from .data import check_positions, load_datasets
from .metrics import TRACKER_DIRS, RunSummary, read_metrics
from .module import LoraModule
from .plot import plot_loss_curve
from .trainer import CHECKPOINTS_DIR, METRICS_FILE, SHARDING_FILE, Trainer

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
ADAPTER_DIR = "adapter"
PLOT_FILE = "loss.png"
SUMMARY_FILE = "summary.json"
GATHERED_DIR = ".gathered-adapter"
RUN_ARTIFACTS = (
    CONFIG_FILE,
    CHECKPOINTS_DIR,
    ADAPTER_DIR,
    METRICS_FILE,
    *TRACKER_DIRS.values(),
    PLOT_FILE,
    SUMMARY_FILE,
    SHARDING_FILE,
    GATHERED_DIR,
)
"""What a run writes. The run directory's marker (:mod:`int4lora_train.atomic`) records those this toolkit created;
``output.if_exists: overwrite`` removes only those, and inside them only what the toolkit wrote."""

ExportFn = Callable[[nn.Module | Path, Any, RunConfig, Path], Path]
"""``(peft_model, tokenizer, config, adapter_dir) -> the directory written``. In FSDP runs the first argument is the
directory of the PEFT adapter gathered from the shards (the model itself is sharded); ``export_adapter`` takes both."""


def run_training(config: RunConfig, *, export_fn: ExportFn | None = None, progress_bar: bool = True) -> RunSummary:
    """Run the whole job for a resolved ``config`` (no ``demo`` paths left); every process calls it.

    Returns the summary (also written to ``summary.json``). Raises ``ConfigError`` / ``DataError`` /
    ``CheckpointError`` / ``TrainingError`` with what to fix.
    """
    if DEMO in (config.model.path, config.data.validation_file, *config.data.train_files):
        raise ConfigError("the config still names `demo` paths; pass it through int4lora_train.demo.resolve_demo")
    check_model_dir(config.model.path)  # before anything loads: a wrong path is named as such
    if config.model.tokenizer is not None:
        check_model_dir(config.model.tokenizer, key="model.tokenizer", need_config=False)
    # Output paths are checked before anything loads or is created: a refused directory costs nothing. From here on
    # the run directory is the resolved one (`runs/x/..` and symlinks are what they point at).
    config = dataclasses.replace(
        config, output=dataclasses.replace(config.output, dir=str(resolve_path(config.output.dir)))
    )
    resume_from = resume_checkpoint(config)
    check_run_dir(config, resuming=resume_from is not None)
    run_dir = Path(config.output.dir)
    trainer = Trainer(
        config.train,
        run_dir,
        device=config.model.device,
        tensorboard=config.output.tensorboard,
        progress_bar=progress_bar,
    )
    acc = trainer.accelerator
    # Every process has checked the run directory above; none may write to it before all have (the main process
    # creating config.yaml would make a slower process refuse the run as "already holds a run").
    acc.wait_for_everyone()
    # Inputs first: a bad record or model path fails before the run directory is touched.
    tokenizer = load_tokenizer(config)
    datasets = load_datasets(config.data, tokenizer, config.train.seed)
    model = load_model(config, trainer.strategy.load_device)
    check_positions(datasets, getattr(model.config, "max_position_embeddings", None), config.data.max_length)
    module = LoraModule(apply_lora(model, config), config.train)
    if acc.is_main_process:
        prepare_run_dir(config, resuming=resume_from is not None)
    acc.wait_for_everyone()
    result = trainer.fit(
        module,
        datasets.train,
        datasets.validation,
        resume_from=resume_from,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        tokenizer=tokenizer,
    )

    adapter_dir, export_error = None, None
    trained: nn.Module | Path = module.unwrapped_model
    export = result.completed and config.output.export.enabled
    if export:  # FSDP: a collective, every process gathers the adapter directory, the main one writes it
        trained = trainer.strategy.adapter_for_export(trained, run_dir / GATHERED_DIR)
    if acc.is_main_process and export:
        target = export_dir(config)
        try:
            try:
                adapter_dir = (export_fn or _save_with_peft)(trained, tokenizer, config, target)
            except ExportError as exc:  # keep the trained weights all the same
                adapter_dir, export_error = save_adapter(trained, target), exc
        except OSError as exc:
            raise _write_failed(exc, target, result.last_checkpoint, config) from exc
        logger.info("adapter written to %s", adapter_dir)
    if acc.is_main_process and isinstance(trained, Path) and trained.exists():
        shutil.rmtree(trained)
    metrics_file = run_dir / METRICS_FILE
    plot = None
    if acc.is_main_process and config.output.plot:
        plot = plot_loss_curve(read_metrics(metrics_file), run_dir / PLOT_FILE, title=f"{run_dir.name}: loss")
    summary = RunSummary(
        run_dir=str(run_dir),
        adapter_dir=str(adapter_dir) if adapter_dir else None,
        metrics_file=str(metrics_file),
        tensorboard_dir=str(trainer.tensorboard_dir) if trainer.tensorboard_dir else None,
        loss_plot=str(plot) if plot else None,
        **asdict(result),
    )
    if acc.is_main_process:
        summary.save(run_dir / SUMMARY_FILE)
        for name in trainer.report_to:  # the trackers' files in the run directory are this run's
            tracker_dir = run_dir / TRACKER_DIRS[name]
            if tracker_dir.is_dir() and not tracker_dir.is_symlink():
                write_marker(tracker_dir, name)
    acc.wait_for_everyone()
    acc.end_training()
    if export_error is not None:
        raise ExportError(
            f"training finished, but the vLLM export failed: {export_error} The trained adapter is saved with PEFT "
            f"in {adapter_dir} (`int4lora-train export {run_dir}` exports it again)."
        ) from export_error
    return summary


def resume_checkpoint(config: RunConfig) -> Path | None:
    """The checkpoint to resume from: ``None`` (fresh), the newest in the run directory, or the given path."""
    target = config.resume_target
    if target is None:
        return None
    if target == "latest":
        root = Path(config.output.dir) / CHECKPOINTS_DIR
        if int(os.environ.get("RANK", "0")) == 0:  # one process finishes what a crash interrupted (atomic.recover)
            recover_children(root)
        latest = ckpt.latest_checkpoint(root)
        if latest is None:
            logger.warning("train.resume=latest but %s has no checkpoint yet: a fresh run", config.output.dir)
        return latest
    path = Path(target)
    if not (path / ckpt.STATE_FILE).is_file():
        raise ConfigError(f"train.resume={target!r} is not a checkpoint directory (no {ckpt.STATE_FILE} in it)")
    return path


def resume_command(config: RunConfig) -> str:
    """The command line that resumes this run from its newest checkpoint (fresh if it has none): its saved
    ``config.yaml`` with ``train.resume=latest``."""
    command = f"int4lora-train train --config {Path(config.output.dir) / CONFIG_FILE} train.resume=latest"
    if not Path(config.output.dir).is_absolute():
        command = f"cd {Path.cwd()} && {command}"  # the config's relative paths are relative to this directory
    return command


def export_dir(config: RunConfig) -> Path:
    """Where the adapter is exported: ``output.export.dir`` (resolved), else ``<output.dir>/adapter``."""
    return resolve_path(config.output.export.dir or Path(config.output.dir) / ADAPTER_DIR)


def _owned_names(run_dir: Path) -> set[str]:
    marker = read_marker(run_dir)
    return {entry.rstrip("/") for entry in marker["entries"]} if marker else set()


def check_run_dir(config: RunConfig, resuming: bool) -> list[str]:
    """The toolkit's files already in the run directory that this run will replace (``[]`` when resuming).

    Checked before anything loads: the run and export directories resolved (``..``, symlinks), writable,
    directories, outside the model directory, and the export directory neither containing nor inside the run
    directory (other than the default ``adapter/``). Raises ``ConfigError`` when the run directory holds a file this
    run writes that the toolkit did not write (its marker does not list it: never replaced), or an earlier run that
    is neither resumed nor to be overwritten (``output.if_exists``). ``train.resume=latest`` with no checkpoint is a
    fresh run: it replaces an earlier run only with ``output.if_exists: overwrite``.
    """
    model_dir = config.model.path
    try:
        run_dir = check_output_path(config.output.dir, what="run directory", key="output.dir", model_dir=model_dir)
        target = export_dir(config)
        if config.output.export.enabled:
            check_output_path(target, what="export directory", key="output.export.dir", model_dir=model_dir)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    if config.output.export.enabled and target != run_dir / ADAPTER_DIR:
        if is_within(run_dir, target) or is_within(target, run_dir):
            relation = "is" if target == run_dir else "contains" if is_within(run_dir, target) else "lies inside"
            raise ConfigError(
                f"output.export.dir {target} {relation} the run directory {run_dir}; an export there could replace "
                "the run (or the run the export). Set output.export.dir outside the run directory, or leave it "
                f"null for {run_dir / ADAPTER_DIR}."
            )
        if target.is_dir() and any(target.iterdir()):
            foreign = foreign_entries(target)
            if foreign:
                raise ConfigError(
                    f"output.export.dir {target} holds files int4lora-train did not write ({', '.join(foreign[:5])}); "
                    "the export never replaces them. Choose an empty or new directory."
                )
            if not resuming and config.output.if_exists == "error":
                raise ConfigError(
                    f"output.export.dir {target} holds an earlier export; set output.if_exists=overwrite to replace "
                    "it, or choose another directory"
                )
    present = [name for name in RUN_ARTIFACTS if (run_dir / name).exists() or (run_dir / name).is_symlink()]
    owned = _owned_names(run_dir)
    foreign = [name for name in present if name not in owned]
    if foreign:
        raise ConfigError(
            f"{run_dir} holds {', '.join(foreign)}, which int4lora-train did not write (no {run_dir.name}/.int4lora-"
            "owned marker lists it); a run never replaces them. Move them away or choose another output.dir"
        )
    found = [] if resuming else present
    if found and config.output.if_exists == "error":
        how = (
            "train.resume=latest found no checkpoint to continue from, so this is a fresh run; "
            if config.resume_target is not None
            else "set train.resume=latest to continue it, "
        )
        raise ConfigError(
            f"{run_dir} already holds a run ({', '.join(found)}); {how}output.if_exists=overwrite to replace it, "
            "or choose another output.dir"
        )
    return found


def prepare_run_dir(config: RunConfig, resuming: bool) -> Path:
    """Create the run directory, remove what :func:`check_run_dir` allows to replace (only what the toolkit wrote),
    record what this run writes in the directory's marker, write ``config.yaml``."""
    found = check_run_dir(config, resuming)
    run_dir = resolve_path(config.output.dir)
    kept: list[str] = []
    for name in found:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            if read_marker(path) is None:
                kept.append(str(path))
                continue
            recover(path)
            kept += remove_owned(path)
        else:
            path.unlink()
    if found:
        logger.warning("replaced the previous run in %s: removed %s", run_dir, ", ".join(found))
    if kept:
        logger.warning("kept what int4lora-train did not write in %s: %s", run_dir, ", ".join(kept))
    run_dir.mkdir(parents=True, exist_ok=True)
    claim(run_dir, [name + "/" if name in _RUN_SUBDIRS else name for name in RUN_ARTIFACTS])
    report_to = config.train.report_to
    tensorboard = config.output.tensorboard if report_to is None else "tensorboard" in report_to
    for name in (CHECKPOINTS_DIR, TRACKER_DIRS["tensorboard"]) if tensorboard else (CHECKPOINTS_DIR,):
        (run_dir / name).mkdir(exist_ok=True)
        if read_marker(run_dir / name) is None:
            write_marker(run_dir / name, name, entries=[])
    save_config(config, run_dir / CONFIG_FILE)
    return run_dir


_RUN_SUBDIRS = (CHECKPOINTS_DIR, ADAPTER_DIR, *TRACKER_DIRS.values(), GATHERED_DIR)


def _write_failed(exc: OSError, target: Path, last_checkpoint: str | None, config: RunConfig) -> CheckpointError:
    where = f"the trained LoRA is in checkpoint {last_checkpoint}" if last_checkpoint else "no checkpoint holds it"
    return CheckpointError(
        f"training finished, but writing the adapter to {exc.filename or target} failed: {exc.strerror or exc}; "
        f"{where}. Free space or fix permissions, then `{resume_command(config)}` exports it again."
    )


# ---------------------------------------------------------------------------------------------------------------
# Model


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load_tokenizer(config: RunConfig):
    from ..modeling.loader import load_tokenizer as _load

    return _load(config.model.tokenizer or config.model.path, trust_remote_code=config.model.trust_remote_code)


def load_model(config: RunConfig, device: torch.device) -> nn.Module:
    """The INT4 checkpoint of ``model.path`` with ``Int4Linear`` inside, on ``device``."""
    from ..modeling.loader import load_int4_model

    model_cfg = config.model
    model = load_int4_model(
        model_cfg.path,
        device=device,
        dtype=_DTYPES[model_cfg.dtype],
        mode=model_cfg.mode,
        cache_max_bytes=None if model_cfg.cache_budget_mb is None else int(model_cfg.cache_budget_mb * 2**20),
        trust_remote_code=model_cfg.trust_remote_code,
        allow_pickle=model_cfg.allow_pickle,
    )
    return model


def apply_lora(model: nn.Module, config: RunConfig) -> nn.Module:
    """``get_peft_model`` with the ``lora`` settings (the INT4 LoRA layer registered)."""
    from peft import get_peft_model

    from ..modeling.peft_integration import make_lora_config, trainable_parameter_count

    lora = config.lora
    lora_config = make_lora_config(
        r=lora.r,
        lora_alpha=lora.alpha,
        target_modules=lora.target_modules,
        lora_dropout=lora.dropout,
        use_rslora=lora.use_rslora,
    )
    try:
        peft_model = get_peft_model(model, lora_config)
    except ValueError as exc:
        if "Target module" not in str(exc) and "target_modules" not in str(exc):
            raise
        names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"lora.target_modules={lora.target_modules!r} matches no module LoRA can attach to in {config.model.path}; "
            f"its linear layers are named {names}. List some of those, or use all-linear."
        ) from None
    trainable, total = trainable_parameter_count(peft_model)
    logger.info(
        "LoRA r=%d on %s: %s trainable of %s parameters (%.3f%%)",
        lora.r,
        lora.target_modules,
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / max(total, 1),
    )
    return peft_model


def _save_with_peft(peft_model: nn.Module | Path, tokenizer: Any, config: RunConfig, out_dir: Path) -> Path:
    return save_adapter(peft_model, out_dir)


def save_adapter(peft_model: nn.Module | Path, out_dir: Path) -> Path:
    """``save_pretrained`` (or copy an adapter directory) into ``out_dir``, atomically; this run's previous adapter
    there is replaced."""
    with atomic_directory(out_dir, overwrite=True, kind="adapter", what="adapter directory") as tmp:
        if isinstance(peft_model, Path):
            shutil.copytree(peft_model, tmp, dirs_exist_ok=True)
        else:
            peft_model.save_pretrained(str(tmp))
        from ..export.adapter import normalize_adapter_config

        normalize_adapter_config(tmp)
    return out_dir
