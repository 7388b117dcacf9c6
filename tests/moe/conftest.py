"""Tiny MoE models (Qwen3-MoE, Qwen2-MoE, Mixtral: 2 layers, hidden 128, 4 experts of width 64, 2 active) and INT4
checkpoints of them written by the toolkit's packer with per-expert tensors, as llm-compressor / GPTQ / AWQ write."""

from __future__ import annotations

import pytest
import torch

from int4lora_train.modeling.moe import save_int4_moe_checkpoint
from int4lora_train.modeling.tiny_models import build_tiny_model, build_tokenizer

MOE_ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral")
GROUP_SIZE = 32


def tiny_moe(arch: str, seed: int = 0, dtype=torch.float32):
    """A tiny dense MoE model; expert weights are scaled up so that the experts matter in the logits."""
    overrides = {"intermediate_size": 64} if arch == "mixtral" else {}
    model = build_tiny_model(arch, seed=seed, dtype=dtype, **overrides)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for name, param in model.named_parameters():
            if name.endswith(("gate_up_proj", "down_proj")) and param.dim() == 3:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.1)
            elif name.endswith("mlp.gate.weight"):
                param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype))
    return model


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
