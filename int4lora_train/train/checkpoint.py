"""Resumable training checkpoints, written atomically.

A checkpoint is a directory ``<run>/checkpoints/step-N/``:

- ``trainable.safetensors``: the trainable (LoRA) tensors, by parameter name;
- ``optimizer.pt``: optimizer, LR-scheduler (and fp16 grad-scaler) state dicts, read back with
  ``weights_only=True``;
- ``rng/rank-R.pt``: each process's Python, NumPy, torch (and CUDA) RNG states;
- ``shards/rank-R.pt``: FSDP runs only: each process's shard of the optimizer state (the keys passed as
  ``per_process_keys``; ``optimizer.pt`` then holds the scheduler);
- ``trainer_state.json``: step counters and what the run must match to resume exactly.

It is assembled in ``.tmp-step-N`` and renamed into place, so a crash leaves either the whole checkpoint or none;
only renamed ``step-N`` directories count. Older ones beyond ``keep_last`` are removed after the rename.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
TENSORS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"
RNG_DIR = "rng"
SHARDS_DIR = "shards"
_OPTIMIZER_KEYS = ("optimizer", "scheduler", "scaler")  # what optimizer.pt holds (scaler: fp16 runs only)


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1][1] if checkpoints else None


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(
    root: str | Path,
    step: int,
    checkpoint: dict[str, Any],
    *,
    rank: int = 0,
    is_main: bool = True,
    barrier=lambda: None,
    keep_last: int | None = None,
    per_process_keys: Sequence[str] = (),
) -> Path:
    """Write ``checkpoint`` (``state_dict``, ``optimizer``, ``scheduler``, ``trainer_state``, optional ``scaler``)
    as step ``step``.

    Every process calls this (each writes its own RNG state, and its own value of each of ``per_process_keys``:
    sharded state); ``barrier`` synchronises them. Returns the final path.
    """
    root = Path(root)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)  # left over by a crash while writing
        (tmp / RNG_DIR).mkdir(parents=True)
        if per_process_keys:
            (tmp / SHARDS_DIR).mkdir()
    barrier()
    torch.save(capture_rng_state(), tmp / RNG_DIR / f"rank-{rank}.pt")
    if per_process_keys:
        torch.save({k: checkpoint[k] for k in per_process_keys}, tmp / SHARDS_DIR / f"rank-{rank}.pt")
    barrier()
    if is_main:
        save_file(_contiguous(checkpoint["state_dict"]), str(tmp / TENSORS_FILE), metadata={"format": "pt"})
        shared = [k for k in _OPTIMIZER_KEYS if k in checkpoint and k not in per_process_keys]
        torch.save({k: checkpoint[k] for k in shared}, tmp / OPTIMIZER_FILE)
        # Written last: a directory with trainer_state.json is complete.
        (tmp / STATE_FILE).write_text(json.dumps(checkpoint["trainer_state"], indent=2), encoding="utf-8")
        if final.exists():
            stale = root / f".old-step-{step}"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            shutil.rmtree(stale)
        os.replace(tmp, final)
        if keep_last is not None:
            for old_step, path in list_checkpoints(root)[:-keep_last]:
                if old_step != step:
                    shutil.rmtree(path)
                    logger.debug("removed old checkpoint %s", path)
        logger.info("saved checkpoint %s", final)
    barrier()
    return final


def load_checkpoint(path: str | Path, rank: int = 0) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (this process's RNG state under ``"rng"``; in a sharded
    checkpoint, this process's shard keys too, and the writer's process count under ``"shards"``, else None)."""
    path = Path(path)
    for name in (STATE_FILE, TENSORS_FILE, OPTIMIZER_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing (pick another step-N)")
    try:
        trainer_state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        state_dict = load_file(str(path / TENSORS_FILE))
        optim = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
    rng_file = path / RNG_DIR / f"rank-{rank}.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.is_file() else None
    shards, sharded = None, {}
    if (path / SHARDS_DIR).is_dir():
        shards = len(list((path / SHARDS_DIR).glob("rank-*.pt")))
        shard_file = path / SHARDS_DIR / f"rank-{rank}.pt"
        if not shard_file.is_file():
            raise CheckpointError(
                f"checkpoint {path} was written by {shards} processes and has no shard for process {rank} "
                f"({shard_file.name}); resume with {shards} processes"
            )
        try:
            sharded = torch.load(shard_file, map_location="cpu", weights_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint shard {shard_file} cannot be read: {exc}") from exc
    return {"trainer_state": trainer_state, "state_dict": state_dict, **optim, **sharded, "rng": rng, "shards": shards}


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in tensors.items()}
