"""Fixtures for every test directory.

pytest puts this directory on ``sys.path`` (it holds a conftest.py and no ``__init__.py``), so helper modules here,
such as ``modeling_helpers.py``, import by name from any test directory.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import SimpleNamespace

import pytest
import torch

TRITON_MODULES = ("dequant", "norm_mlp", "cross_entropy", "rope", "lora_dropout")  # in int4lora_train.kernels


@pytest.fixture(scope="session")
def triton_kernels() -> SimpleNamespace:
    """The Triton kernel modules of :mod:`int4lora_train.kernels` (``.dequant``, ``.norm_mlp``, ``.cross_entropy``,
    ``.rope``, ``.lora_dropout``): compiled on CUDA; without CUDA built for Triton's CPU interpreter.

    ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates a kernel, so a module that an earlier test imported
    compiled is reloaded with it set (in place: code that imports the module, not its functions, sees the new ones).
    """
    pytest.importorskip("triton")
    names = [f"int4lora_train.kernels.{name}" for name in TRITON_MODULES]
    if torch.cuda.is_available():
        return SimpleNamespace(**{name: importlib.import_module(f) for name, f in zip(TRITON_MODULES, names)})
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        modules = {}
        for name, full_name in zip(TRITON_MODULES, names):
            module = importlib.import_module(full_name)
            modules[name] = module if module.INTERPRETED else importlib.reload(module)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return SimpleNamespace(**modules)


@pytest.fixture(scope="session")
def tokenizer():
    """The byte-level tokenizer of the tiny models (:func:`int4lora_train.modeling.tiny_models.build_tokenizer`)."""
    from int4lora_train.modeling.tiny_models import build_tokenizer

    return build_tokenizer()


@pytest.fixture(autouse=True)
def _restore_the_cli_logger():
    """``cli.main`` points the ``int4lora_train`` logger at the current ``sys.stderr``, which pytest closes after
    the test; later tests would log into a closed stream (a 'Logging error' on stderr)."""
    log = logging.getLogger("int4lora_train")
    saved = log.handlers[:], log.level, log.propagate
    yield
    log.handlers[:], log.level, log.propagate = saved
