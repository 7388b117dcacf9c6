"""Writing a directory so that a crash never leaves half of it and nothing the user owns is lost.

Every directory the toolkit produces (INT4 checkpoints, adapters, merged exports, training checkpoints) is assembled
in a temporary sibling and renamed into place at the end. An existing target is refused unless ``overwrite``; when
replacing, the old directory is moved aside first and deleted only after the new one is in place, so at every moment
one complete directory exists.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from int4lora_train.errors import CheckpointError


def refuse_existing(out_dir: Path, overwrite: bool) -> None:
    """Raise unless ``out_dir`` is absent, an empty directory, or may be overwritten."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a directory; choose another output path.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(
            f"{out_dir} already exists and is not empty; pass overwrite=True (or --overwrite) to replace it, or "
            "choose another path."
        )


@contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False, mode: int = 0o755) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``out_dir``; on success it becomes ``out_dir``.

    On any exception the temporary directory is removed and ``out_dir`` is left as it was.
    """
    out_dir = Path(out_dir)
    refuse_existing(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(mode=mode)
    try:
        yield tmp
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    backup = None
    if out_dir.exists():
        if any(out_dir.iterdir()):
            if not overwrite:  # it appeared while we were writing
                raise CheckpointError(f"{out_dir} appeared while it was being written; not replacing it.")
            backup = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, backup)
        else:
            out_dir.rmdir()
    os.replace(tmp, out_dir)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
