"""Every directory the toolkit writes, under one rule: never lose what the user has.

The rule, for run directories, training checkpoints, adapter exports, merged exports and INT4 checkpoints:

1. **Ownership is recorded, not guessed.** A directory the toolkit writes holds a marker file, :data:`MARKER`
   (``.int4lora-owned``): JSON naming the writer, what kind of directory it is, its state (``writing`` /
   ``complete``) and the manifest of the files it wrote. A file's name proves nothing: a ``trainer_state.json``
   or a ``config.yaml`` without a marker that lists it belongs to the user.
2. **Only what the toolkit wrote is ever replaced or removed.** A target that holds anything else (no marker, or
   entries the marker does not list) is refused unless the caller passes ``force=True``; removing an owned
   directory (:func:`remove_owned`) deletes its manifest's files only and leaves anything foreign in place.
3. **Paths are resolved before they are checked** (:func:`resolve_path`: ``~``, ``..``, symlinks), so
   ``project/nonexistent/..`` is ``project``, and :func:`check_output_path` refuses a path that is not a
   directory, is not writable or lies inside the model directory, before anything loads.
4. **Every replacement is logged at WARNING** (``-q`` does not hide it), naming what was replaced.
5. **A replacement never loses both versions.** The new directory is assembled in a sibling ``.<name>.tmp-<id>``
   (marked ``writing`` first, ``complete`` last) and swapped in by :func:`replace_directory`:

   - where the OS has it, ``renameat2(RENAME_EXCHANGE)`` swaps the two directories in one atomic step; the old one
     is then under the temporary name (marked), and is deleted;
   - elsewhere the fallback renames the old directory to ``.<name>.old-<id>`` and the new one into place. A crash
     between those two renames leaves the target missing with both versions beside it; :func:`recover` (run at
     the start of every write of that target, and by :func:`list_checkpoints`' callers) puts the complete new one
     in place, or else the old one back. So at every crash point the old or the new version is, or will be on the
     next start, at the target.

   Leftovers (``.tmp-*`` / ``.old-*`` siblings carrying the toolkit's marker, or empty) are removed by
   :func:`recover`; anything unmarked is left alone.

:func:`set_fault_hook` installs a function called at every filesystem step of the protocol with the step's name;
the crash tests use it to ``os._exit`` a subprocess at step k, for every k.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from int4lora_train.errors import CheckpointError

logger = logging.getLogger(__name__)

MARKER = ".int4lora-owned"
"""The marker file of a directory the toolkit wrote (JSON: writer, kind, state, entries)."""
WRITER = "int4lora-train"

_TMP, _OLD = ".tmp-", ".old-"

# ------------------------------------------------------------------------------------------------ fault injection

_fault_hook: Callable[[str], None] | None = None


def set_fault_hook(hook: Callable[[str], None] | None) -> None:
    """Call ``hook(step_name)`` at every filesystem step of a write (tests: crash there). ``None`` removes it."""
    global _fault_hook
    _fault_hook = hook


def fault_point(step: str) -> None:
    """A point between two filesystem operations where a crash must leave the old or the new version."""
    if _fault_hook is not None:
        _fault_hook(step)


# ------------------------------------------------------------------------------------------------------- paths


def resolve_path(path: str | os.PathLike) -> Path:
    """``path`` absolute, with ``~``, ``..`` and symlinks resolved (also through components that do not exist)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def is_within(path: Path, other: Path) -> bool:
    """``path`` is ``other`` or lies inside it (both resolved)."""
    return path == other or other in path.parents


def check_output_path(path: str | os.PathLike, *, what: str, key: str, model_dir: str | os.PathLike | None = None):
    """``path`` resolved, after checking it can be written: not a file, not inside ``model_dir``, its nearest
    existing ancestor a writable directory. Raises :class:`CheckpointError` naming ``key`` and the fix."""
    resolved = resolve_path(path)
    fix = f"set {key} to another path"
    if resolved.exists() and not resolved.is_dir():
        raise CheckpointError(f"{what} {resolved} ({key}) exists and is not a directory; {fix}.")
    if model_dir is not None and is_within(resolved, resolve_path(model_dir)):
        raise CheckpointError(
            f"{what} {resolved} ({key}) lies inside the model directory {resolve_path(model_dir)}; the model "
            f"directory is read-only input, {fix} outside it."
        )
    existing = resolved
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CheckpointError(
            f"{what} {resolved} ({key}) cannot be created: {existing} is a file, not a directory; {fix}."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"{what} {resolved} ({key}) is not writable ({existing} denies write access); {fix}.")
    return resolved


# ------------------------------------------------------------------------------------------------------ markers


def read_marker(directory: Path) -> dict | None:
    """The marker of ``directory`` when it is a real directory the toolkit wrote; else ``None``."""
    if directory.is_symlink() or not directory.is_dir():
        return None
    try:
        marker = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("writer") == WRITER else None


