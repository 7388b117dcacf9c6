"""Exceptions with messages a user can act on: what is wrong, where, and how to fix it.

Every error the toolkit raises for bad input derives from :class:`Int4LoraError`, so callers (and the CLI) can
catch one type. Each subclass also derives from the builtin a caller would expect (``ValueError`` for bad values,
``FileNotFoundError`` for missing files) so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import os
from pathlib import Path


class Int4LoraError(Exception):
    """Base class of every error the toolkit raises on purpose."""


class Int4FormatError(Int4LoraError, ValueError):
    """An INT4 tensor set does not match the layout its format promises (dtype, shape, group size, values)."""


class UnsupportedFormatError(Int4LoraError, ValueError):
    """A checkpoint, module or option the toolkit does not (yet) support."""


class CheckpointError(Int4LoraError, ValueError):
    """A checkpoint directory or file is missing, truncated, corrupt or inconsistent."""


class ConfigError(Int4LoraError, ValueError):
    """A YAML config or command-line override is invalid."""


class DataError(Int4LoraError, ValueError):
    """A training or validation record is invalid."""


class ExportError(Int4LoraError, ValueError):
    """An adapter cannot be exported (or served by vLLM) as configured."""


class TrainingError(Int4LoraError, RuntimeError):
    """Training cannot go on (a non-finite loss or gradient); the message names the step and the last checkpoint."""


MODEL_DIR_CONTENTS = (
    "an INT4 model directory holds config.json (with a quantization_config: compressed-tensors W4A16, GPTQ or AWQ), "
    "the *.safetensors weights and the tokenizer files (tokenizer.json, tokenizer_config.json)"
)


def check_model_dir(path: str | os.PathLike, *, key: str = "model.path", need_config: bool = True) -> Path:
    """``path`` as a ``Path`` if it is a directory (holding ``config.json`` when ``need_config``); else a
    :class:`CheckpointError` that names the path, the config key it came from, and what the directory must hold.

    A cheap check made before anything loads, so that a wrong path is reported as such, not as the first file some
    library failed to find in it (often the tokenizer).
    """
    directory = Path(path).expanduser()
    if not directory.exists():
        problem = "does not exist"
    elif not directory.is_dir():
        problem = "is a file, not a directory"
    elif need_config and not (directory / "config.json").is_file():
        problem = "holds no config.json"
    else:
        return directory
    raise CheckpointError(
        f"model directory {directory} ({key}) {problem}; {MODEL_DIR_CONTENTS}. Point {key} at such a directory "
        "(or use model.path=demo for the built-in tiny model)."
    )


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training after ``step`` of ``max_steps`` steps; ``checkpoint`` is the newest checkpoint (written
    at the interruption when that was safe), ``None`` when there is none.

    A ``KeyboardInterrupt``, so code that lets Ctrl-C through keeps doing so; the CLI turns it into the command that
    resumes the run and exit status 130.
    """

    def __init__(self, step: int, max_steps: int, checkpoint: str | None):
        self.step, self.max_steps, self.checkpoint = step, max_steps, checkpoint
        where = f"the newest checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written"
        super().__init__(f"training interrupted at step {step}/{max_steps}; {where}")
