"""Resumable training checkpoints, written atomically.

A checkpoint is a directory ``<run>/checkpoints/step-N/``:

- ``trainable.safetensors``: the trainable (LoRA) tensors, by parameter name;
- ``optimizer.pt``: optimizer, LR-scheduler (and fp16 grad-scaler) state dicts, read back with
  ``weights_only=True``;
- ``rng/rank-R.pt``: each process's Python, NumPy, torch (and CUDA) RNG states;
- ``shards/rank-R.pt``: FSDP runs only: each process's shard of the optimizer state (the keys passed as
  ``per_process_keys``; ``optimizer.pt`` then holds the scheduler);
- ``trainer_state.json``: step counters and what the run must match to resume exactly.

It is assembled in a marked sibling ``.step-N.tmp-ckpt`` and swapped into place by :mod:`int4lora_train.atomic`,
so a crash leaves either the whole checkpoint or none; only complete ``step-N`` directories count. Older ones
beyond ``keep_last`` (except the best one, ``train.keep_best``) are removed after the swap, and only those the
toolkit wrote (its marker, not the name: a ``step-N`` of the user's, or a symlink, is never touched, and a save onto
one is refused before anything is written).

:func:`load_checkpoint` validates before anything is restored: every file present, the safetensors header complete,
every LoRA tensor finite, the optimizer state loadable with ``weights_only=True``; anything else is a
:class:`CheckpointError` naming the file and the fix.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..atomic import Staging, claim, fault_point, read_marker, recover, remove_owned
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


def owned_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """:func:`list_checkpoints` restricted to those the toolkit wrote (its marker): the only ones it may remove."""
    return [(step, path) for step, path in list_checkpoints(root) if read_marker(path) is not None]


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
    keep_steps: Sequence[int] = (),
    per_process_keys: Sequence[str] = (),
) -> Path:
    """Write ``checkpoint`` (``state_dict``, ``optimizer``, ``scheduler``, ``trainer_state``, optional ``scaler``)
    as step ``step``.

    Every process calls this (each writes its own RNG state, and its own value of each of ``per_process_keys``:
    sharded state); ``barrier`` synchronises them. Older checkpoints beyond the newest ``keep_last`` are removed,
    except those of ``keep_steps`` (the best one). Returns the final path.
    """
    root = Path(root)
    final = root / f"step-{step}"
    staging = None
    if is_main:
        if root.is_symlink() or (root.exists() and not root.is_dir()):
            raise CheckpointError(f"{root} is not a directory the toolkit can write checkpoints into; move it away.")
        if final.is_symlink() or (final.exists() and read_marker(final) is None):
            raise CheckpointError(
                f"{final} exists and was not written by int4lora-train; not writing checkpoint step {step} over it. "
                "Move it away (or choose another output.dir) and resume."
            )
        recover(final)
        staging = Staging(final, "checkpoint", overwrite=True, what="checkpoint", token="ckpt")
        (staging.path / RNG_DIR).mkdir()
        if per_process_keys:
            (staging.path / SHARDS_DIR).mkdir()
    tmp = root / f".{final.name}.tmp-ckpt"
    barrier()
    try:
        torch.save(capture_rng_state(), tmp / RNG_DIR / f"rank-{rank}.pt")
        if per_process_keys:
            torch.save({k: checkpoint[k] for k in per_process_keys}, tmp / SHARDS_DIR / f"rank-{rank}.pt")
        barrier()
        if staging is not None:
            save_file(_contiguous(checkpoint["state_dict"]), str(tmp / TENSORS_FILE), metadata={"format": "pt"})
            fault_point(f"wrote {TENSORS_FILE}")
            shared = [k for k in _OPTIMIZER_KEYS if k in checkpoint and k not in per_process_keys]
            torch.save({k: checkpoint[k] for k in shared}, tmp / OPTIMIZER_FILE)
            fault_point(f"wrote {OPTIMIZER_FILE}")
            (tmp / STATE_FILE).write_text(json.dumps(checkpoint["trainer_state"], indent=2), encoding="utf-8")
            fault_point(f"wrote {STATE_FILE}")
            staging.commit()
            claim(root, [f"{final.name}/"], kind="checkpoints")  # the directory's marker lists what it holds of ours
    except BaseException as exc:
        if staging is not None:
            staging.abort()
        if isinstance(exc, OSError):
            raise CheckpointError(
                f"writing checkpoint {final} failed: {exc.strerror or exc} ({exc.filename or tmp}); the previous "
                f"checkpoints in {root} are intact. Free disk space or fix the permissions of {root}, then resume."
            ) from exc
        raise
    if staging is not None:
        if keep_last is not None:
            for old_step, path in owned_checkpoints(root)[:-keep_last]:
                if old_step != step and old_step not in keep_steps:
                    left = remove_owned(path)
                    if left:
                        logger.warning("kept %s in the old checkpoint %s: not written by int4lora-train", left, path)
                    logger.debug("removed old checkpoint %s", path)
        logger.info("saved checkpoint %s", final)
    barrier()
    return final


def load_checkpoint(path: str | Path, rank: int = 0) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (this process's RNG state under ``"rng"``; in a sharded
    checkpoint, this process's shard keys too, and the writer's process count under ``"shards"``, else None).

    Validated first: a missing, truncated or corrupt file, a non-finite LoRA tensor or an optimizer state that is
    not plain tensors is a :class:`CheckpointError` naming the file (nothing is restored from such a checkpoint).
    """
    path = Path(path)
    for name in (STATE_FILE, TENSORS_FILE, OPTIMIZER_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing (pick another step-N)")
    try:
        trainer_state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} cannot be read ({exc}); pick another step-N") from exc
    if not isinstance(trainer_state, dict):
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is not a JSON object; pick another step-N")
    state_dict = _load_tensors(path / TENSORS_FILE)
    optim = _load_torch_file(path / OPTIMIZER_FILE, "the optimizer and scheduler state")
    rng_file = path / RNG_DIR / f"rank-{rank}.pt"
    rng = _load_torch_file(rng_file, "the RNG state") if rng_file.is_file() else None
    shards, sharded = None, {}
    if (path / SHARDS_DIR).is_dir():
        shards = len(list((path / SHARDS_DIR).glob("rank-*.pt")))
        shard_file = path / SHARDS_DIR / f"rank-{rank}.pt"
        if not shard_file.is_file():
            raise CheckpointError(
                f"checkpoint {path} was written by {shards} processes and has no shard for process {rank} "
                f"({shard_file.name}); resume with {shards} processes"
            )
        sharded = _load_torch_file(shard_file, "this process's shard of the optimizer state")
    return {"trainer_state": trainer_state, "state_dict": state_dict, **optim, **sharded, "rng": rng, "shards": shards}


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``file``, checked: a complete safetensors file whose every tensor is finite."""
    from ..quant.checkpoint_dir import read_safetensors_header

    read_safetensors_header(file)  # a truncated file is named as such, not as safetensors' own error
    try:
        tensors = load_file(str(file))
    except Exception as exc:  # safetensors raises SafetensorError (not an OSError) for damaged files
        raise CheckpointError(f"{file} cannot be read ({exc}); the checkpoint is corrupt, pick another step-N") from exc
    bad = [key for key, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise CheckpointError(
            f"{file} holds non-finite (NaN/inf) values in {len(bad)} tensor(s) (first: {bad[0]}); resuming from it "
            "would train on garbage. Resume from an earlier step-N (train.resume=path/to/step-N) or start fresh."
        )
    return tensors


def _load_torch_file(file: Path, what: str) -> dict[str, Any]:
    """``torch.load(file, weights_only=True)``: plain tensors and containers only, never arbitrary pickles."""
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, ...: the file is not what save_checkpoint wrote
        raise CheckpointError(
            f"{file} ({what}) cannot be read as a checkpoint written by int4lora-train: {type(exc).__name__}. It is "
            "truncated, corrupt or was replaced, and is only ever loaded as plain tensors (weights_only=True). Pick "
            "another step-N (train.resume=path/to/step-N) or start fresh."
        ) from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{file} ({what}) does not hold a dict; pick another step-N or start fresh.")
    return loaded


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in tensors.items()}
