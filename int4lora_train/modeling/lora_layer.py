"""PEFT's LoRA layer on :class:`Int4Linear`: what it accepts, and its forward as one autograd node.

::

    y = Int4Linear(x) + lora_B(lora_A(dropout(x))) * scaling        scaling = alpha / r   (rsLoRA: alpha / sqrt(r))
        \\_ frozen INT4 base, no weight gradient _/  \\_ trainable, fp32 by default (PEFT's autocast_adapter_dtype) _/

:class:`Int4LoraLinear` follows PEFT's quantized-layer pattern (``gptq.py`` / ``awq.py``): the INT4 module stays
``base_layer``, adapter parameters live in ``lora_A`` / ``lora_B`` ``ModuleDict``\\ s keyed by adapter name, so the
saved keys are exactly a dense model's (``...q_proj.lora_A.weight``) and vLLM parses them. How PEFT finds the layer
is :mod:`int4lora_train.modeling.peft_integration`'s business.

Refused with :class:`UnsupportedFormatError` (they read or rewrite the dense base weight, or vLLM cannot serve them):
DoRA and other LoRA variants, merging / unmerging into the INT4 base (export a merged model instead), ``lora_bias``,
and initialisations computed from the base weight (PiSSA, OLoRA, CorDA, LoftQ, MiCA, orthogonal, LoRA-GA).

With one active plain adapter the forward is one autograd node, :class:`Int4LoraFunction` (base matmul, LoRA path
and dropout fused, fewer passes over memory)::

    forward:  W  = dequantize(packed)                       [out, in]  temporary in the compute dtype c
              y  = x @ W.T (+ bias)                          [T, out]
              xd = x * mask / (1 - p)                        only with dropout (mask: bool, drawn here)
              xa = xd @ A_c.T                                [T, r]   (fused_dropout_forward: mask and xa in one
                                                                      Triton pass, no xd; dropped_projection)
              y += s * xa @ B_c.T                            in place (addmm): one rounding, no [T, out] temporaries
    saved:    x (the input itself, no copy), xa [T, r], the bool mask, A, B, and the packed weight (or the dense W
              inside a checkpoint recompute, see ``int4_linear.dense_save_is_transient``)
    backward: gs = s * (g @ B_c)                             [T, r]
              grad_x = g @ W + gs @ A_c    (dropout: + (gs @ A_c) * mask / (1 - p); with
                                            fused_dropout_backward one Triton pass, kernels/lora_dropout.py)
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

The fused node runs when :func:`fused_lora_applies`; anything else (several active adapters, disabled adapters,
mixed-batch ``adapter_names``, a compute dtype that differs from the adapters' outside autocast, ``fused_lora =
False`` on the layer) takes PEFT's generic path. :mod:`int4lora_train.speed` switches it per model, and can join
sibling projections into one node (:mod:`int4lora_train.speed.projection_groups`, through the layer's
``lora_group``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from int4lora_train.errors import UnsupportedFormatError
from int4lora_train.kernels.backend import use_triton
from int4lora_train.modeling.int4_linear import (
    Int4Linear,
    _WeightSpec,
    in_dtype,
    lean_forward_weight,
    save_weight_tensors,
    saved_dense_weight,
)

SUPPORTED_INITS = (True, False, "gaussian")
"""``init_lora_weights`` values that do not need the dense base weight."""


class Int4LoraLinear(nn.Module, LoraLayer):
    """LoRA around an :class:`Int4Linear` base: ``base(x) + lora_B(lora_A(dropout(x))) * scaling``.

    With one active adapter the forward is one fused autograd node (:class:`Int4LoraFunction`; ``fused_lora = False``
    on the layer, or ``int4lora_train.speed.apply(model, fused_lora=False)``, switches it off); otherwise PEFT's
    generic path. ``fused_dropout_backward`` / ``fused_dropout_forward``: with LoRA dropout, the fused nodes run the
    dropout's backward / its forward with the ``A`` projection through the one-pass Triton kernels of
    :mod:`int4lora_train.kernels.lora_dropout` (CUDA; set by ``int4lora_train.speed.apply``, which turns the backward
    on and the forward off by default; False on a layer it has not seen). ``lora_group``: an object whose
    ``forward_member(layer, x, call)`` computes this layer's output together with its siblings' (or returns None);
    :mod:`int4lora_train.speed.projection_groups` sets it.
    """

    fused_lora: bool = True
    fused_dropout_backward: bool = False
    fused_dropout_forward: bool = False
    lora_group = None

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        check_lora_config(config, where=kwargs.get("target_name") or type(base_layer).__name__)
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        # PEFT's generic lookup reads module.weight for nn.Linear; Int4Linear has none.
        return module.in_features, module.out_features

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        # Also the entry point for a second adapter on an existing layer, so the config is checked here too.
        check_lora_config(config, where=kwargs.get("target_name") or "Int4LoraLinear")
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any) -> None:
        requested = requested_variants(config)
        if requested:
            raise UnsupportedFormatError(_variant_message(requested))
        return None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        call = fused_lora_applies(self, x, args, kwargs)
        if call is not None:
            if self.lora_group is not None:
                out = self.lora_group.forward_member(self, x, call)
                if out is not None:
                    return out
            return fused_lora_forward(self, x, call)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for active_adapter in self.active_adapters:
            if active_adapter not in self.lora_A.keys():
                continue
            lora_A = self.lora_A[active_adapter]
            lora_B = self.lora_B[active_adapter]
            dropout = self.lora_dropout[active_adapter]
            x = self._cast_input_dtype(x, lora_A.weight.dtype)
            result = result + lora_B(lora_A(dropout(x))) * self.scaling[active_adapter]
        return result.to(result_dtype)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The dense ``[out, in]`` update ``B @ A * scaling`` (fp32), for merged exports; the base is not touched."""
        weight_a = self.lora_A[adapter].weight.float()
        weight_b = self.lora_B[adapter].weight.float()
        return (weight_b @ weight_a) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise UnsupportedFormatError(
            "merging LoRA into an INT4 base is not supported: the sum is not INT4 and re-quantizing it would change "
            "the weights vLLM serves. Keep the adapter separate, or use int4lora_train's merged export (dense bf16 "
            "or re-quantized W4A16)."
        )

    def unmerge(self) -> None:
        raise UnsupportedFormatError("unmerge: LoRA is never merged into an INT4 base (see merge).")

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


