"""One autograd node per LoRA'd INT4 projection: base matmul, LoRA path and dropout fused, fewer passes over memory.

::

    forward:  W  = dequantize(packed)                       [out, in]  temporary in the compute dtype c
              y  = x @ W.T (+ bias)                          [T, out]
              xd = x * mask / (1 - p)                        only with dropout (mask: bool, drawn here)
              xa = xd @ A_c.T                                [T, r]
              y += s * xa @ B_c.T                            in place (addmm): one rounding, no [T, out] temporaries
    saved:    x (the input itself, no copy), xa [T, r], the bool mask, A, B, and the packed weight (or the dense W
              inside a checkpoint recompute, see ``int4_linear.dense_save_is_transient``)
    backward: gs = s * (g @ B_c)                             [T, r]
              grad_x = g @ W + gs @ A_c    (dropout: + (gs @ A_c) * mask / (1 - p))
              grad_A = gs.T @ xd                             [r, in]   in A's dtype (fp32 adapters stay fp32)
              grad_B = s * g.T @ xa                          [out, r]  in B's dtype

PEFT's generic path (``result + lora_B(lora_A(dropout(x))) * scaling`` around the base layer) writes three
``[T, out]`` temporaries (``lora_B``'s output, the scaled copy, the sum), and under autocast with fp32 adapters it
first casts ``x`` to fp32 and back (two ``[T, in]`` copies, the bf16 one saved for backward); its backward adds
another ``[T, out]`` scaled gradient and a separate ``[T, in]`` LoRA input gradient summed into the base's. The
numerics are PEFT's: the same products in the same dtype (c under autocast, else the common dtype), each summed in
fp32 by the matmul; the only difference is fewer intermediate roundings to c (none in fp32).

Folding ``s * B @ A`` into the dense temporary instead (one matmul) is deliberately not done: in bf16 a small
adapter update (early in training ``|s B A|`` is far below a weight's bf16 resolution) would round away.

:func:`fused_lora_forward` is what :class:`~int4lora_train.modeling.peft_integration.Int4LoraLinear` calls when the
layer qualifies (:func:`fused_lora_applies`); anything else (several active adapters, disabled adapters, mixed-batch
``adapter_names``, a compute dtype that differs from the adapters' outside autocast) takes PEFT's generic path.

A :class:`ProjectionGroup` goes one step further for projections that read the same input (q/k/v, gate/up): one
node dequantizes their weights into one stacked temporary and runs one base matmul and one LoRA pair
(:class:`Int4LoraGroupFunction`). At batch size 1 the step is bound by host-side launches, and this cut it by 9%
(BENCHMARKS.md).

:func:`enable_fused_lora` / :func:`configure_int4_training` switch the features per model;
:func:`int4lora_train.modeling.optimizations.apply_training_optimizations` is the one call for trainers.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from int4lora_train.errors import ConfigError
from int4lora_train.modeling.int4_linear import Int4Linear, _WeightSpec, save_weight_tensors, saved_dense_weight
from int4lora_train.quant.layout import INT4_TENSOR_NAMES

logger = logging.getLogger(__name__)


def dropout_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A bool keep-mask of ``shape`` (each element kept with probability ``1 - p``), from the global RNG.

    Drawn from the default generator, so gradient checkpointing's RNG-state restore redraws the same mask in the
    recompute. One byte per element (PEFT's ``nn.Dropout`` saves a scaled copy of the input, two bytes in bf16).
    """
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p)


def _dropped(x2: torch.Tensor, mask: torch.Tensor | None, p: float) -> torch.Tensor:
    """``x * mask / (1 - p)`` (one rounding: the scalar multiply runs in fp32), or ``x`` itself without dropout."""
    if mask is None:
        return x2
    return x2.mul(mask).mul_(1.0 / (1.0 - p))


