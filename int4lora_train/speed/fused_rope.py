"""Fused rotary position embedding: transformers' ``apply_rotary_pos_emb`` as one autograd node, one Triton kernel
for q and k together each way (:mod:`int4lora_train.kernels.rope`, bit-identical to the function and its autograd
gradient in fp32, bf16 and fp16).

The function replaced runs about ten elementwise kernels forward (for q and for k: multiply, two slices, negate,
concatenate, multiply, add), again in every checkpoint recompute, and more in backward. transformers calls it as
the module-level function of the attention's modeling module (``modeling_llama.apply_rotary_pos_emb`` from inside
``LlamaAttention.forward``), so it cannot be replaced per model instance: :func:`enable_fused_rope` replaces that
module attribute, for every model of the architecture in this process (harmless: the result is the same bits).

Only modules whose ``apply_rotary_pos_emb`` and ``rotate_half`` are, by their source code, the standard ones
(:data:`STANDARD_APPLY_ROTARY_POS_EMB`, :data:`STANDARD_ROTATE_HALF`, docstrings and decorators aside) are patched:
in transformers 5.x Llama, Mistral, Qwen2, Qwen3, their MoE variants, Mixtral, Gemma 1-3 and others; not Phi-3
(partial rotary inside the function), OLMo (casts the results to q's / k's dtype), Cohere (fp32, interleaved
pairs) or GLM (another ``rotate_half``). A name alone says nothing: a model family that kept the name but changed
the maths keeps its own function.

Patches are reference-counted per modeling module: the original function comes back when the last model that
enabled it is disabled (or garbage-collected). The fused function hands anything it does not handle to the
original: inputs on a device where :func:`~int4lora_train.kernels.backend.use_triton` says no (the CPU, unless a
test forces the interpreter; ``INT4LORA_KERNELS=torch``), ``unsqueeze_dim`` other than 1, tensors that are not
``[B, H, T, D]`` q / k with ``[B or 1, T, D]`` cos / sin of one dtype (fp32, bf16, fp16) and an even ``D``, and cos
/ sin that need a gradient.
"""

from __future__ import annotations

import ast
import functools
import inspect
import logging
import sys
import textwrap
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from int4lora_train.kernels.backend import use_triton

logger = logging.getLogger(__name__)

STANDARD_APPLY_ROTARY_POS_EMB = """
def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed
"""
"""The function the kernel reproduces (transformers 5.x, docstring and decorators left out)."""

STANDARD_ROTATE_HALF = """
def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)
"""
"""The ``rotate_half`` that :data:`STANDARD_APPLY_ROTARY_POS_EMB` calls, from the same module."""

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------------ autograd


class RotaryEmbeddingFunction(torch.autograd.Function):
    """``apply_rotary_pos_emb(q, k, cos, sin)`` (``unsqueeze_dim=1``) with one Triton launch each way; gradients
    for q and k only. Saves cos and sin (``[B, T, D]``, shared by every layer's call), not q or k: the rotation is
    linear."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        from int4lora_train.kernels.rope import rope_fwd

        ctx.save_for_backward(cos, sin)
        return rope_fwd(q, k, cos, sin)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        from int4lora_train.kernels.rope import rope_bwd

        cos, sin = ctx.saved_tensors
        needs_q, needs_k = ctx.needs_input_grad[:2]
        grad_q, grad_k = rope_bwd(grad_q if needs_q else None, grad_k if needs_k else None, cos, sin)
        return grad_q, grad_k, None, None


def fused_rope_handles(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether :class:`RotaryEmbeddingFunction` computes ``apply_rotary_pos_emb(q, k, cos, sin)`` for these inputs
    (else the original function runs)."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, cos, sin)):
        return False
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return False
    batch, _, seq_len, dim = q.shape
    if k.shape[0] != batch or k.shape[2:] != (seq_len, dim) or cos.shape[0] not in (1, batch):
        return False
    if cos.shape[1:] != (seq_len, dim) or dim % 2 or q.numel() == 0 or k.numel() == 0:
        return False
    if q.dtype not in SUPPORTED_DTYPES or any(t.dtype != q.dtype for t in (k, cos, sin)):
        return False
    if any(t.device != q.device for t in (k, cos, sin)):
        return False
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        return False
    return use_triton(q.device)


def _fused_version_of(original: Callable) -> Callable:
    """The replacement for ``original`` (a standard ``apply_rotary_pos_emb``), same signature."""

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if unsqueeze_dim != 1 or not fused_rope_handles(q, k, cos, sin):
            return original(q, k, cos, sin, unsqueeze_dim)
        return RotaryEmbeddingFunction.apply(q, k, cos, sin)

    return apply_rotary_pos_emb


# ------------------------------------------------------------------------------------------------ module patches


@dataclass
class _Patch:
    """One modeling module's patch: what it replaced, what replaced it, and how many models use it."""

    module: types.ModuleType
    original: Callable
    fused: Callable
    users: int = 0


