"""Fixtures for the trainer tests: the local byte tokenizer, small data files, a tiny INT4 checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import TINY, arithmetic_records, write_jsonl

from int4lora_train.modeling.tiny_models import build_tiny_model, build_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def instruction_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", arithmetic_records())


@pytest.fixture(scope="session")
def tiny_int4_dir(tmp_path_factory) -> Path:
    """A tiny Llama written by the toolkit's packer as a compressed-tensors W4A16 checkpoint (group 32)."""
    from int4lora_train.quant.packer import save_int4_checkpoint

    out = tmp_path_factory.mktemp("tiny-int4") / "model"
    model = build_tiny_model("llama", seed=0, dtype=torch.bfloat16, **TINY)
    return save_int4_checkpoint(model, out, group_size=32, tokenizer=build_tokenizer())