class Int4LoraFunction(torch.autograd.Function):
    """``x @ dequantize(W).T + bias + s * dropout(x) @ A.T @ B.T`` as one node (see the module docstring).

    ``x`` and ``bias`` arrive in the compute dtype; ``lora_a`` ``[r, in]`` and ``lora_b`` ``[out, r]`` in their own
    dtype (fp32 with PEFT's default), cast to the compute dtype here so their gradients return in their own dtype.
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, bias, packed, scales, zero_points, g_idx, spec: _WeightSpec, scaling, p):
        dtype = spec.dtype
        in_features, out_features = lora_a.shape[1], lora_b.shape[0]
        x2 = x.reshape(-1, in_features)  # [T, in], a view for contiguous inputs
        weight = spec.dense(packed, scales, zero_points, g_idx)  # [out, in]
        a_c, b_c = lora_a.to(dtype), lora_b.to(dtype)
        y = F.linear(x2, weight, bias)  # [T, out]
        mask = dropout_mask(x2.shape, p, x2.device) if p > 0 else None
        xa = _dropped(x2, mask, p) @ a_c.t()  # [T, r]
        y.addmm_(xa, b_c.t(), alpha=scaling)
        needs = ctx.needs_input_grad
        save_weight_tensors(
            ctx, weight, (packed, scales, zero_points, g_idx), spec, needs[0], x2, xa, mask, lora_a, lora_b
        )
        ctx.scaling, ctx.p, ctx.x_shape = scaling, p, x.shape
        return y.reshape(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_output):
        saved = ctx.saved_tensors  # read once: a non-reentrant checkpoint allows a single unpack
        x2, xa, mask, lora_a, lora_b = saved[:5]
        need_x, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
        dtype, s, p = ctx.spec.dtype, ctx.scaling, ctx.p
        g = grad_output.reshape(-1, lora_b.shape[0]).to(dtype)  # [T, out]
        grad_x = grad_a = grad_b = grad_bias = None
        if need_x or need_a:
            a_c, b_c = lora_a.to(dtype), lora_b.to(dtype)
            gs = (g @ b_c).mul_(s)  # [T, r]
            if need_x:
                grad_x = g @ saved_dense_weight(ctx, saved)  # [T, in]
                if mask is None:
                    grad_x.addmm_(gs, a_c)
                else:
                    grad_x.add_((gs @ a_c).mul_(mask), alpha=1.0 / (1.0 - p))
                grad_x = grad_x.reshape(ctx.x_shape)
            if need_a:
                grad_a = (gs.t() @ _dropped(x2, mask, p)).to(lora_a.dtype)  # [r, in]
        if need_b:
            grad_b = (g.t() @ xa).to(lora_b.dtype).mul_(s)  # [out, r]
        if need_bias:
            grad_bias = g.sum(0)
        return grad_x, grad_a, grad_b, grad_bias, None, None, None, None, None, None, None


@dataclass(frozen=True)
class FusedCall:
    """What one fused forward of an ``Int4LoraLinear`` needs, looked up once per call (see
    :func:`fused_lora_applies`): the adapter, the INT4 base, the adapter weights, dropout probability, dtypes."""

    adapter: str
    base: Int4Linear
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    p: float
    dtype: torch.dtype
    autocast: bool
    scaling: float


def fused_lora_applies(layer: Any, x: torch.Tensor, args: tuple, kwargs: dict) -> FusedCall | None:
    """A :class:`FusedCall` when ``layer`` (an ``Int4LoraLinear``) has one active plain-LoRA adapter and the fused
    path computes exactly what PEFT's generic forward would; else None (the caller takes the generic path).

    Runs on every projection call, so it reads PEFT's state directly (``_modules``, ``_active_adapter``) rather
    than through ``nn.Module.__getattr__`` and PEFT's properties.
    """
    if not layer.fused_lora or args or kwargs or layer._disable_adapters or layer.merged_adapters:
        return None
    name = layer._active_adapter
    if not isinstance(name, str):
        if len(name) != 1:
            return None  # several adapters at once (or none): PEFT sums them one by one
        name = name[0]
    modules = layer._modules
    lora_a = modules["lora_A"]._modules.get(name)
    if lora_a is None or name in layer.lora_variant:
        return None
    base = modules["base_layer"]
    dropout = modules["lora_dropout"]._modules[name]
    if type(base) is not Int4Linear and not isinstance(base, Int4Linear):
        return None
    if isinstance(dropout, nn.Dropout):
        p = float(dropout.p) if dropout.training else 0.0
    elif isinstance(dropout, nn.Identity):
        p = 0.0
    else:
        return None
    a = lora_a._parameters["weight"]
    b = modules["lora_B"]._modules[name]._parameters["weight"]
    if a.dtype != b.dtype:
        return None
    dtype, autocast = base.compute_dtype_for(x)
    # Outside autocast PEFT runs the adapter in its own dtype and the base in the layer's: fuse only when they agree.
    if not autocast and (dtype != a.dtype or x.dtype != dtype):
        return None
    return FusedCall(name, base, a, b, p, dtype, autocast, float(layer.scaling[name]))


def int4_tensors(base: Int4Linear) -> list:
    """``[packed, scales, zero_points, g_idx]`` of ``base``, read from its buffers, or from its parameters where
    FSDP sharding re-registered them as frozen parameters (``train.distributed``); no ``__getattr__`` detour."""
    buffers, parameters = base._buffers, base._parameters
    return [buffers[name] if name in buffers else parameters.get(name) for name in INT4_TENSOR_NAMES]


def fused_lora_forward(layer: Any, x: torch.Tensor, call: FusedCall) -> torch.Tensor:
    """The fused forward of ``layer`` (an ``Int4LoraLinear``) as ``call`` describes; same result dtype as PEFT's."""
    base, dtype = call.base, call.dtype
    bias = base._parameters.get("bias")
    out = Int4LoraFunction.apply(
        x.to(dtype),
        call.lora_a,
        call.lora_b,
        None if bias is None else bias.to(dtype),
        *int4_tensors(base),
        base.weight_spec(dtype),
        call.scaling,
        call.p,
    )
    return out if call.autocast else out.to(x.dtype)