# ------------------------------------------------------------------------------------------------ config checks


def requested_variants(config: LoraConfig) -> list[str]:
    """The LoRA variants ``config`` asks for (DoRA, VeLoRA, aLoRA, ...), as PEFT detects them, by field name."""
    requested = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name, None)
        if f.name == "init_lora_weights":
            continue
        if f.metadata.get("is_lora_variant") and value:
            requested.append(f.name)
    for name in ("use_dora", "use_qalora"):  # older PEFT without the metadata; QA-LoRA is GPTQ-only, untagged
        if getattr(config, name, False) and name not in requested:
            requested.append(name)
    return requested


def check_lora_config(config: LoraConfig, where: str = "Int4Linear") -> None:
    """Raise :class:`UnsupportedFormatError` for options that cannot work on an INT4 base (see the module doc)."""
    variants = requested_variants(config)
    if variants:
        raise UnsupportedFormatError(f"{where}: {_variant_message(variants)}")
    if config.lora_bias:
        raise UnsupportedFormatError(
            f"{where}: lora_bias=True is not supported on an INT4 base (it could only be merged into a dense bias, "
            "and vLLM rejects LoRA biases); set lora_bias=False."
        )
    init = config.init_lora_weights
    if not any(init is allowed or (isinstance(init, str) and init == allowed) for allowed in SUPPORTED_INITS):
        raise UnsupportedFormatError(
            f"{where}: init_lora_weights={init!r} computes the adapter from the dense base weight (or is untested "
            f"on INT4 bases); use one of {list(SUPPORTED_INITS)}."
        )


