"""Metrics: a JSONL tracker for accelerate, the experiment trackers of ``train.report_to``, reading the log back,
and the run summary."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker

from ..errors import ConfigError

TRACKER_DIRS = {"tensorboard": "tb", "wandb": "wandb", "mlflow": "mlruns"}
"""Where each tracker of ``train.report_to`` writes inside the run directory (when offline)."""

_TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}
PROJECT = "int4lora-train"


def tracker_installed(name: str) -> bool:
    return any(importlib.util.find_spec(package) for package in _TRACKER_PACKAGES[name])


def experiment_trackers(report_to: Sequence[str], run_dir: Path) -> list[GeneralTracker]:
    """accelerate's trackers for ``report_to`` (``tensorboard``, ``wandb``, ``mlflow``), writing inside ``run_dir``
    unless the user's environment points them elsewhere (``WANDB_MODE``, ``MLFLOW_TRACKING_URI``).

    Raises:
        ConfigError: a tracker whose package is not installed, naming the extra that installs it.
    """
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    class OfflineMLflowTracker(MLflowTracker):
        """MLflow into ``<run>/mlruns`` (a local file store) unless ``MLFLOW_TRACKING_URI`` says otherwise."""

        def start(self) -> None:
            import mlflow

            if not os.environ.get("MLFLOW_TRACKING_URI"):
                mlflow.set_tracking_uri((run_dir / TRACKER_DIRS["mlflow"]).resolve().as_uri())
            super().start()

    trackers: list[GeneralTracker] = []
    for name in dict.fromkeys(report_to):
        if not tracker_installed(name):
            raise ConfigError(
                f"train.report_to lists {name}, but the {name} package is not installed; install it with "
                f"pip install 'int4lora-train[{name}]' (or pip install {name}), or remove {name} from train.report_to"
            )
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(TRACKER_DIRS[name], run_dir))
        elif name == "wandb":
            mode = os.environ.get("WANDB_MODE", "offline")  # no account, no network unless asked for
            trackers.append(WandBTracker(PROJECT, name=run_dir.name, dir=str(run_dir), mode=mode))
        else:
            trackers.append(OfflineMLflowTracker(PROJECT, run_name=run_dir.name))
    return trackers


class JsonlTracker(GeneralTracker):
    """An accelerate tracker appending one JSON object per ``log`` call: ``{"step": N, "train/loss": ...}``.

    ``resume_step`` drops records after that step first, so a resumed run's log reads as if never interrupted.
    """

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str | Path, resume_step: int | None = None):
        super().__init__()
        self.path = Path(path)
        self.resume_step = resume_step
        self._file = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.resume_step is None:
            self.path.write_text("", encoding="utf-8")
        else:
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= self.resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        self._file = self.path.open("a", encoding="utf-8")

    @property
    def tracker(self):
        return self._file

    def store_init_configuration(self, values: dict) -> None:
        """The resolved config is already ``config.yaml`` in the run directory."""

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        if self._file is None:
            self.start()
        record = {"step": step, **{k: _jsonable(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file (``[]`` if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def perplexity(loss: float) -> float:
    """``exp(loss)``, ``inf`` where that overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` did: steps, time, throughput and losses.

    ``steps``, ``tokens`` and the losses count the whole run, across resumes; ``elapsed_s`` and ``tokens_per_s``
    measure this session's training steps only.
    """

    completed: bool
    steps: int
    max_steps: int
    world_size: int
    elapsed_s: float
    tokens: int
    tokens_per_s: float
    train_loss_first: float | None
    train_loss_final: float | None
    val_loss_initial: float | None
    val_loss: float | None
    val_ppl: float | None
    resumed_from: str | None
    last_checkpoint: str | None
    ranks_in_sync: bool | None
    best_checkpoint: str | None  # train.keep_best: the checkpoint with the lowest validation loss
    best_step: int | None
    best_val_loss: float | None
    memory: dict[str, Any] | None  # the device-memory plan (train.memory): its log line, choices and estimate
    cuda_graphs: dict[str, Any] | None  # train.speed.cuda_graphs when on: captures, graphed and eager layer
    # calls, the padded row length


@dataclass
class RunSummary(FitResult):
    """What a run did and where its outputs are (``summary.json``): the Trainer's result plus the paths."""

    run_dir: str
    adapter_dir: str | None
    metrics_file: str
    tensorboard_dir: str | None
    loss_plot: str | None

    def to_dict(self) -> dict[str, Any]:
        return {k: _jsonable(v) for k, v in asdict(self).items()}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    def format(self) -> str:
        """A few human lines (the CLI prints this)."""

        def num(value: float | None, spec: str = ".4f") -> str:
            return "n/a" if value is None else format(value, spec)

        state = "finished" if self.completed else "stopped early (resume with train.resume=latest)"
        session = " (this session)" if self.resumed_from else ""
        lines = [
            f"Run {state}: {self.steps}/{self.max_steps} steps, {self.tokens:,} tokens on {self.world_size} "
            f"process(es); {self.elapsed_s:.1f} s{session}, {self.tokens_per_s:,.0f} tokens/s",
            f"  train loss  {num(self.train_loss_first)} -> {num(self.train_loss_final)}",
        ]
        if self.val_loss is not None:
            start = f"{num(self.val_loss_initial)} -> " if self.val_loss_initial is not None else ""
            lines.append(f"  val loss    {start}{num(self.val_loss)}   (perplexity {num(self.val_ppl, '.2f')})")
        if self.resumed_from:
            lines.append(f"  resumed from {self.resumed_from}")
        graphs = self.cuda_graphs
        if graphs:
            calls = graphs["graphed_calls"] + graphs["eager_calls"]
            padded = f", rows padded to {graphs['padded_to']} tokens" if graphs["padded_to"] else ""
            lines.append(
                f"  CUDA graphs {graphs['graphed_calls']:,} of {calls:,} layer calls replayed, "
                f"{graphs['captures']} capture(s){padded}"
            )
        lines.append(f"  adapter     {self.adapter_dir or 'not exported'}")
        lines.append(f"  metrics     {self.metrics_file}")
        if self.loss_plot:
            lines.append(f"  loss plot   {self.loss_plot}")
        if self.tensorboard_dir:
            lines.append(f"  tensorboard {self.tensorboard_dir}")
        if self.last_checkpoint:
            lines.append(f"  checkpoint  {self.last_checkpoint}")
        if self.best_checkpoint:
            lines.append(f"  best        {self.best_checkpoint} (validation loss {num(self.best_val_loss)})")
        return "\n".join(lines)
