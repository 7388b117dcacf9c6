"""Helpers shared by the tests of tiny models (plain functions; fixtures live in conftest.py files)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from int4lora_train.modeling import ARCHITECTURES
from int4lora_train.modeling.tiny_models import build_tiny_model, build_tokenizer

ARCHS = tuple(ARCHITECTURES)
GROUP_SIZE = 32


def tiny(arch: str = "llama", **overrides) -> nn.Module:
    """A tiny fp32 model (2 layers, hidden 128), the same for the same arguments."""
    return build_tiny_model(arch, seed=0, dtype=torch.float32, **overrides)


def tiny_int4_checkpoint(
    path: Path,
    architecture: str = "llama",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    group_size: int = 64,
    sizes: dict | None = None,
    prepare: Callable[[nn.Module], None] | None = None,
    **save_options,
) -> Path:
    """A tiny model of ``architecture`` (``sizes`` override the tiny defaults; ``prepare(model)`` may edit it first)
    written by the toolkit's packer as an INT4 checkpoint directory (compressed-tensors W4A16 unless
    ``save_options`` say otherwise) with the byte tokenizer."""
    from int4lora_train.quant.packer import save_int4_checkpoint

    model = build_tiny_model(architecture, seed=seed, dtype=dtype, **(sizes or {}))
    if prepare is not None:
        prepare(model)
    return save_int4_checkpoint(model, path, group_size=group_size, tokenizer=build_tokenizer(), **save_options)


def tiny_int4_lora_model(
    arch: str = "llama", r: int = 4, lora_dropout: float = 0.0, sizes: dict | None = None, **lora_options
) -> nn.Module:
    """A tiny fp32 model (``sizes``: config overrides such as ``num_hidden_layers``), RTN-quantized to INT4 (asym,
    group 32), with PEFT LoRA (``lora_options``: other ``LoraConfig`` fields; default on all linears) and a random,
    deterministic ``lora_B`` (so the adapter changes the output)."""
    from peft import LoraConfig, get_peft_model

    from int4lora_train.modeling import quantize_model_rtn

    model = tiny(arch, **(sizes or {}))
    quantize_model_rtn(model, GROUP_SIZE, symmetric=False)
    torch.manual_seed(0)
    options = {"target_modules": "all-linear", **lora_options}
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_dropout=lora_dropout, **options))
    for name, param in sorted(peft_model.named_parameters()):
        if "lora_B" in name:
            param.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(sum(map(ord, name))))
    return peft_model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a - b| relative to max |b| (absolute below 1)."""
    return (a.float() - b.float()).abs().max().item() / max(1.0, b.float().abs().max().item())


def logits_case(seed: int = 0, rows: int = 6, vocab: int = 100, dtype=torch.float32):
    """Random ``[rows, vocab]`` logits and their targets, row 1 ignored (-100)."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[1] = -100
    return logits, targets