def _variant_message(variants: list[str]) -> str:
    return (
        f"LoRA variant(s) {variants} are not supported on an INT4 base: DoRA and the other variants read or "
        "rewrite the dense base weight, and vLLM serves only plain LoRA. Use plain LoRA (e.g. use_dora=False); "
        "rsLoRA (use_rslora=True) is fine."
    )


# ------------------------------------------------------------------------------------------------ the fused node


def dropout_with_mask(x2: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dropout(x2), keep_mask)`` in one fused kernel (``torch.native_dropout``: each element kept with probability
    ``1 - p`` and scaled by ``1 / (1 - p)``, one rounding), or ``(x2, None)`` without dropout.

    Drawn from the default generator, so gradient checkpointing's RNG-state restore redraws the same mask in the
    recompute. The bool mask is one byte per element (PEFT's ``nn.Dropout`` saves a scaled copy of the input, two
    bytes in bf16).
    """
    if p <= 0:
        return x2, None
    return torch.native_dropout(x2, p, True)


def dropped_projection(
    x2: torch.Tensor, a_cat: torch.Tensor, ranks: Sequence[int], p: float, fused: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(xa, masks)``: each member's LoRA dropout of ``x2`` ``[T, in]`` and its ``A`` projection, ``xa = [dropout_i(x2)
    @ A_i.T, ...]`` ``[T, R]`` (``a_cat`` ``[R, in]``: the members' ``A`` by rows, ranks ``ranks``), and the members'
    bool keep masks (none without dropout).

    The torch path draws each member's mask with :func:`dropout_with_mask` in member order (as separate projections
    called in that order would) and multiplies the dropped copy. With ``fused`` (``fused_dropout_forward`` on the
    layer), where :func:`~int4lora_train.kernels.backend.use_triton` allows it and ``in`` is a multiple of 4, one
    Triton pass (:func:`int4lora_train.kernels.lora_dropout.dropped_lora_projection`) reads ``x2`` once for all
    members, writes the masks and accumulates the products, with no dropped copy: its masks come from its own
    Philox stream (redrawn alike by a checkpoint's recompute), not ``native_dropout``'s."""
    if p <= 0:
        return x2 @ a_cat.t(), []
    if fused and x2.shape[-1] % 4 == 0 and use_triton(x2.device):
        from int4lora_train.kernels import lora_dropout

        return lora_dropout.dropped_lora_projection(x2, a_cat, ranks, p)
    masks, parts = [], []
    for a in a_cat.split(list(ranks)):
        xd, mask = dropout_with_mask(x2, p)
        masks.append(mask)
        parts.append(xd @ a.t())
        del xd  # recomputed from x2 and the mask in backward
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), masks


def add_dropped_lora_grad_x_torch(
    grad_x: torch.Tensor,
    gs: torch.Tensor,
    a_cat: torch.Tensor,
    masks: Sequence[torch.Tensor],
    ranks: Sequence[int],
    scale: float,
) -> torch.Tensor:
    """``grad_x += sum_i dropout_backward(gs_i @ a_i, masks[i]) * scale`` in place, member by member, with torch
    ops (each product, dropout and sum rounded to the dtype): the reference of
    :func:`int4lora_train.kernels.lora_dropout.add_dropped_lora_grad_x` and the path without it."""
    for gs_i, a_i, mask in zip(gs.split(list(ranks), dim=1), a_cat.split(list(ranks)), masks):
        grad_x.add_(torch.ops.aten.native_dropout_backward(gs_i @ a_i, mask, scale))
    return grad_x