# ------------------------------------------------------------------------------------------------ projection groups

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Sibling projections that read the same input in Llama-style decoder layers (attention, MLP)."""


@dataclass(frozen=True)
class _GroupSpec:
    """The non-tensor half of a projection group: each member's weight spec, width, rank and scaling."""

    dtype: torch.dtype
    specs: tuple  # one _WeightSpec per member
    outs: tuple[int, ...]
    ranks: tuple[int, ...]
    scalings: tuple[float, ...]
    keep_dense: bool

    def dense(self, buffers: tuple, device: torch.device) -> torch.Tensor:
        """The members' dense weights stacked along the output axis, ``[sum(outs), in]``, one row slice each."""
        weight = torch.empty(sum(self.outs), self.specs[0].in_features, dtype=self.dtype, device=device)
        start = 0
        for i, (spec, rows) in enumerate(zip(self.specs, self.outs)):
            spec.dense(*buffers[4 * i : 4 * i + 4], out=weight[start : start + rows], slot=("group", start))
            start += rows
        return weight


class Int4LoraGroupFunction(torch.autograd.Function):
    """Several LoRA'd INT4 projections of one input as one node (dropout off)::

        W = [W_1; ...; W_n]                       [O, in]   (O = sum of the outputs), dequantized slice by slice
        y = x @ W.T + (x @ A.T) @ Bs.T            A = [A_1; ...; A_n] [R, in], Bs = blockdiag(s_i B_i) [O, R]
        outputs: y's column slices, one per member

    One base matmul and one LoRA pair instead of n of each (and n times fewer host launches); the gradients are
    those of the n separate projections.
    """

    @staticmethod
    def forward(ctx, x, group: _GroupSpec, *tensors):
        n, dtype = len(group.outs), group.dtype
        lora_a, lora_b, buffers = tensors[:n], tensors[n : 2 * n], tensors[2 * n :]
        x2 = x.reshape(-1, x.shape[-1])  # [T, in]
        weight = group.dense(buffers, x.device)  # [O, in]
        a_cat = torch.cat([a.to(dtype) for a in lora_a])  # [R, in]
        bs = torch.block_diag(*[b.to(dtype) * s for b, s in zip(lora_b, group.scalings)])  # [O, R]
        y = F.linear(x2, weight)  # [T, O]
        xa = x2 @ a_cat.t()  # [T, R]
        y.addmm_(xa, bs.t())
        spec = _WeightSpec(0, 0, dtype, keep_dense=group.keep_dense)  # only keep_dense matters to the policy
        save_weight_tensors(ctx, weight, buffers, spec, ctx.needs_input_grad[0], x2, xa, a_cat, bs)
        ctx.group, ctx.x_shape = group, x.shape
        ctx.param_dtypes = tuple(t.dtype for t in tensors[: 2 * n])
        outputs, start = [], 0
        for rows in group.outs:
            outputs.append(y[:, start : start + rows].view(*x.shape[:-1], rows))
            start += rows
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors  # read once: a non-reentrant checkpoint allows a single unpack
        x2, xa, a_cat, bs = saved[:4]
        group = ctx.group
        n, dtype = len(group.outs), group.dtype
        g = torch.cat(
            [
                torch.zeros(x2.shape[0], rows, dtype=dtype, device=x2.device)
                if grad is None
                else grad.reshape(-1, rows).to(dtype)
                for grad, rows in zip(grads, group.outs)
            ],
            dim=1,
        )  # [T, O]
        gs = g @ bs  # [T, R], the scalings included
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = saved[4] if ctx.dense_saved else group.dense(saved[4:], x2.device)
            grad_x = (g @ weight).addmm_(gs, a_cat).reshape(ctx.x_shape)
        grad_a = (gs.t() @ x2).split(list(group.ranks))  # [r_i, in] each
        gb = g.t() @ xa  # [O, R]: the diagonal blocks are the members' gradients
        grads_a, grads_b, row, col = [], [], 0, 0
        for i, (rows, rank, s) in enumerate(zip(group.outs, group.ranks, group.scalings)):
            grads_a.append(grad_a[i].to(ctx.param_dtypes[i]))
            grads_b.append(gb[row : row + rows, col : col + rank].to(ctx.param_dtypes[n + i]).mul_(s))
            row, col = row + rows, col + rank
        return (grad_x, None, *grads_a, *grads_b, *([None] * (4 * n)))


