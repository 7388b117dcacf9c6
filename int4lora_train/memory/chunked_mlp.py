"""The decoder MLP over chunks of tokens: one chunk's intermediates live at a time.

A SwiGLU MLP (``down(act(gate(x)) * up(x))``) makes several ``tokens x intermediate`` tensors (gate, up, the
activation, the product, and in backward their gradients): at 128k tokens and the 8B shape (intermediate 14336)
each is 3.5 GiB in bf16, the largest thing a checkpointed layer's recompute holds. The MLP is token-wise, so
:func:`enable_chunked_mlp` runs it on ``chunk_tokens`` rows at a time, each chunk under a nested non-reentrant
``torch.utils.checkpoint``: a chunk's intermediates are dropped after its forward and recomputed right before its
backward, so one chunk's live at once (forward, recompute and backward alike).

The patch wraps whatever forward the module has when it is applied (its class's, or the fused SwiGLU of
:mod:`int4lora_train.speed.fused_ops`; gate/up projection groups key on the input tensor, so each chunk still runs
as one node): apply it after :func:`int4lora_train.speed.apply`. Inputs of at most ``chunk_tokens`` tokens take the
wrapped forward unchanged. The result equals the unchunked MLP up to summation order (the LoRA weight gradients sum
over tokens chunk by chunk); with LoRA dropout the masks differ (drawn per chunk).
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from int4lora_train.modeling.architectures import is_decoder_mlp

logger = logging.getLogger(__name__)

_INNER = "_int4lora_mlp_inner"
_CHUNK = "_int4lora_mlp_chunk_tokens"


def _chunked_mlp_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    inner = self.__dict__[_INNER]
    chunk = self.__dict__[_CHUNK]
    tokens = x.numel() // max(1, x.shape[-1])
    if args or kwargs or x.dim() < 2 or tokens <= chunk:
        return inner(x, *args, **kwargs)
    flat = x.reshape(tokens, x.shape[-1])
    if torch.is_grad_enabled():
        outputs = [checkpoint(inner, piece, use_reentrant=False) for piece in flat.split(chunk)]
    else:
        outputs = [inner(piece) for piece in flat.split(chunk)]
    out = torch.cat(outputs)
    return out.view(*x.shape[:-1], out.shape[-1])


def enable_chunked_mlp(model: nn.Module, chunk_tokens: int) -> int:
    """Run each decoder MLP of ``model`` on at most ``chunk_tokens`` tokens at a time (see the module docstring);
    returns the MLPs patched. Replaces an earlier call's; :func:`disable_chunked_mlp` undoes it."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    disable_chunked_mlp(model)
    count = 0
    for name, module in model.named_modules():
        if is_decoder_mlp(name, module):
            module.__dict__[_INNER] = module.forward  # the current forward: the class's or a speed patch
            module.__dict__[_CHUNK] = chunk_tokens
            module.forward = types.MethodType(_chunked_mlp_forward, module)
            count += 1
    logger.info("chunked MLP: %d MLPs run on at most %d tokens at a time", count, chunk_tokens)
    return count


def disable_chunked_mlp(model: nn.Module) -> int:
    """Undo :func:`enable_chunked_mlp` (the forward it wrapped comes back); returns the MLPs restored."""
    restored = 0
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if getattr(forward, "__func__", None) is _chunked_mlp_forward:
            inner = module.__dict__.pop(_INNER)
            module.__dict__.pop(_CHUNK, None)
            if getattr(inner, "__func__", None) is type(module).forward:
                del module.forward
            else:
                module.forward = inner
            restored += 1
    return restored


def chunked_mlp_tokens(model: nn.Module) -> int | None:
    """The chunk size :func:`enable_chunked_mlp` set on ``model``'s MLPs, or None when it is off."""
    for module in model.modules():
        if _CHUNK in module.__dict__:
            return module.__dict__[_CHUNK]
    return None