def dropped_lora_grad_a_torch(
    x2: torch.Tensor, gs: torch.Tensor, masks: Sequence[torch.Tensor], ranks: Sequence[int], scale: float
) -> list[torch.Tensor]:
    """``[gs_i.T @ dropout(x2, masks[i]) for each member]`` with torch ops, in ``x2``'s dtype (a dropped copy of
    ``x2`` per member, rounded): the reference of :func:`int4lora_train.kernels.lora_dropout.dropped_lora_grad_a`
    (which returns fp32) and the path without it."""
    return [
        gs_i.t() @ torch.ops.aten.native_dropout_backward(x2, mask, scale)
        for gs_i, mask in zip(gs.split(list(ranks), dim=1), masks)
    ]


def dropout_backward_kernels(fused: bool, device: torch.device) -> tuple[Callable, Callable]:
    """``(add_dropped_lora_grad_x, dropped_lora_grad_a)``: the Triton kernels of
    :mod:`int4lora_train.kernels.lora_dropout` when ``fused`` (``fused_dropout_backward`` on the layer) and
    :func:`~int4lora_train.kernels.backend.use_triton` says so for ``device``; else the torch references (today's
    arithmetic, bit for bit)."""
    if fused and use_triton(device):
        from int4lora_train.kernels import lora_dropout

        return lora_dropout.add_dropped_lora_grad_x, lora_dropout.dropped_lora_grad_a
    return add_dropped_lora_grad_x_torch, dropped_lora_grad_a_torch


def add_projection_grad_x(
    grad_x: torch.Tensor,
    gs: torch.Tensor,
    a_cat: torch.Tensor,
    masks: Sequence[torch.Tensor],
    ranks: Sequence[int],
    p: float,
    fused: bool = False,
) -> torch.Tensor:
    """:func:`dropped_projection`'s input gradient added into ``grad_x`` ``[T, in]`` in place (and returned), from
    ``gs`` ``[T, R]``, the gradient of its ``xa``: ``gs @ a_cat`` without dropout (no masks), else each member's
    ``gs_i @ A_i`` through its mask, times ``1 / (1 - p)``, by the pair :func:`dropout_backward_kernels` picks
    (``fused``: ``fused_dropout_backward``)."""
    if not masks:
        return grad_x.addmm_(gs, a_cat)
    add_grad_x, _ = dropout_backward_kernels(fused, grad_x.device)
    return add_grad_x(grad_x, gs, a_cat, masks, ranks, 1.0 / (1.0 - p))


def projection_grad_a(
    x2: torch.Tensor,
    gs: torch.Tensor,
    masks: Sequence[torch.Tensor],
    ranks: Sequence[int],
    p: float,
    fused: bool = False,
) -> Sequence[torch.Tensor]:
    """:func:`dropped_projection`'s gradient of each member's ``A``, ``[r_i, in]`` each (not yet in the adapter's
    dtype): ``gs_i.T @ x2``, through the member's mask and times ``1 / (1 - p)`` with dropout (masks given)."""
    if not masks:
        return (gs.t() @ x2).split(list(ranks))
    _, grad_a_of = dropout_backward_kernels(fused, x2.device)
    return grad_a_of(x2, gs, masks, ranks, 1.0 / (1.0 - p))


_reused: dict | None = None
"""While :func:`reuse_adapter_weights` runs: ``key -> (the sources' storages, their _version, derived value)``."""


