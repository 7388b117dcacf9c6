"""Exporting a training run's adapter: the main job's export step, its reload check, and finding a run's adapter.

The main job (:func:`int4lora_train.train.job.run_training`) takes its exporter as an argument; the CLI passes
:func:`export_run_adapter`, which exports with the ``output.export`` settings and, with ``check_reload``, proves that
the exported adapter reloaded with PEFT onto a fresh copy of the INT4 base reproduces the trained model
(:func:`reload_difference`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from int4lora_train.errors import ExportError

RELOAD_PROMPTS = ("Q: Add 12 and 30.\nA: ", "Q: Write 47 in words.\nA: ", "The quick brown fox")


def export_run_adapter(model: nn.Module | Path, tokenizer: Any, config: Any, out_dir: Path) -> tuple[Path, list[str]]:
    """Export ``model`` (the trained PEFT model, or the adapter directory gathered from FSDP shards) for vLLM into
    ``out_dir`` with ``config``'s (a ``RunConfig``) ``output.export`` settings; with ``check_reload``, then check it
    (:func:`reload_difference`). Returns the directory written and the report paragraphs to show the user."""
    from int4lora_train.export.adapter import export_adapter

    report = export_adapter(
        model,
        out_dir,
        base_model_dir=config.model.path,
        fold_scaling=config.output.export.fold_scaling,
        overwrite=True,
    )
    reports = [report.summary()]
    if config.output.export.check_reload:
        diff = reload_difference(model, tokenizer, config, report.out_dir)
        reports.append(
            f"Reloaded with PEFT onto a fresh copy of the INT4 base, the exported adapter reproduces the trained "
            f"model: max |logit difference| {diff:.3g} on {len(RELOAD_PROMPTS)} prompts"
        )
    return report.out_dir, reports


def reload_difference(trained: nn.Module, tokenizer: Any, config: Any, adapter_dir: Path) -> float:
    """max |logits(trained) - logits(base reloaded + exported adapter)| over :data:`RELOAD_PROMPTS`.

    Both run the same weights through the same operations, so the difference is 0 in practice; ``ExportError``
    above 1e-4 (fp32) or 5e-2 (half precision) means the export lost or changed something.
    """
    from int4lora_train.export.adapter import load_adapter
    from int4lora_train.train.job import load_model

    device = next(trained.parameters()).device
    reloaded = load_adapter(load_model(config, device), adapter_dir, strict=True).eval()
    was_training = trained.training
    trained.eval()
    worst = 0.0
    try:
        with torch.no_grad():
            for prompt in RELOAD_PROMPTS:
                ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
                expected = trained(input_ids=ids, use_cache=False).logits.float()
                got = reloaded(input_ids=ids, use_cache=False).logits.float()
                worst = max(worst, float((expected - got).abs().max()))
    finally:
        trained.train(was_training)
    tolerance = 1e-4 if config.model.dtype == "float32" else 5e-2
    if worst > tolerance:
        raise ExportError(
            f"the exported adapter in {adapter_dir} does not reproduce the trained model (max |logit difference| "
            f"{worst:.3g} > {tolerance:g}); please report this with the run's config.yaml"
        )
    return worst


def export_source(source: str | Path, base: str | None = None) -> tuple[Path, str | None]:
    """``(adapter directory, base checkpoint)`` for ``int4lora-train export SOURCE``: a run directory (its
    ``adapter/``, and its ``config.yaml``'s ``model.path`` unless ``base`` is given) or an adapter directory."""
    from int4lora_train.train.config import load_config
    from int4lora_train.train.job import ADAPTER_DIR, CONFIG_FILE

    adapter_dir = Path(source)
    if (adapter_dir / CONFIG_FILE).is_file():  # a run directory
        if base is None:
            base = load_config(adapter_dir / CONFIG_FILE).model.path
        adapter_dir = adapter_dir / ADAPTER_DIR
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ExportError(f"{source} is neither a run directory nor an adapter directory")
    return adapter_dir, base


def run_checkpoint(run_dir: str | Path, which: str) -> Path:
    """The checkpoint directory ``which`` names in a run directory: ``best`` (the lowest validation loss,
    ``train.keep_best``), ``last`` (the newest), ``step-N``, or a path to a checkpoint directory.

    Raises:
        ExportError: no such checkpoint, or no best one recorded (with the fix).
    """
    import json

    from int4lora_train.train.checkpoint import STATE_FILE, latest_checkpoint
    from int4lora_train.train.job import CHECKPOINTS_DIR

    root = Path(run_dir) / CHECKPOINTS_DIR
    newest = latest_checkpoint(root)
    if which in ("best", "last", "latest") and newest is None:
        raise ExportError(f"{run_dir} has no checkpoint in {root}; train with train.save_every or train.keep_best")
    if which in ("last", "latest"):
        return newest
    if which == "best":
        # The newest checkpoint's counters name the best one (a run stopped early has no summary.json yet).
        state = json.loads((newest / STATE_FILE).read_text(encoding="utf-8"))
        if state.get("best_step") is None:
            raise ExportError(
                f"{run_dir} recorded no best checkpoint (train.keep_best was off, or no evaluation ran); name one: "
                "--checkpoint last or --checkpoint step-N"
            )
        path = root / f"step-{state['best_step']}"
    else:
        path = root / which if (root / which).is_dir() else Path(which)
    if not (path / STATE_FILE).is_file():
        raise ExportError(f"checkpoint {path} does not exist (or is incomplete); see {root}")
    return path


def checkpoint_peft_model(config: Any, checkpoint: Path) -> nn.Module:
    """The run's INT4 base (``config``: its ``RunConfig``, read from ``config.yaml``; on the CPU) with its LoRA adapter
    holding ``checkpoint``'s weights."""
    from int4lora_train.train.checkpoint import load_checkpoint
    from int4lora_train.train.job import apply_lora, load_model
    from int4lora_train.train.module import LoraModule

    model = apply_lora(load_model(config, torch.device("cpu")), config)
    LoraModule(model, config.train).on_load_checkpoint(load_checkpoint(checkpoint))
    return model.eval()
