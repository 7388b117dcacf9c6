"""Exceptions with messages a user can act on: what is wrong, where, and how to fix it.

Every error the toolkit raises for bad input derives from :class:`Int4LoraError`, so callers (and the CLI) can
catch one type. Each subclass also derives from the builtin a caller would expect (``ValueError`` for bad values,
``FileNotFoundError`` for missing files) so ``except ValueError`` keeps working.
"""

from __future__ import annotations


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