@contextlib.contextmanager
def reuse_adapter_weights() -> Iterator[None]:
    """Within this block each adapter weight is brought into the compute dtype once and reused
    (:func:`derived_adapter_weight`); on exit the copies are dropped. Nested blocks share the outermost one's.

    Why: with fp32 adapters under bf16 autocast every fused node casts ``A`` and ``B`` (a projection group also
    stacks its ``A`` matrices and builds its block-diagonal ``B``) in the forward, again in the checkpoint recompute
    and again in backward. Made once per step instead, the recompute and backward of a decoder layer run 27 fewer of
    their ~180 operations (``benchmarks/op_count.py``: 260 -> 233 per layer and step), each a kernel launch in a
    host-bound step. Reusing them changes no value (the same tensors, computed once).

    Why a block and not a cache that lives with the weights: a weight's ``_version`` is not a reliable sign of a
    change (``torch.optim.AdamW(fused=True)`` and writes through ``.data`` leave it as it is), so a copy may only
    outlive a code path that is known not to change the weights. The trainer opens this around the forward and
    backward passes of one optimizer step (no weight changes there; the optimizer runs after it), except under FSDP,
    whose per-forward all-gathered adapters would be copied whole on every process. Everywhere else nothing is
    reused. Within the block a copy still is rebuilt when its source is another tensor, moved, or written in place.

    Memory, held until the block ends: for each fused projection, ``A`` and ``B`` in the compute dtype (``(r * in +
    out * r) * 2`` bytes in bf16, half their fp32 size); for a projection group its concatenated ``A`` (the same
    bytes as the members' ``A``) and block-diagonal ``B`` (``sum(out) * sum(r) * 2`` bytes: for q/k/v of the
    Llama-3.1-8B shape at r 16, 0.6 MB; gate/up 1.8 MB). About 4 MB per decoder layer of that shape (128 MB for
    its 32 layers).
    """
    global _reused
    if _reused is not None:
        yield
        return
    _reused = {}
    try:
        yield
    finally:
        _reused = None


@contextlib.contextmanager
def no_adapter_reuse() -> Iterator[None]:
    """Within this block nothing is reused, even inside :func:`reuse_adapter_weights`: a CUDA graph capture must
    neither read a copy made outside it nor leave one of its own (memory of its pool) behind."""
    global _reused
    outer, _reused = _reused, None
    try:
        yield
    finally:
        _reused = outer


def derived_adapter_weight(kind: tuple, sources: tuple, build: Callable[[], Any]) -> Any:
    """``build()``, a value of kind ``kind`` computed from the tensors ``sources`` alone; inside
    :func:`reuse_adapter_weights` the one built earlier when ``sources`` are the same data: the same memory (address,
    shape, strides, dtype, device) not written since (``_version``).

    Not the same Python objects: a checkpoint hands backward the weights it saved as other tensor objects viewing
    them. The block holds the storages of the sources it built from (not only the tensors: ``weight.data = ...``
    gives a tensor other memory and would free the old one), so no other tensor gets their address while it runs.
    """
    reused = _reused
    if reused is None:
        return build()
    key = (kind, *[(t.data_ptr(), t.shape, t.stride(), t.dtype, t.device) for t in sources])
    versions = [t._version for t in sources]
    held = reused.get(key)
    if held is not None and held[1] == versions:
        return held[2]
    value = build()
    reused[key] = ([t.untyped_storage() for t in sources], versions, value)
    return value


