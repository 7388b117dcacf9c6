"""Fixtures for every test directory."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def _restore_the_cli_logger():
    """``cli.main`` points the ``int4lora_train`` logger at the current ``sys.stderr``, which pytest closes after
    the test; later tests would log into a closed stream (a 'Logging error' on stderr)."""
    log = logging.getLogger("int4lora_train")
    saved = log.handlers[:], log.level, log.propagate
    yield
    log.handlers[:], log.level, log.propagate = saved
