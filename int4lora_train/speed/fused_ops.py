"""Fused RMSNorm and SwiGLU for the decoder layers: one autograd node (and on CUDA one Triton kernel) each way.

transformers' ``LlamaRMSNorm`` (also Mistral's, Qwen2/3's, Phi-3's) runs six elementwise kernels forward (fp32
copy, square, mean, rsqrt-multiply, cast back, weight multiply) and about ten backward, each a full pass over the
``[tokens, hidden]`` activations; ``LlamaMLP``'s ``act_fn(gate) * up`` saves an extra ``[tokens, intermediate]``
tensor (the SiLU output) and runs two passes each way. Under gradient checkpointing every forward runs twice. The
fused versions read the inputs once and write the outputs once, and compute exactly what the modules compute::

    RMSNorm:  r = 1 / sqrt(mean(x^2) + eps)  (fp32);  y = w * round(x * r)          round = to x's dtype
              dx = r * gn - r^3 / H * sum(gn * x) * x,   gn = round(g * w)          (w frozen: no weight grad)
    SwiGLU:   h = round(round(silu(g)) * u)
              du = round(dh * round(silu(g)));  dg = round(round(dh * u) * silu'(g))

Saved for backward: the norm's input (already alive) and ``r`` ``[tokens]``; SwiGLU's two inputs only.

:func:`enable_fused_kernels` patches the modules of a model in place (instance ``forward``), and falls back to the
module's own forward where it does not apply (a trainable norm weight, a weight dtype other than the input's).
Triton on CUDA (:mod:`int4lora_train.kernels.norm_mlp`), the same maths in torch elsewhere; the choice is
:func:`int4lora_train.kernels.backend.use_triton`'s.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

from int4lora_train.errors import ConfigError
from int4lora_train.kernels.backend import use_triton

logger = logging.getLogger(__name__)

RMSNORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"})
"""Norms computing ``weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)`` (Gemma's ``1 + weight`` form is left alone)."""
SWIGLU_ACTIVATIONS = frozenset({"silu", "swish"})


# ------------------------------------------------------------------------------------------------ torch references


def rms_norm_fwd_torch(x2: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, rstd)`` for ``x2`` ``[R, H]``: the module's forward, plus the fp32 ``rstd`` ``[R]`` for backward."""
    xf = x2.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    return weight * (xf * rstd.unsqueeze(1)).to(x2.dtype), rstd


def rms_norm_bwd_torch(g2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """``dx`` ``[R, H]`` of :func:`rms_norm_fwd_torch` (the weight is frozen)."""
    gn = (g2 * weight).float()
    xf = x2.float()
    r = rstd.unsqueeze(1)
    dot = (gn * xf).sum(-1, keepdim=True)
    return (r * gn - (r.pow(3) / x2.shape[1]) * dot * xf).to(x2.dtype)


def swiglu_fwd_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` as ``LlamaMLP`` computes it."""
    return F.silu(gate) * up


def swiglu_bwd_torch(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d gate, d up)`` of :func:`swiglu_fwd_torch`, as autograd computes them."""
    gf = gate.float()
    sig = torch.sigmoid(gf)
    s = F.silu(gate)
    du = dh * s
    ds = (dh * up).float()
    return (ds * sig * (1.0 + gf * (1.0 - sig))).to(gate.dtype), du


# ------------------------------------------------------------------------------------------------ autograd


class RMSNormFunction(torch.autograd.Function):
    """``weight * round(x * rsqrt(mean(x^2) + eps))`` over the last axis; gradient for ``x`` only."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        if use_triton(x2.device):
            from int4lora_train.kernels.norm_mlp import rms_norm_fwd

            y, rstd = rms_norm_fwd(x2, weight, eps)
        else:
            y, rstd = rms_norm_fwd_torch(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight, rstd = ctx.saved_tensors
        g2 = grad_y.reshape(x2.shape).contiguous()
        if use_triton(x2.device):
            from int4lora_train.kernels.norm_mlp import rms_norm_bwd

            dx = rms_norm_bwd(g2, x2, weight, rstd)
        else:
            dx = rms_norm_bwd_torch(g2, x2, weight, rstd)
        return dx.reshape(grad_y.shape), None, None


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, last]`` with unit column stride: a view where possible (strided rows allowed)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class SwiGLUFunction(torch.autograd.Function):
    """``silu(gate) * up``; saves only the two inputs (on CUDA read in place, even as strided column slices)."""

    @staticmethod
    def forward(ctx, gate, up):
        shape = gate.shape
        if use_triton(gate.device):
            from int4lora_train.kernels.norm_mlp import swiglu_fwd

            gate, up = _rows(gate), _rows(up)
            h = swiglu_fwd(gate, up)
        else:
            h = swiglu_fwd_torch(gate, up)
        ctx.save_for_backward(gate, up)
        ctx.shape = shape
        return h.reshape(shape)

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        if use_triton(gate.device):
            from int4lora_train.kernels.norm_mlp import swiglu_bwd

            dg, du = swiglu_bwd(dh.reshape(gate.shape).contiguous(), gate, up)
            return dg.reshape(ctx.shape), du.reshape(ctx.shape)
        return swiglu_bwd_torch(dh, gate, up)


# ------------------------------------------------------------------------------------------------ module patches


AUTO_MIN_ELEMENTS = 1 << 24
"""``min_elements`` of ``enable_fused_kernels(..., min_elements="auto")``: fuse only for inputs of at least 16 Mi
elements (tokens x hidden: the 8B shape from 4,096 tokens, the 70B shape from 2,048). Below that the measured step
(H100, seq 2048) was bound by host-side launch work, where a Python autograd node costs more host time than the
few aten kernels it replaces; above it the GPU work dominates and fusing saved 11-17% (BENCHMARKS.md)."""


def _fused_rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if (
        weight.requires_grad
        or weight.dtype != hidden_states.dtype
        or hidden_states.numel() < self._int4lora_fused_min_elements
    ):
        return type(self).forward(self, hidden_states)
    return RMSNormFunction.apply(hidden_states, weight, float(self.variance_epsilon))


def _fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    if x.numel() < self._int4lora_fused_min_elements:
        return type(self).forward(self, x)
    gate, up = self.gate_proj(x), self.up_proj(x)
    if gate.dtype != up.dtype or gate.shape != up.shape:
        return self.down_proj(self.act_fn(gate) * up)
    return self.down_proj(SwiGLUFunction.apply(gate, up))


def _is_swiglu_mlp(module: nn.Module) -> bool:
    config = getattr(module, "config", None)
    activation = getattr(config, "hidden_act", None)
    return (
        activation in SWIGLU_ACTIVATIONS
        and all(isinstance(getattr(module, name, None), nn.Module) for name in ("gate_proj", "up_proj", "down_proj"))
        and type(module).__name__.endswith("MLP")
    )


def enable_fused_kernels(
    model: nn.Module, rmsnorm: bool = True, swiglu: bool = True, min_elements: int | str = 0
) -> dict[str, int]:
    """Patch the RMSNorm and SwiGLU-MLP modules of ``model`` (plain or PEFT-wrapped) to the fused versions;
    returns ``{"rmsnorm": n, "swiglu": m}``, the modules patched. :func:`disable_fused_kernels` undoes it.

    ``min_elements``: inputs smaller than this (tokens x hidden) keep the module's own forward; ``"auto"`` is
    :data:`AUTO_MIN_ELEMENTS`, 0 fuses always.
    """
    for name, value in (("rmsnorm", rmsnorm), ("swiglu", swiglu)):
        if not isinstance(value, bool):
            raise ConfigError(f"enable_fused_kernels: {name} must be true or false, got {value!r}")
    if min_elements == "auto":
        min_elements = AUTO_MIN_ELEMENTS
    if isinstance(min_elements, bool) or not isinstance(min_elements, int) or min_elements < 0:
        raise ConfigError(f"enable_fused_kernels: min_elements must be 'auto' or an integer >= 0, got {min_elements!r}")
    counts = {"rmsnorm": 0, "swiglu": 0}
    for module in model.modules():
        if rmsnorm and type(module).__name__ in RMSNORM_CLASSES and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_fused_rms_norm_forward, module)
            module._int4lora_fused_min_elements = min_elements
            counts["rmsnorm"] += 1
        elif swiglu and _is_swiglu_mlp(module):
            module.forward = types.MethodType(_fused_mlp_forward, module)
            module._int4lora_fused_min_elements = min_elements
            counts["swiglu"] += 1
    logger.info("fused kernels: %d RMSNorm and %d SwiGLU modules patched", counts["rmsnorm"], counts["swiglu"])
    return counts


def disable_fused_kernels(model: nn.Module) -> int:
    """Undo :func:`enable_fused_kernels`; returns how many modules were restored."""
    restored = 0
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if getattr(forward, "__func__", None) in (_fused_rms_norm_forward, _fused_mlp_forward):
            del module.forward
            module.__dict__.pop("_int4lora_fused_min_elements", None)
            restored += 1
    return restored