def adapter_in(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight.to(dtype)``, reused inside :func:`reuse_adapter_weights`."""
    if weight.dtype == dtype:
        return weight
    return derived_adapter_weight(("cast", dtype), (weight,), lambda: weight.to(dtype))


class Int4LoraFunction(torch.autograd.Function):
    """``x @ dequantize(W).T + bias + s * dropout(x) @ A.T @ B.T`` as one node (see the module docstring).

    ``x`` and ``bias`` arrive in the compute dtype; ``lora_a`` ``[r, in]`` and ``lora_b`` ``[out, r]`` in their own
    dtype (fp32 with PEFT's default), cast to the compute dtype here (:func:`adapter_in`) so their gradients return
    in their own dtype.
    """

    @staticmethod
    def forward(
        ctx,
        x,
        lora_a,
        lora_b,
        bias,
        packed,
        scales,
        zero_points,
        g_idx,
        spec: _WeightSpec,
        scaling,
        p,
        fused_dropout_backward=False,
        fused_dropout_forward=False,
    ):
        dtype = spec.dtype
        in_features, out_features = lora_a.shape[1], lora_b.shape[0]
        x2 = x.reshape(-1, in_features)  # [T, in], a view for contiguous inputs
        needs, buffers = ctx.needs_input_grad, (packed, scales, zero_points, g_idx)
        weight, skip = lean_forward_weight(spec, buffers, needs[0])  # [out, in] (None: not needed)
        a_c, b_c = adapter_in(lora_a, dtype), adapter_in(lora_b, dtype)
        # A recompute's output that nothing reads stays uncomputed; what backward needs (x2, xa, mask) is not.
        y = x2.new_empty(x2.shape[0], out_features) if skip else F.linear(x2, weight, bias)  # [T, out]
        xa, masks = dropped_projection(x2, a_c, (a_c.shape[0],), p, fused_dropout_forward)  # [T, r]
        mask = masks[0] if masks else None
        if not skip:
            y.addmm_(xa, b_c.t(), alpha=scaling)
        save_weight_tensors(ctx, weight, buffers, spec, needs[0], x2, xa, mask, lora_a, lora_b)
        ctx.scaling, ctx.p, ctx.x_shape = scaling, p, x.shape
        ctx.fused_dropout_backward = fused_dropout_backward
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
            a_c, b_c = adapter_in(lora_a, dtype), adapter_in(lora_b, dtype)
            gs = (g @ b_c).mul_(s)  # [T, r]
            masks, ranks, fused = ([] if mask is None else [mask]), (a_c.shape[0],), ctx.fused_dropout_backward
            if need_x:
                grad_x = g @ saved_dense_weight(ctx, saved)  # [T, in]
                add_projection_grad_x(grad_x, gs, a_c, masks, ranks, p, fused)
                grad_x = grad_x.reshape(ctx.x_shape)
            if need_a:
                grad_a = projection_grad_a(x2, gs, masks, ranks, p, fused)[0].to(lora_a.dtype)  # [r, in]
        if need_b:
            grad_b = (g.t() @ xa).to(lora_b.dtype).mul_(s)  # [out, r]
        if need_bias:
            grad_bias = g.sum(0)
        return grad_x, grad_a, grad_b, grad_bias, None, None, None, None, None, None, None, None, None


class FusedCall(NamedTuple):
    """What one fused forward of an ``Int4LoraLinear`` needs, looked up once per call (see
    :func:`fused_lora_applies`): the adapter, the INT4 base, the adapter weights, dropout probability, dtypes.

    A named tuple, not a frozen dataclass: one is made on every projection call, and a frozen dataclass's
    ``__init__`` (``object.__setattr__`` per field) costs five times as much host time."""

    adapter: str
    base: Int4Linear
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    p: float
    dtype: torch.dtype
    autocast: bool
    scaling: float
    fused_dropout_backward: bool = False
    fused_dropout_forward: bool = False


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
    fused_backward, fused_forward = p > 0 and layer.fused_dropout_backward, p > 0 and layer.fused_dropout_forward
    return FusedCall(name, base, a, b, p, dtype, autocast, float(layer.scaling[name]), fused_backward, fused_forward)


def fused_lora_forward(layer: Any, x: torch.Tensor, call: FusedCall) -> torch.Tensor:
    """The fused forward of ``layer`` (an ``Int4LoraLinear``) as ``call`` describes; same result dtype as PEFT's."""
    base, dtype = call.base, call.dtype
    out = Int4LoraFunction.apply(
        in_dtype(x, dtype),
        call.lora_a,
        call.lora_b,
        in_dtype(base._parameters.get("bias"), dtype),
        *base.int4_tensors(),
        base.weight_spec(dtype),
        call.scaling,
        call.p,
        call.fused_dropout_backward,
        call.fused_dropout_forward,
    )
    return out if call.autocast else in_dtype(out, x.dtype)
