"""``Int4Experts``: a mixture-of-experts block's experts with INT4 weights, in transformers 5's fused layout.

transformers 5 keeps a MoE layer's experts as one module holding ``gate_up_proj`` ``[E, 2I, H]`` (gate rows first,
then up) and ``down_proj`` ``[E, H, I]``, called as ``experts(hidden_states [T, H], top_k_index [T, K],
top_k_weights [T, K]) -> [T, H]`` by the model's own sparse-MoE block (router, top-k, shared expert stay
transformers'). :class:`Int4Experts` takes its place with the same call and the same math, holding the weights as
INT4 stacks (:class:`~int4lora_train.quant.experts.Int4ExpertStack`): packed uint8 ``[E, out, in/2]``, scales
``[E, out, G]``, optional int8 zero points. No dense copy of an expert is ever kept.

::

    (token, slot) pairs sorted by expert (stable)      x_s = hidden_states[token]               [T*K, H]
    gate_up = grouped(x_s, gate_up stack)              one dequantization of the USED experts    [T*K, 2I]
    h = act(gate) * up                                                                          [T*K, I]
    y = grouped(h, down stack) * top_k_weight                                                   [T*K, H]
    out = zeros[T, H].index_add_(0, token, y)          each token's experts summed in expert order

``grouped`` is :class:`Int4ExpertsLinearFunction`: it dequantizes the experts that received tokens (at most
``max_dense_experts`` at a time, one grouped launch each on the Triton path) into a ``[n, out, in]`` temporary,
multiplies each expert's contiguous rows, and saves for backward only the packed stacks (references, no copies)
and the routing (the expert ids and their row counts). Backward dequantizes again for ``grad_x = grad_y @ W_e``;
no weight gradient exists (the base is frozen and has no weight parameter).

Optional per-expert LoRA (``lora``: :class:`ExpertLora`) adds ``s * (x @ A_e.T) @ B_e.T`` to each projection with
``A_gate``, ``A_up [E, r, H]``, ``B_gate``, ``B_up [E, I, r]``, ``A_down [E, r, I]``, ``B_down [E, H, r]`` (plain autograd
through the segment matmuls). The PEFT layer that owns those parameters is
:class:`int4lora_train.modeling.expert_lora.Int4ExpertsLora`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from int4lora_train.errors import Int4FormatError, UnsupportedFormatError
from int4lora_train.quant.experts import Int4ExpertStack, dequantize_experts
from int4lora_train.quant.layout import Int4Weight

logger = logging.getLogger(__name__)

STACKS = ("gate_up", "down")
"""The two projections of every expert, by the prefix of their buffers (transformers' ``gate_up_proj`` /
``down_proj``)."""


@dataclass(frozen=True)
class _GroupedSpec:
    """The non-tensor half of a grouped projection, passed through autograd."""

    dtype: torch.dtype
    in_features: int
    group_size: int
    counts: tuple[int, ...]  # rows per used expert, in the order of the ids
    backend: str | None
    max_dense_experts: int

    def chunks(self):
        """``(first expert slot, end slot, first row)`` per dequantization chunk of ``max_dense_experts`` experts."""
        row = 0
        for start in range(0, len(self.counts), self.max_dense_experts):
            stop = min(start + self.max_dense_experts, len(self.counts))
            yield start, stop, row
            row += sum(self.counts[start:stop])


def _stack(packed, scales, zero_points, spec: _GroupedSpec) -> Int4ExpertStack:
    return Int4ExpertStack(packed, scales, spec.in_features, spec.group_size, zero_points)


def _grouped_matmul(x, stack, ids, spec: _GroupedSpec, transpose: bool) -> torch.Tensor:
    """``x @ W_e.T`` (or ``x @ W_e`` with ``transpose=False``) for each used expert's contiguous rows of ``x``."""
    out_features = stack.out_features if transpose else stack.in_features
    out = x.new_empty(x.shape[0], out_features)
    for start, stop, row in spec.chunks():
        dense = dequantize_experts(stack, ids[start:stop], spec.dtype, backend=spec.backend)
        first = row
        for slot, count in enumerate(spec.counts[start:stop]):
            if count:
                weight = dense[slot].T if transpose else dense[slot]
                torch.matmul(x[first : first + count], weight, out=out[first : first + count])
            first += count
    return out


class Int4ExpertsLinearFunction(torch.autograd.Function):
    """``y[rows of e] = x[rows of e] @ W_e.T`` over tokens sorted by expert, saving only packed tensors + routing."""

    @staticmethod
    def forward(ctx, x, packed, scales, zero_points, ids, spec: _GroupedSpec):
        stack = _stack(packed, scales, zero_points, spec)
        ctx.save_for_backward(packed, scales, zero_points, ids)
        ctx.spec = spec
        return _grouped_matmul(x, stack, ids, spec, transpose=True)

    @staticmethod
    def backward(ctx, grad_output):
        grad_x = None
        if ctx.needs_input_grad[0]:
            packed, scales, zero_points, ids = ctx.saved_tensors
            stack = _stack(packed, scales, zero_points, ctx.spec)
            grad_x = _grouped_matmul(grad_output.to(ctx.spec.dtype), stack, ids, ctx.spec, transpose=False)
        return grad_x, None, None, None, None, None


