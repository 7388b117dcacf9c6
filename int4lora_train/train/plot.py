"""The loss curve of a run, drawn from its metrics log (so a resumed run's curve is whole)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def plot_loss_curve(records: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Write train (and validation) loss against step as a PNG; ``None`` if matplotlib is missing or no data."""
    train = [(r["step"], r["train/loss"]) for r in records if isinstance(r.get("train/loss"), (int, float))]
    val = [(r["step"], r["val/loss"]) for r in records if isinstance(r.get("val/loss"), (int, float))]
    if not train and not val:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")  # headless: never opens a window
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; no loss plot (pip install matplotlib)")
        return None
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        axes.plot(*zip(*train), label="train loss", linewidth=1.5)
    if val:
        axes.plot(*zip(*val), "o-", label="validation loss", linewidth=1.5)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats / target token)")
    axes.set_title(title or "loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path
