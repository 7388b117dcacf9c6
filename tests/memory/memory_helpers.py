"""Helpers of the memory tests: tiny INT4 LoRA models, one training step, toy checkpointed stacks."""

from __future__ import annotations

from functools import partial

import torch
from modeling_helpers import tiny_int4_lora_model
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

from int4lora_train.modeling import prepare_for_training


def int4_lora_model(
    layers: int = 4, checkpointing: bool = True, reentrant: bool = False, sizes: dict | None = None, **lora_options
) -> nn.Module:
    """:func:`tiny_int4_lora_model` of a Llama with ``layers`` decoder layers (``sizes``: other config overrides),
    frozen and checkpointed as the trainer prepares it; the same for the same arguments."""
    peft_model = tiny_int4_lora_model("llama", sizes={"num_hidden_layers": layers, **(sizes or {})}, **lora_options)
    prepare_for_training(peft_model, gradient_checkpointing=checkpointing, use_reentrant=reentrant)
    peft_model.train()
    return peft_model


def batch(rows: int = 2, tokens: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (rows, tokens), generator=torch.Generator().manual_seed(1))


def step(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward: the loss and every trainable parameter's gradient."""
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


class Block(GradientCheckpointingLayer):
    """A toy decoder layer taking extra tensors positionally (as some models pass their RoPE tables)."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, table: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.tanh(self.linear(x)) * table
        return out if extra is None else out + extra.sum()


class Stack(nn.Module):
    """Toy blocks under non-reentrant checkpointing; ``forward(x, table, extra)`` passes both to every block."""

    def __init__(self, layers: int = 3, width: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block(width) for _ in range(layers))
        self.shared = nn.Parameter(torch.randn(width))
        for block in self.blocks:
            block.gradient_checkpointing = True
            block._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)

    def forward(self, x, table, pass_parameter: bool = False):
        for block in self.blocks:
            x = block(x, table, self.shared if pass_parameter else None)
        return x
