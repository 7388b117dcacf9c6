"""Helpers shared by the modeling tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import torch
from torch import nn

from int4lora_train.modeling import ARCHITECTURES
from int4lora_train.modeling.tiny_models import build_tiny_model

ARCHS = tuple(ARCHITECTURES)
GROUP_SIZE = 32


def tiny(arch: str = "llama", **overrides) -> nn.Module:
    """A tiny fp32 model (2 layers, hidden 128), the same for the same arguments."""
    return build_tiny_model(arch, seed=0, dtype=torch.float32, **overrides)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()
