"""Tiny MoE models (Qwen3-MoE, Qwen2-MoE, Mixtral: 2 layers, hidden 128, 4 experts of width 64, 2 active) and INT4
checkpoints of them written by the toolkit's packer with per-expert tensors, as llm-compressor / GPTQ / AWQ write."""

from __future__ import annotations

import pytest
import torch
from moe_helpers import GROUP_SIZE, tiny_moe

from int4lora_train.modeling.moe import save_int4_moe_checkpoint
from int4lora_train.modeling.tiny_models import build_tokenizer


@pytest.fixture(scope="session")
def moe_checkpoints(tmp_path_factory):
    """``(arch, format, symmetric) -> (dense model, checkpoint dir)``, written on first use."""
    made = {}

    def get(arch: str = "qwen3_moe", format: str = "compressed-tensors", symmetric: bool = True):
        key = (arch, format, symmetric)
        if key not in made:
            model = tiny_moe(arch)
            path = tmp_path_factory.mktemp(f"{arch}-{format}-{'sym' if symmetric else 'asym'}") / "ckpt"
            save_int4_moe_checkpoint(
                model, path, format=format, group_size=GROUP_SIZE, symmetric=symmetric, tokenizer=build_tokenizer()
            )
            made[key] = (model, path)
        return made[key]

    return get


@pytest.fixture(scope="session")
def grouped_dequant(triton_kernels):
    """int4lora_train.kernels.grouped_dequant, compiled on CUDA, else reloaded for Triton's CPU interpreter after the
    ``triton_kernels`` fixture reloaded the dequant kernels it builds on."""
    import importlib
    import os

    module = importlib.import_module("int4lora_train.kernels.grouped_dequant")
    if torch.cuda.is_available() or module.INTERPRETED:
        return module
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return importlib.reload(module)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
