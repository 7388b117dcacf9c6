"""Fixtures for the trainer tests: small data files, a tiny INT4 checkpoint (the byte tokenizer: tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from modeling_helpers import tiny_int4_checkpoint
from train_helpers import TINY, arithmetic_records, write_jsonl


@pytest.fixture
def instruction_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", arithmetic_records())


@pytest.fixture(scope="session")
def tiny_int4_dir(tmp_path_factory) -> Path:
    """A tiny Llama written by the toolkit's packer as a compressed-tensors W4A16 checkpoint (group 32)."""
    out = tmp_path_factory.mktemp("tiny-int4") / "model"
    return tiny_int4_checkpoint(out, dtype=torch.bfloat16, group_size=32, sizes=TINY)