def write_marker(directory: Path, kind: str, state: str = "complete", entries: Iterable[str] | None = None) -> None:
    """Write (atomically) the marker of ``directory``; ``entries`` defaults to every file in it."""
    if entries is None:
        entries = _listing(directory)
    marker = {
        "writer": WRITER,
        "kind": kind,
        "state": state,
        "entries": sorted(set(entries)),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "pid": os.getpid(),
    }
    tmp = directory / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, directory / MARKER)


def claim(directory: Path, names: Iterable[str], kind: str = "run") -> None:
    """Record ``names`` (paths relative to ``directory``) as written by the toolkit in its marker."""
    marker = read_marker(directory) or {"kind": kind, "entries": []}
    write_marker(directory, marker.get("kind", kind), marker.get("state", "complete"), [*marker["entries"], *names])


def _listing(directory: Path) -> list[str]:
    """Every file and symlink under ``directory`` relative to it (directories with their own marker as ``name/``),
    the marker excluded."""
    found = []
    for entry in sorted(directory.iterdir()):
        if entry.name == MARKER or entry.name == f"{MARKER}.tmp":
            continue
        if entry.is_dir() and not entry.is_symlink():
            if read_marker(entry) is not None:
                found.append(entry.name + "/")
            else:
                found += [f"{entry.name}/{sub}" for sub in _listing(entry)]
        else:
            found.append(entry.name)
    return found


def foreign_entries(directory: Path) -> list[str]:
    """What ``directory`` holds that its marker does not list (everything, when it has no marker)."""
    if not directory.is_dir() or directory.is_symlink():
        return [str(directory)] if directory.exists() or directory.is_symlink() else []
    marker = read_marker(directory)
    listed = set(marker["entries"]) if marker else set()
    return [name for name in _listing(directory) if name not in listed]


def remove_owned(path: Path) -> list[str]:
    """Remove what the toolkit wrote at ``path`` (a marked directory: its manifest's files, recursively; its
    marker and the directory when nothing else is left). Returns what was left because it is not the toolkit's."""
    if path.is_symlink() or not path.is_dir():
        return [str(path)] if path.exists() or path.is_symlink() else []
    marker = read_marker(path)
    if marker is None:
        return [str(path)]
    left = []
    for name in marker["entries"]:
        entry = path / name.rstrip("/")
        if name.endswith("/"):
            left += remove_owned(entry)
        elif entry.is_symlink() or entry.is_file():
            entry.unlink()
    for name in foreign_entries(path):
        left.append(str(path / name))
    _prune_empty_dirs(path)
    if not left:
        (path / MARKER).unlink(missing_ok=True)
        try:
            path.rmdir()
        except OSError:
            left.append(str(path))
    return left