@dataclass(frozen=True)
class ExpertLora:
    """One adapter's per-expert LoRA tensors (see the module docstring), its scaling and input dropout. Gate and up
    have their own A and B, as in checkpoints and vLLM's per-expert adapters."""

    gate_A: torch.Tensor  # [E, r, H]
    gate_B: torch.Tensor  # [E, I, r]
    up_A: torch.Tensor  # [E, r, H]
    up_B: torch.Tensor  # [E, I, r]
    down_A: torch.Tensor  # [E, r, I]
    down_B: torch.Tensor  # [E, H, r]
    scaling: float
    dropout: object = None


def _segment_lora(x, lora_A, lora_B, ids_list, counts, scaling, dtype) -> torch.Tensor:
    """``s * (x_e @ A_e.T) @ B_e.T`` per used expert's rows, concatenated (autograd reaches A and B)."""
    parts, first = [], 0
    for expert, count in zip(ids_list, counts):
        rows = x[first : first + count]
        first += count
        parts.append((rows @ lora_A[expert].to(dtype).T) @ lora_B[expert].to(dtype).T)
    return torch.cat(parts) * scaling


class Int4Experts(nn.Module):
    """INT4 experts with transformers 5's experts call (see the module docstring).

    Buffers: ``gate_up_packed`` uint8 ``[E, 2I, H/2]``, ``gate_up_scales`` ``[E, 2I, G_h]``, ``gate_up_zero_points``
    (or None), ``down_packed`` ``[E, H, I/2]``, ``down_scales``, ``down_zero_points``. ``act_fn`` is the replaced
    module's activation. ``max_dense_experts`` bounds how many experts' dense weights one projection dequantizes at
    once (the temporary is ``max_dense_experts * out * in`` elements; default: all used experts at once).
    """

    def __init__(
        self,
        gate_up: Int4ExpertStack,
        down: Int4ExpertStack,
        act_fn,
        compute_dtype: torch.dtype | None = None,
        backend: str | None = None,
        max_dense_experts: int | None = None,
        name: str = "experts",
        projection_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
    ) -> None:
        super().__init__()
        if gate_up.num_experts != down.num_experts:
            raise Int4FormatError(f"{name}: gate_up has {gate_up.num_experts} experts but down has {down.num_experts}.")
        if gate_up.out_features % 2 or down.in_features != gate_up.out_features // 2:
            raise Int4FormatError(
                f"{name}: gate_up is [{gate_up.out_features}, {gate_up.in_features}] and down "
                f"[{down.out_features}, {down.in_features}] per expert; expected [2I, H] and [H, I]."
            )
        if down.out_features != gate_up.in_features:
            raise Int4FormatError(
                f"{name}: down's output ({down.out_features}) must equal gate_up's input "
                f"({gate_up.in_features}), the hidden size."
            )
        self.num_experts = gate_up.num_experts
        self.hidden_dim = gate_up.in_features
        self.intermediate_dim = down.in_features
        self.act_fn = act_fn
        self.compute_dtype = compute_dtype
        self.backend = backend
        self.max_dense_experts = max_dense_experts
        self.projection_names = tuple(projection_names)
        """Per-expert (gate, up, down) names in checkpoints and adapters (Mixtral: w1, w3, w2)."""
        self.group_sizes = {"gate_up": gate_up.group_size, "down": down.group_size}
        for prefix, stack in (("gate_up", gate_up), ("down", down)):
            self.register_buffer(f"{prefix}_packed", stack.packed)
            self.register_buffer(f"{prefix}_scales", stack.scales)
            self.register_buffer(f"{prefix}_zero_points", stack.zero_points)

    # ------------------------------------------------------------------------------------------------ weights

    def stack(self, prefix: str) -> Int4ExpertStack:
        """The ``"gate_up"`` or ``"down"`` stack (views of the buffers)."""
        if prefix not in STACKS:
            raise UnsupportedFormatError(f"Int4Experts has stacks {list(STACKS)}, not {prefix!r}.")
        in_features = self.hidden_dim if prefix == "gate_up" else self.intermediate_dim
        return Int4ExpertStack(
            self._buffers[f"{prefix}_packed"],
            self._buffers[f"{prefix}_scales"],
            in_features,
            self.group_sizes[prefix],
            self._buffers[f"{prefix}_zero_points"],
        )

    def expert_int4_weights(self):
        """``(expert, projection name, Int4Weight)`` for every expert's gate, up and down projection, as the
        checkpoint stores them per expert (views of the stacks, no copy): what the base's fingerprint hashes."""
        gate, up, down = self.projection_names
        gate_up, down_stack = self.stack("gate_up"), self.stack("down")
        rows = self.intermediate_dim
        for e in range(self.num_experts):
            both = gate_up.expert(e)
            for proj, part in ((gate, slice(0, rows)), (up, slice(rows, 2 * rows))):
                zero_points = None if both.zero_points is None else both.zero_points[part]
                yield e, proj, Int4Weight(both.packed[part], both.scales[part], both.in_features, both.group_size,
                                          zero_points)  # fmt: skip
            yield e, down, down_stack.expert(e)

    def dequantize(self, prefix: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """All experts' dense ``[E, out, in]`` weight of ``prefix`` (transformers' ``gate_up_proj`` / ``down_proj``):
        needs the dense memory, for references and debugging only."""
        stack = self.stack(prefix)
        ids = torch.arange(self.num_experts, device=stack.device)
        return dequantize_experts(stack, ids, dtype, backend=self.backend)

    @property
    def qweight(self) -> torch.Tensor:
        """The gate/up packed stack, under the name PEFT looks up to find a quantized layer's device."""
        return self.gate_up_packed

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    # ------------------------------------------------------------------------------------------------ forward

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return self.forward_with_lora(hidden_states, top_k_index, top_k_weights, None)

    def forward_with_lora(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        lora: ExpertLora | None,
    ) -> torch.Tensor:
        """The experts' output ``[T, H]``, with the per-expert LoRA ``lora`` added to both projections when given."""
        if torch.is_autocast_enabled(hidden_states.device.type):
            dtype = torch.get_autocast_dtype(hidden_states.device.type)
        else:
            dtype = self.compute_dtype or hidden_states.dtype
        top_k = top_k_index.shape[-1]
        with torch.no_grad():
            flat = top_k_index.reshape(-1)
            order = torch.argsort(flat, stable=True)
            sorted_experts = flat[order]
            # Index num_experts marks a slot routed to no local expert (transformers skips it too).
            valid = sorted_experts < self.num_experts
            order, sorted_experts = order[valid], sorted_experts[valid]
            counts_all = torch.bincount(sorted_experts, minlength=self.num_experts)
            ids = counts_all.nonzero().reshape(-1)
            counts = tuple(counts_all[ids].tolist())
            token = order // top_k
        final = torch.zeros_like(hidden_states)
        if not counts:
            return final
        x = hidden_states[token].to(dtype)
        ids_list = ids.tolist()
        chunk = self.max_dense_experts or len(counts)
        gate_up, down = self.stack("gate_up"), self.stack("down")
        spec_gu = _GroupedSpec(dtype, self.hidden_dim, gate_up.group_size, counts, self.backend, chunk)
        spec_down = _GroupedSpec(dtype, self.intermediate_dim, down.group_size, counts, self.backend, chunk)
        projected = Int4ExpertsLinearFunction.apply(
            x, gate_up.packed, gate_up.scales, gate_up.zero_points, ids, spec_gu
        )
        if lora is not None:
            xd = lora.dropout(x) if lora.dropout is not None else x
            delta = [
                _segment_lora(xd, a, b, ids_list, counts, lora.scaling, dtype)
                for a, b in ((lora.gate_A, lora.gate_B), (lora.up_A, lora.up_B))
            ]
            projected = projected + torch.cat(delta, dim=-1)
        gate, up = projected.chunk(2, dim=-1)
        h = self.act_fn(gate) * up
        y = Int4ExpertsLinearFunction.apply(h, down.packed, down.scales, down.zero_points, ids, spec_down)
        if lora is not None:
            hd = lora.dropout(h) if lora.dropout is not None else h
            y = y + _segment_lora(hd, lora.down_A, lora.down_B, ids_list, counts, lora.scaling, dtype)
        weights = top_k_weights.reshape(-1)[order]
        y = y * weights[:, None].to(y.dtype)
        return final.index_add(0, token, y.to(final.dtype))

    def extra_repr(self) -> str:
        sym = "sym" if self.gate_up_zero_points is None else "asym"
        return (
            f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, intermediate_dim={self.intermediate_dim}, "
            f"group_size={self.group_sizes}, {sym}, scales={str(self.gate_up_scales.dtype).removeprefix('torch.')}"
        )


def is_fused_experts_module(module: nn.Module) -> bool:
    """A transformers 5 experts module: 3-D ``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``
    parameters (dense, or on the meta device in a loader skeleton)."""
    gate_up = module._parameters.get("gate_up_proj") if hasattr(module, "_parameters") else None
    down = module._parameters.get("down_proj") if hasattr(module, "_parameters") else None
    return (
        isinstance(gate_up, torch.Tensor)
        and isinstance(down, torch.Tensor)
        and gate_up.dim() == 3
        and down.dim() == 3
        and hasattr(module, "act_fn")
    )


def dense_experts_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gate_up [E, 2I, H], down [E, H, I])`` of a dense transformers experts module or an :class:`Int4Experts`
    (dequantized in the scales' dtype)."""
    if isinstance(module, Int4Experts):
        return module.dequantize("gate_up"), module.dequantize("down")
    return module.gate_up_proj.detach(), module.down_proj.detach()
