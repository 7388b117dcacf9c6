"""Tiny MoE models shared by the tests of tests/moe (a plain module: conftest names collide across test dirs)."""

from __future__ import annotations

import torch

from int4lora_train.modeling.tiny_models import build_tiny_model

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
