"""Lean recompute: a gradient-checkpoint recompute skips the one matmul whose result it never keeps.

Under non-reentrant gradient checkpointing the backward of each decoder layer first runs its forward again; of that
recompute torch keeps only the tensors saved for backward (and stops as soon as the last of them is saved). In a
Llama-like decoder layer the MLP's down projection is the last operation before the residual add that ends the
layer: its output reaches nothing that saves a tensor, so computing it again is pure cost, the largest matmul of the
layer after the gate/up projection (for the Llama-3.1-8B shape 27% of the layer's projection FLOPs, 9% of the step's).
With this feature the recompute leaves that output uncomputed (an empty tensor) and computes only what the
projection's backward needs (the LoRA input projection, the dropout mask, the dense weight where
``keep_dense_for_backward`` saves it). Gradients are bit-identical (tests/speed/test_lean_recompute.py).

Marked layers: ``mlp.down_proj`` of decoder layers of the model types in :data:`LEAN_RECOMPUTE_MODEL_TYPES`, whose
layer ends ``residual + mlp(...)``. Not marked: Gemma-2 (a norm after the MLP saves its output), mixture-of-experts
blocks (routing weights multiply the expert outputs), Phi-3 (a dropout module after the MLP). It assumes what
transformers' ``gradient_checkpointing_enable`` (and the trainer) does: each decoder layer is checkpointed on its
own; a checkpoint spanning several layers would need the layer's output in the recompute (switch the feature off).
"""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from int4lora_train.modeling.architectures import is_decoder_mlp
from int4lora_train.modeling.int4_linear import Int4Linear

LEAN_RECOMPUTE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Model types whose decoder layer ends with ``hidden_states = residual + self.mlp(...)``, the MLP ending with
``down_proj``."""


def _int4_base(module: nn.Module | None) -> Int4Linear | None:
    """The ``Int4Linear`` of a projection: itself, or the base layer of its PEFT LoRA wrapper."""
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    return base if isinstance(base, Int4Linear) else None


def set_lean_recompute(model: nn.Module, enabled: bool) -> int:
    """Mark (``enabled``) or unmark the down projections of ``model``'s decoder layers whose recomputed output is
    unread (see the module docstring); returns how many are marked. Only INT4 projections have the fast path."""
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.output_unread_in_recompute = False
    if not enabled:
        return 0
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in LEAN_RECOMPUTE_MODEL_TYPES:
        return 0
    marked = 0
    for name, module in model.named_modules():
        base = _int4_base(module.down_proj) if is_decoder_mlp(name, module) else None
        if base is not None:
            base.output_unread_in_recompute = True
            marked += 1
    return marked