def _prune_empty_dirs(root: Path) -> None:
    for directory in sorted((p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
        try:
            directory.rmdir()
        except OSError:
            pass


# --------------------------------------------------------------------------------------------- the replacement


def _renameat2_exchange() -> Callable[[str, str], None] | None:
    """``exchange(a, b)`` through ``renameat2(RENAME_EXCHANGE)`` when libc has it; else ``None``."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return None
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2

    def exchange(a: str, b: str) -> None:
        if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), a, None, b)

    return exchange


_exchange = _renameat2_exchange()


def use_exchange(enabled: bool) -> None:
    """Use ``renameat2(RENAME_EXCHANGE)`` when available (default), or force the fallback protocol (tests)."""
    global _exchange
    _exchange = _renameat2_exchange() if enabled else None


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}{kind}{uuid.uuid4().hex[:8]}"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_directory(new: Path, target: Path) -> None:
    """Put the complete directory ``new`` at ``target`` (a sibling); an existing ``target`` (checked by the
    caller) is exchanged out and deleted. No crash point leaves neither version (module docstring)."""
    _fsync_dir(new)
    fault_point("before swap")
    if not target.exists():
        os.rename(new, target)
        fault_point("renamed new into place")
        _fsync_dir(target.parent)
        return
    if _exchange is not None:
        try:
            _exchange(str(new), str(target))
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):
                raise
        else:
            fault_point("exchanged")
            _fsync_dir(target.parent)
            shutil.rmtree(new)  # the old version, under the temporary name
            fault_point("removed old")
            return
    old = _sibling(target, _OLD)
    os.rename(target, old)
    fault_point("moved old aside")
    os.rename(new, target)
    fault_point("renamed new into place")
    _fsync_dir(target.parent)
    shutil.rmtree(old)
    fault_point("removed old")


def recover(target: Path) -> None:
    """Finish or undo a replacement of ``target`` that a crash interrupted, and remove the toolkit's leftovers
    beside it (``.<name>.tmp-*`` / ``.<name>.old-*`` carrying its marker, or empty)."""
    parent = target.parent
    if not parent.is_dir():
        return
    prefix = f".{target.name}"
    leftovers = [p for p in parent.iterdir() if p.name.startswith(prefix + _TMP) or p.name.startswith(prefix + _OLD)]
    if not leftovers:
        return
    if not target.exists() and not target.is_symlink():
        complete = [p for p in leftovers if p.name.startswith(prefix + _TMP) and _state(p) == "complete"]
        olds = [p for p in leftovers if p.name.startswith(prefix + _OLD) and read_marker(p) is not None]
        chosen = (complete or olds or [None])[0]
        if chosen is not None:
            os.rename(chosen, target)
            leftovers.remove(chosen)
            logger.warning(
                "%s was missing after an interrupted write; restored the %s version from %s",
                target,
                "new" if chosen in complete else "previous",
                chosen.name,
            )
    for leftover in leftovers:
        if read_marker(leftover) is not None:
            shutil.rmtree(leftover)
            logger.info("removed %s, left over by an interrupted write", leftover)
        elif leftover.is_dir() and not leftover.is_symlink() and not any(leftover.iterdir()):
            leftover.rmdir()
        else:
            logger.warning("left %s in place: it does not carry the %s marker", leftover, MARKER)


def recover_children(directory: Path) -> None:
    """:func:`recover` every target in ``directory`` that an interrupted write left siblings of (at start-up)."""
    if not directory.is_dir():
        return
    targets = set()
    for entry in directory.iterdir():
        for kind in (_TMP, _OLD):
            if entry.name.startswith(".") and kind in entry.name:
                targets.add(entry.name[1:].rsplit(kind, 1)[0])
    for name in sorted(targets):
        if name:
            recover(directory / name)


def _state(directory: Path) -> str | None:
    marker = read_marker(directory)
    return marker.get("state") if marker else None


def refuse_existing(out_dir: Path, overwrite: bool, force: bool = False, what: str = "output directory") -> None:
    """Raise unless ``out_dir`` is absent, an empty directory, or may be replaced: ``overwrite`` and written by the
    toolkit with nothing else in it (or ``force``)."""
    if out_dir.is_symlink():
        raise CheckpointError(f"{out_dir} is a symlink; the toolkit does not write through it. Choose another path.")
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a directory; choose another output path.")
    if not out_dir.is_dir() or not any(out_dir.iterdir()) or force:
        return
    if not overwrite:
        raise CheckpointError(
            f"{out_dir} already exists and is not empty; pass overwrite=True (or --overwrite) to replace it, or "
            "choose another path."
        )
    foreign = foreign_entries(out_dir)
    if foreign:
        owner = "was not written by int4lora-train" if read_marker(out_dir) is None else "holds files it did not write"
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise CheckpointError(
            f"{what} {out_dir} {owner} ({shown}); overwrite only replaces what the toolkit wrote. Move those files "
            "away, choose another path, or pass force=True to replace the directory whole."
        )


class Staging:
    """A new version of ``target`` being assembled in a marked sibling; :meth:`commit` swaps it in."""

    def __init__(self, target: str | os.PathLike, kind: str, *, overwrite: bool = False, force: bool = False,
                 mode: int = 0o755, what: str = "output directory", token: str | None = None):  # fmt: skip
        # token: a fixed temporary name, for writers in several processes that must agree on it (checkpoints).
        self.target = Path(os.path.abspath(Path(target).expanduser()))
        self.kind, self.overwrite, self.force, self.what = kind, overwrite, force, what
        recover(self.target)
        refuse_existing(self.target, overwrite, force, what)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path = self.target.parent / f".{self.target.name}{_TMP}{token}" if token else _sibling(self.target, _TMP)
        self.path.mkdir(mode=mode)
        fault_point("created temporary")
        write_marker(self.path, kind, state="writing", entries=[])
        fault_point("marked temporary")

    def commit(self) -> Path:
        write_marker(self.path, self.kind, state="complete")
        fault_point("marked complete")
        replaced = self.target.is_dir() and any(self.target.iterdir())
        if replaced:  # checked again: it may have appeared while we were writing
            refuse_existing(self.target, self.overwrite, self.force, self.what)
        elif self.target.is_dir():
            self.target.rmdir()
        replace_directory(self.path, self.target)
        if replaced:
            logger.warning("replaced %s (%s) with a new version", self.target, self.kind)
        return self.target

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


@contextmanager
def atomic_directory(
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    mode: int = 0o755,
    *,
    kind: str = "output",
    force: bool = False,
    what: str = "output directory",
) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``out_dir``; on success it becomes ``out_dir`` (:class:`Staging`).

    An existing non-empty ``out_dir`` is replaced only with ``overwrite`` and when the toolkit wrote all of it (or
    ``force``). On any exception the temporary directory is removed and ``out_dir`` is left as it was.
    """
    staging = Staging(out_dir, kind, overwrite=overwrite, force=force, mode=mode, what=what)
    try:
        yield staging.path
        staging.commit()
    except BaseException:
        staging.abort()
        raise