class ProjectionGroup:
    """Sibling :class:`~int4lora_train.modeling.peft_integration.Int4LoraLinear` layers that read the same input.

    The first member called with an input computes every member's output in one
    :class:`Int4LoraGroupFunction` node and hands the others theirs when they are called with the same tensor
    (the attention module calls ``q_proj(h)``, ``k_proj(h)``, ``v_proj(h)`` in a row). Whenever the group cannot
    run as one node (dropout, a bias, different adapters or dtypes, another input) each member computes alone.
    """

    def __init__(self, members: list) -> None:
        self.members = list(members)
        self._input: weakref.ref | None = None
        self._outputs: dict[int, torch.Tensor] = {}

    def __getstate__(self) -> dict:
        # Outputs waiting for their member belong to one forward pass; a copy or a pickle starts without them.
        return {"members": self.members, "_input": None, "_outputs": {}}

    def forward_member(self, layer: Any, x: torch.Tensor, call: FusedCall) -> torch.Tensor | None:
        """``layer``'s output for ``x`` from the group node, or None (compute it alone)."""
        if self._input is not None and self._input() is x and id(layer) in self._outputs:
            out = self._outputs.pop(id(layer))
            if not self._outputs:
                self._input = None
            return out
        self._input, self._outputs = None, {}
        calls = [call if m is layer else fused_lora_applies(m, x, (), {}) for m in self.members]
        group = self._spec(calls)
        if group is None:
            return None
        tensors = [c.lora_a for c in calls] + [c.lora_b for c in calls]
        for c in calls:
            tensors += int4_tensors(c.base)
        outputs = Int4LoraGroupFunction.apply(x.to(group.dtype), group, *tensors)
        mine = None
        for member, out in zip(self.members, outputs):
            if member is layer:
                mine = out
            else:
                self._outputs[id(member)] = out
        self._input = weakref.ref(x)
        return mine if call.autocast else mine.to(x.dtype)

    @staticmethod
    def _spec(calls: list) -> _GroupSpec | None:
        """The group node's description, or None when the members cannot run as one node."""
        first = calls[0]
        if first is None:
            return None
        for c in calls:
            if (
                c is None
                or c.adapter != first.adapter
                or c.p > 0
                or c.dtype != first.dtype
                or c.base.bias is not None
                or c.base.cache is not None
                or c.base.in_features != first.base.in_features
            ):
                return None
        specs = tuple(c.base.weight_spec(c.dtype) for c in calls)
        return _GroupSpec(
            first.dtype,
            specs,
            tuple(c.base.out_features for c in calls),
            tuple(c.lora_a.shape[0] for c in calls),
            tuple(c.scaling for c in calls),
            all(spec.keep_dense for spec in specs),
        )


