"""Sibling INT4 LoRA projections that read the same input (q/k/v, gate/up) as one autograd node.

The first member called with an input dequantizes every member's weight into one stacked temporary and runs one
base matmul and one LoRA pair (:class:`Int4LoraGroupFunction`); the others get their outputs when the attention or
MLP module calls them with the same tensor. At batch size 1 the step is bound by host-side launches, and this cut it
by 9% (BENCHMARKS.md). Members reach their group through ``Int4LoraLinear.lora_group``, which
:func:`int4lora_train.speed.apply` sets (``group_projections``).
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from int4lora_train.modeling.int4_linear import _WeightSpec, in_dtype, save_weight_tensors
from int4lora_train.modeling.lora_layer import (
    FusedCall,
    Int4LoraLinear,
    add_projection_grad_x,
    derived_adapter_weight,
    dropped_projection,
    fused_lora_applies,
    projection_grad_a,
)

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Sibling projections that read the same input in Llama-style decoder layers (attention, MLP)."""


@dataclass(frozen=True)
class _GroupSpec:
    """The non-tensor half of a projection group: the input width, each member's weight spec, width, rank and
    scaling."""

    dtype: torch.dtype
    in_features: int
    specs: tuple  # one _WeightSpec per member
    outs: tuple[int, ...]
    ranks: tuple[int, ...]
    scalings: tuple[float, ...]
    p: float  # LoRA dropout, the same for every member (each draws its own mask)
    fused_dropout_backward: bool = False  # the dropout's backward through kernels/lora_dropout.py
    fused_dropout_forward: bool = False  # the dropout and A projection in one Triton pass

    @property
    def keep_dense(self) -> bool:
        """Whether the stacked dense weight may be saved for backward: when every member's may."""
        return all(spec.keep_dense for spec in self.specs)

    @property
    def blocks(self) -> tuple[tuple[slice, slice], ...]:
        """Each member's ``(rows, cols)``: its rows of the stacked weight and output columns ``[O]``, and its columns
        of ``xa`` ``[R]`` (its block of the ``[O, R]`` block diagonal ``Bs``)."""
        ends_o, ends_r = list(itertools.accumulate(self.outs)), list(itertools.accumulate(self.ranks))
        return tuple(
            (slice(end_o - out, end_o), slice(end_r - rank, end_r))
            for out, rank, end_o, end_r in zip(self.outs, self.ranks, ends_o, ends_r)
        )

    def dense(self, buffers: tuple, device: torch.device) -> torch.Tensor:
        """The members' dense weights stacked along the output axis, ``[sum(outs), in]``, one row slice each."""
        weight = torch.empty(sum(self.outs), self.in_features, dtype=self.dtype, device=device)
        for i, (spec, (rows, _)) in enumerate(zip(self.specs, self.blocks)):
            spec.dense(*buffers[4 * i : 4 * i + 4], out=weight[rows])
        return weight

    def lora_weights(self, lora_a: tuple, lora_b: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, Bs)``: the members' ``A`` stacked, ``[R, in]``, and ``blockdiag(s_i B_i)``, ``[O, R]``, in the
        compute dtype (reused inside :func:`~int4lora_train.modeling.lora_layer.reuse_adapter_weights`)."""

        def build():
            a_cat = torch.cat([a.to(self.dtype) for a in lora_a])
            bs = torch.block_diag(*[b.to(self.dtype) * s for b, s in zip(lora_b, self.scalings)])
            return a_cat, bs

        return derived_adapter_weight(("group", self.dtype, self.scalings), (*lora_a, *lora_b), build)


class Int4LoraGroupFunction(torch.autograd.Function):
    """Several LoRA'd INT4 projections of one input as one node::

        W = [W_1; ...; W_n]                       [O, in]   (O = sum of the outputs), dequantized slice by slice
        y = x @ W.T + xa @ Bs.T                   Bs = blockdiag(s_i B_i) [O, R]
        xa = [d_1(x) @ A_1.T, ..., d_n(x) @ A_n.T] [T, R]   d_i: member i's dropout (its own mask), or x @ A.T
                                                            with A = [A_1; ...; A_n] [R, in] without dropout
        outputs: y's column slices, one per member
        backward: grad_x = sum_i g_i @ W_i + (dropped) gs @ A, gs_i = g_i @ (s_i B_i), grad_B_i = s_i g_i.T @ xa_i,
                  member by member on the members' own gradients (never joined into one [T, O] copy)

    One base matmul instead of n (and fewer host launches); the values and gradients are those of the n separate
    projections, dropout masks included: each member draws its mask from the global RNG in member order, as the
    separate projections, called in that order, would (with ``fused_dropout_forward`` the kernel draws them from its
    own stream, one per member index, so grouped and separate projections draw different masks). With dropout the backward's dropout part (every member's
    input gradient and ``A`` gradient) runs through :mod:`int4lora_train.kernels.lora_dropout` when the members'
    ``fused_dropout_backward`` is on and Triton runs on the device (one launch for up to three members), else
    through the torch ops.
    """

    @staticmethod
    def forward(ctx, x, group: _GroupSpec, *tensors):
        n, dtype = len(group.outs), group.dtype
        lora_a, lora_b, buffers = tensors[:n], tensors[n : 2 * n], tensors[2 * n :]
        x2 = x.reshape(-1, x.shape[-1])  # [T, in]
        weight = group.dense(buffers, x.device)  # [O, in]
        a_cat, bs = group.lora_weights(lora_a, lora_b)  # [R, in], [O, R]
        y = F.linear(x2, weight)  # [T, O]
        xa, masks = dropped_projection(x2, a_cat, group.ranks, group.p, group.fused_dropout_forward)  # [T, R]
        y.addmm_(xa, bs.t())
        spec = _WeightSpec(dtype, None, keep_dense=group.keep_dense)  # only keep_dense matters to the policy
        save_weight_tensors(ctx, weight, buffers, spec, ctx.needs_input_grad[0], x2, xa, a_cat, bs, *masks)
        ctx.group, ctx.x_shape = group, x.shape
        ctx.param_dtypes = tuple(t.dtype for t in tensors[: 2 * n])
        return tuple(y[:, rows].view(*x.shape[:-1], out) for out, (rows, _) in zip(group.outs, group.blocks))

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors  # read once: a non-reentrant checkpoint allows a single unpack
        x2, xa, a_cat, bs = saved[:4]
        group = ctx.group
        n, dtype = len(group.outs), group.dtype
        masks = saved[4 : ctx.num_extra]  # one per member with dropout, else none
        # Member by member: the members' gradients arrive as separate [T, out_i] tensors (autograd materializes an
        # unused output's as zeros), and joining them into one [T, O] copy (470 MB per gate/up of the 8B shape at
        # 8192 tokens) costs more than the split matmuls.
        members = group.blocks  # (rows, cols) slices of the [O, R] block diagonal
        g = [grad.reshape(-1, out).to(dtype) for grad, out in zip(grads, group.outs)]
        gs = torch.cat([g_i @ bs[rows, cols] for g_i, (rows, cols) in zip(g, members)], dim=1)  # [T, R], scaled
        tensors = saved[ctx.num_extra :]
        grad_x = None
        # the dropout's part per member: the Triton kernels (fused_dropout_backward, CUDA) or the torch ops
        ranks, p, fused = group.ranks, group.p, group.fused_dropout_backward
        if ctx.needs_input_grad[0]:
            weight = tensors[0] if ctx.dense_saved else group.dense(tensors, x2.device)
            grad_x = g[0] @ weight[members[0][0]]  # [T, in]
            for g_i, (rows, _) in zip(g[1:], members[1:]):
                grad_x.addmm_(g_i, weight[rows])
            add_projection_grad_x(grad_x, gs, a_cat, masks, ranks, p, fused)
            grad_x = grad_x.reshape(ctx.x_shape)
        grad_a = projection_grad_a(x2, gs, masks, ranks, p, fused)  # [r_i, in] each
        grads_a, grads_b = [], []
        for i, (g_i, (_, cols), s) in enumerate(zip(g, members, group.scalings)):
            grads_a.append(grad_a[i].to(ctx.param_dtypes[i]))
            grads_b.append((g_i.t() @ xa[:, cols]).to(ctx.param_dtypes[n + i]).mul_(s))  # [out_i, r_i]
        return (grad_x, None, *grads_a, *grads_b, *([None] * (4 * n)))


class ProjectionGroup:
    """Sibling :class:`~int4lora_train.modeling.lora_layer.Int4LoraLinear` layers that read the same input.

    The first member called with an input computes every member's output in one
    :class:`Int4LoraGroupFunction` node and hands the others theirs when they are called with the same tensor
    (the attention module calls ``q_proj(h)``, ``k_proj(h)``, ``v_proj(h)`` in a row). Whenever the group cannot
    run as one node (a bias, different adapters, dtypes or dropout rates, another input) each member computes alone.
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
            tensors += c.base.int4_tensors()
        outputs = Int4LoraGroupFunction.apply(in_dtype(x, group.dtype), group, *tensors)
        mine = None
        for member, out in zip(self.members, outputs):
            if member is layer:
                mine = out
            else:
                self._outputs[id(member)] = out
        self._input = weakref.ref(x)
        return mine if call.autocast else in_dtype(mine, x.dtype)

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
                or c.p != first.p
                or c.fused_dropout_backward != first.fused_dropout_backward
                or c.fused_dropout_forward != first.fused_dropout_forward
                or c.dtype != first.dtype
                or c.base._parameters.get("bias") is not None
                or c.base.cache is not None
                or c.base.in_features != first.base.in_features
            ):
                return None
        specs = tuple(c.base.weight_spec(c.dtype) for c in calls)
        return _GroupSpec(
            first.dtype,
            first.base.in_features,
            specs,
            tuple(c.base.out_features for c in calls),
            tuple(c.lora_a.shape[0] for c in calls),
            tuple(c.scaling for c in calls),
            first.p,
            first.fused_dropout_backward,
            first.fused_dropout_forward,
        )


def find_projection_groups(model: nn.Module) -> list[ProjectionGroup]:
    """The :data:`GROUPS` of INT4 LoRA layers in ``model`` (every module whose children include all of a group's
    names as ``Int4LoraLinear`` layers of one input width)."""
    groups = []
    for module in model.modules():
        for names in GROUPS:
            members = [getattr(module, name, None) for name in names]
            if all(isinstance(m, Int4LoraLinear) for m in members):
                widths = {m.get_base_layer().in_features for m in members}
                if len(widths) == 1:
                    groups.append(ProjectionGroup(members))
    return groups