_PATCHES: dict[str, _Patch] = {}
"""Modeling module name -> its patch, while patched."""

_ENABLED: dict[int, tuple[tuple[str, ...], weakref.finalize]] = {}
"""``id(model)`` -> the modules it patched and the finalizer that releases them: called by
:func:`disable_fused_rope`, or by the garbage collector when the model goes (so a forgotten model neither keeps a
module patched nor leaves its id, which a later object may reuse, looking enabled)."""


def _definition(source: str) -> str:
    """``source``'s (first) function definition as an AST dump, without its decorators and docstring."""
    node = ast.parse(textwrap.dedent(source)).body[0]
    if not isinstance(node, ast.FunctionDef):
        return ""
    node.decorator_list = []
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        node.body = body[1:]
    return ast.dump(node)


_STANDARD = (_definition(STANDARD_APPLY_ROTARY_POS_EMB), _definition(STANDARD_ROTATE_HALF))


def has_standard_rope(module: types.ModuleType) -> bool:
    """Whether ``module`` defines the standard ``apply_rotary_pos_emb`` and ``rotate_half`` (by their source)."""
    functions = (getattr(module, "apply_rotary_pos_emb", None), getattr(module, "rotate_half", None))
    if not all(isinstance(f, types.FunctionType) for f in functions):
        return False
    try:
        return tuple(_definition(inspect.getsource(f)) for f in functions) == _STANDARD
    except (OSError, TypeError, SyntaxError):  # no source to read (e.g. built at run time)
        return False


def _modeling_modules(model: nn.Module) -> list[types.ModuleType]:
    """The Python modules defining ``model``'s submodules that have an ``apply_rotary_pos_emb``, sorted by name."""
    names = {type(m).__module__ for m in model.modules()}
    modules = [sys.modules.get(name) for name in sorted(names)]
    return [m for m in modules if m is not None and hasattr(m, "apply_rotary_pos_emb")]


def enable_fused_rope(model: nn.Module) -> list[str]:
    """Route ``model``'s (plain or PEFT-wrapped) rotary embedding through the fused kernel: patch
    ``apply_rotary_pos_emb`` in each of its modeling modules that has the standard one. Returns the names of the
    modules patched for it (empty when none qualifies); enabling a model twice changes nothing.
    :func:`disable_fused_rope` undoes it."""
    key = id(model)
    if key in _ENABLED:
        return list(_ENABLED[key][0])
    patched = []
    for module in _modeling_modules(model):
        name = module.__name__
        patch = _PATCHES.get(name)
        if patch is None:
            if not has_standard_rope(module):
                logger.info("fused RoPE: %s.apply_rotary_pos_emb is not the standard one; left alone", name)
                continue
            original = module.apply_rotary_pos_emb
            patch = _PATCHES[name] = _Patch(module, original, _fused_version_of(original))
            module.apply_rotary_pos_emb = patch.fused
        patch.users += 1
        patched.append(name)
    _ENABLED[key] = tuple(patched), weakref.finalize(model, _release, key, tuple(patched))
    logger.info("fused RoPE: apply_rotary_pos_emb patched in %s", ", ".join(patched) or "no module")
    return patched


def disable_fused_rope(model: nn.Module) -> list[str]:
    """Undo :func:`enable_fused_rope` for ``model``: each module's original function comes back once no enabled
    model uses it. Returns the module names ``model`` had patched (empty when it was not enabled)."""
    enabled = _ENABLED.get(id(model))
    if enabled is None:
        return []
    names, release = enabled
    release()
    return list(names)


def fused_rope_modules() -> list[str]:
    """The modeling modules patched now (by any model)."""
    return sorted(_PATCHES)


def _release(key: int, names: tuple[str, ...]) -> None:
    del _ENABLED[key]
    for name in names:
        patch = _PATCHES[name]
        patch.users -= 1
        if patch.users:
            continue
        del _PATCHES[name]
        if patch.module.apply_rotary_pos_emb is patch.fused:
            patch.module.apply_rotary_pos_emb = patch.original
            logger.info("fused RoPE: %s.apply_rotary_pos_emb restored", name)
        else:
            logger.warning("fused RoPE: %s.apply_rotary_pos_emb was replaced by someone else; left as it is", name)