def find_projection_groups(model: nn.Module) -> list[ProjectionGroup]:
    """The :data:`GROUPS` of INT4 LoRA layers in ``model`` (every module whose children include all of a group's
    names as ``Int4LoraLinear`` layers of one input width)."""
    from int4lora_train.modeling.peft_integration import Int4LoraLinear

    groups = []
    for module in model.modules():
        for names in GROUPS:
            members = [getattr(module, name, None) for name in names]
            if all(isinstance(m, Int4LoraLinear) for m in members):
                widths = {m.get_base_layer().in_features for m in members}
                if len(widths) == 1:
                    groups.append(ProjectionGroup(members))
    return groups


# ------------------------------------------------------------------------------------------------ switches


def configure_int4_training(
    model: nn.Module,
    fused_lora: bool | None = None,
    keep_dense_for_backward: bool | None = None,
    group_projections: bool | None = None,
) -> dict[str, int]:
    """Set the INT4 training-speed features on every INT4 layer of ``model`` (None leaves a feature as it is).

    - ``fused_lora`` (default on): one fused autograd node per LoRA'd INT4 projection (this module).
    - ``keep_dense_for_backward`` (default on): keep the dense weight dequantized in a gradient-checkpoint
      recompute for the backward that follows (2 dequantizations per step instead of 3; costs one checkpointed
      block's dense weights while its backward runs).
    - ``group_projections`` (off until enabled here): q/k/v and gate/up as one node each
      (:class:`ProjectionGroup`); needs ``fused_lora``.

    Returns ``{"lora_layers": n, "int4_layers": m, "groups": g}`` (g: groups formed; 0 unless enabled here).
    """
    from int4lora_train.modeling.peft_integration import Int4LoraLinear

    for name, value in (
        ("fused_lora", fused_lora),
        ("keep_dense_for_backward", keep_dense_for_backward),
        ("group_projections", group_projections),
    ):
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"configure_int4_training: {name} must be true or false, got {value!r}")
    counts = {"lora_layers": 0, "int4_layers": 0, "groups": 0}
    if group_projections is not None:
        for module in model.modules():
            if isinstance(module, Int4LoraLinear):
                module._lora_group = None
        if group_projections:
            groups = find_projection_groups(model)
            for group in groups:
                for member in group.members:
                    member._lora_group = group
            counts["groups"] = len(groups)
    for module in model.modules():
        if isinstance(module, Int4LoraLinear):
            if fused_lora is not None:
                module.fused_lora = fused_lora
            counts["lora_layers"] += 1
        elif isinstance(module, Int4Linear):
            if keep_dense_for_backward is not None:
                module.keep_dense_for_backward = keep_dense_for_backward
            counts["int4_layers"] += 1
    logger.debug(
        "configure_int4_training: fused_lora=%s keep_dense_for_backward=%s on %s",
        fused_lora,
        keep_dense_for_backward,
        counts,
    )
    return counts


def enable_fused_lora(model: nn.Module, enabled: bool = True) -> int:
    """Switch the fused LoRA path on (default) or off for every INT4 LoRA layer of ``model``; returns their count."""
    return configure_int4_training(model, fused_lora=enabled)["lora_layers"]
