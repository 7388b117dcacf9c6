"""``Int4Linear``: a frozen linear layer whose weight stays INT4, dequantized into a temporary on every use.

::

    forward:   W = dequantize(packed, scales, zero_points, g_idx)      [out, in] temporary, compute dtype
               y = x @ W.T + bias                                      saved for backward: the packed buffers only
    backward:  W = dequantize(...) again
               grad_x = grad_y @ W                                     no grad_W: the base is frozen, it has no
               grad_bias = sum(grad_y)   (only if the bias trains)     weight parameter at all

Peak memory per layer is one dense temporary (the size of the weight in the compute dtype), which lives only during
the matmul. In *cache* mode the dense weight comes from the unpacker's budgeted LRU cache instead, which trades
memory (the budget) for the dequantization time.

Under gradient checkpointing a layer is dequantized three times per step (forward, recompute, backward). The
recompute runs inside the backward pass, right before the backward of the same layer, so there the dense weight is
saved for backward instead of the packed buffers (``keep_dense_for_backward``, default on): two dequantizations
instead of three, for the memory of one checkpointed block's dense weights while its backward runs. See
:func:`dense_save_is_transient` for how that moment is recognised; everywhere else only the packed buffers are saved.

The compute dtype is the autocast dtype under ``torch.autocast``, else ``compute_dtype`` when given, else the input's
dtype; without autocast the output has the input's dtype, like ``nn.Linear``.

``Int4Linear`` subclasses ``nn.Linear`` (without calling its constructor) so that everything that selects linear
layers by type (PEFT's ``target_modules="all-linear"``, training scripts' ``find_all_linear_names``) finds it. It has
no ``weight`` parameter: asking for one raises :class:`DenseWeightUnavailableError`, which says what to do instead.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from int4lora_train.errors import Int4FormatError, UnsupportedFormatError
from int4lora_train.quant.dequant import dequantize
from int4lora_train.quant.layout import Int4Weight

logger = logging.getLogger(__name__)

MODES = ("on_the_fly", "cache")
_TRANSIENT_ATTRIBUTES = ("_dequant_plans",)


def dense_save_is_transient() -> bool:
    """Whether a tensor saved for backward *now* lives only briefly, so that saving a dense weight is cheap.

    True in two cases, both created by ``torch.utils.checkpoint``:

    - inside a backward pass (the autograd engine's graph task is running): a forward running there is a
      checkpoint's recompute (reentrant or not), whose saved tensors are consumed by the backward that follows;
    - inside a non-reentrant checkpoint's first forward: its pack hook replaces every saved tensor by a placeholder,
      so nothing is kept (and the recompute must save tensors of the same shapes, which it does).

    Everywhere else (no checkpointing, or other saved-tensor hooks such as CPU offloading) it is False.
    """
    if torch._C._current_graph_task_id() != -1:
        return True
    try:
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, TypeError):  # private API: if it moves, keep the safe choice
        return False
    if not hooks:
        return False
    return getattr(hooks[0], "__qualname__", "").startswith("_checkpoint_hook.")


class DenseWeightUnavailableError(UnsupportedFormatError, AttributeError):
    """``Int4Linear.weight`` was asked for: the layer keeps no dense weight.

    It is an ``AttributeError`` too, so ``hasattr(layer, "weight")`` and ``getattr(layer, "weight", None)`` keep
    their meaning (no dense weight) while a direct access explains itself.
    """


@dataclass(frozen=True)
class _WeightSpec:
    """The non-tensor half of an INT4 weight plus how to get its dense form (passed through autograd)."""

    in_features: int
    group_size: int
    dtype: torch.dtype
    cache: Any = None  # an INT4Unpacker (cache mode) or None (on the fly)
    cache_key: str | None = None
    backend: str | None = None
    keep_dense: bool = False  # save the dense weight for backward where that is transient (see the module doc)
    owner: Any = field(default=None, compare=False)  # the layer: holds prepared launches (fast_dequant)

    def dense(self, packed, scales, zero_points, g_idx, out: torch.Tensor | None = None, slot=None) -> torch.Tensor:
        """The ``[out, in]`` weight in ``self.dtype``: a fresh temporary (or ``out``), or the cache's shared copy.

        On CUDA the layer's prepared launch is used (:mod:`int4lora_train.modeling.fast_dequant`); ``slot`` names
        where ``out`` sits (a projection group's row offset)."""
        weight = _int4_weight(packed, scales, zero_points, g_idx, self.in_features, self.group_size)
        if self.cache is not None:
            dense = self.cache.get_dense(self.cache_key, weight, self.dtype)
            return dense if out is None else out.copy_(dense)
        if self.owner is not None and packed.device.type == "cuda" and self.backend in (None, "auto", "triton"):
            from int4lora_train.modeling.fast_dequant import fast_dequantize

            return fast_dequantize(self.owner, weight, self.dtype, out, slot)
        dense = dequantize(weight, self.dtype, backend=self.backend)
        return dense if out is None else out.copy_(dense)


class Int4LinearFunction(torch.autograd.Function):
    """``y = x @ dequantize(W).T + bias`` that saves only the packed weight for backward.

    All floating inputs are already in the compute dtype (:meth:`Int4Linear.forward` casts them, so autograd casts
    the gradients back). Returns grads for ``x`` and ``bias`` only: the INT4 buffers are data, not parameters.
    """

    @staticmethod
    def forward(ctx, x, bias, packed, scales, zero_points, g_idx, spec: _WeightSpec):
        weight = spec.dense(packed, scales, zero_points, g_idx)
        save_weight_tensors(ctx, weight, (packed, scales, zero_points, g_idx), spec, ctx.needs_input_grad[0])
        ctx.out_features = packed.shape[0]
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = saved_dense_weight(ctx, ctx.saved_tensors)
            grad_x = grad_output.to(weight.dtype) @ weight  # [..., out] @ [out, in] -> [..., in]
        if ctx.needs_input_grad[1]:
            grad_bias = grad_output.reshape(-1, ctx.out_features).sum(0)
        return grad_x, grad_bias, None, None, None, None, None


def save_weight_tensors(ctx, weight: torch.Tensor, buffers: tuple, spec: _WeightSpec, needed: bool, *extra) -> None:
    """``ctx.save_for_backward(*extra, W)`` when the dense ``W`` may be kept (see :func:`dense_save_is_transient`),
    else ``(*extra, packed, scales, zero_points, g_idx)``; :func:`saved_dense_weight` undoes it."""
    ctx.spec = spec
    ctx.dense_saved = bool(needed and spec.keep_dense and dense_save_is_transient())
    ctx.num_extra = len(extra)
    ctx.save_for_backward(*extra, *((weight,) if ctx.dense_saved else buffers))


def saved_dense_weight(ctx, saved: tuple) -> torch.Tensor:
    """The dense ``[out, in]`` weight for backward: the saved one, or dequantized again from the saved buffers."""
    tensors = saved[ctx.num_extra :]
    if ctx.dense_saved:
        return tensors[0]
    return ctx.spec.dense(*tensors)


class Int4Linear(nn.Linear):
    """A frozen INT4 linear layer (see the module docstring).

    Buffers: ``packed`` uint8 ``[out, in/2]``, ``scales`` ``[out, G]`` (``[1, 1]`` for a per-tensor scale),
    ``zero_points`` int8 ``[out, G]`` or None, ``g_idx`` int32 ``[in]`` or None; ``bias`` is an optional frozen
    parameter. ``cache`` (an :class:`~int4lora_train.quant.unpacker.INT4Unpacker`) switches to cache mode, keyed by
    ``cache_key`` (default: a key unique to this layer). ``keep_dense_for_backward`` (class default True; set per
    layer or with :func:`int4lora_train.modeling.fused_lora.configure_int4_training`) saves the dense weight during a
    gradient-checkpoint recompute instead of dequantizing it a third time in backward.
    """

    keep_dense_for_backward: bool = True

    def __init__(
        self,
        weight: Int4Weight,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
        cache: Any = None,
        cache_key: str | None = None,
        backend: str | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a dense weight
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        self.group_size = weight.group_size
        self.compute_dtype = compute_dtype
        self.backend = backend
        self.register_buffer("packed", weight.packed)
        # A per-tensor scale arrives as a stride-0 [out, 1] view of one value; store that value ([1, 1]) so that
        # .to(), state_dict() and load_state_dict() see a plain tensor, and expand it again in int4_weight().
        self.register_buffer("scales", _compact_rows(weight.scales))
        zero_points = None if weight.zero_points is None else _compact_rows(weight.zero_points)
        self.register_buffer("zero_points", zero_points)
        self.register_buffer("g_idx", weight.g_idx)
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=False)
        if bias is not None:
            bias.requires_grad_(False)
            if bias.shape != (self.out_features,):
                raise Int4FormatError(
                    f"Int4Linear: bias has shape {tuple(bias.shape)}, expected [{self.out_features}] (out_features)."
                )
        self.register_parameter("bias", bias)
        self.cache = None
        self.cache_key = None
        self.set_cache(cache, cache_key)

    # ------------------------------------------------------------------------------------------------ the weight

    def int4_weight(self) -> Int4Weight:
        """The canonical weight viewing this layer's buffers (no copy; per-tensor scales expanded, stride 0)."""
        return _int4_weight(self.packed, self.scales, self.zero_points, self.g_idx, self.in_features, self.group_size)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A dense ``[out, in]`` copy of the weight (default dtype: the scales')."""
        return dequantize(self.int4_weight(), dtype, backend=self.backend)

    @property
    def qweight(self) -> torch.Tensor:
        """The packed weight, under the name PEFT (``_replace_module``, ``_get_base_layer_device_and_dtype``) and
        GPTQ-aware tools look up to find a quantized layer's device; it is the ``packed`` buffer."""
        return self.packed

    @property
    def mode(self) -> str:
        return "cache" if self.cache is not None else "on_the_fly"

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    @property
    def nbytes(self) -> int:
        """Bytes held by the INT4 buffers (and the bias)."""
        tensors = [self.packed, self.scales, self.zero_points, self.g_idx, self.bias]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def set_cache(self, cache: Any, cache_key: str | None = None) -> None:
        """Use ``cache`` (an INT4Unpacker with ``get_dense``) for the dense weight, or None for on-the-fly mode."""
        if cache is not None and not callable(getattr(cache, "get_dense", None)):
            raise UnsupportedFormatError(
                f"Int4Linear: cache must be an INT4Unpacker (with get_dense), got {type(cache).__name__}."
            )
        self.cache = cache
        self.cache_key = (cache_key or f"int4linear-{id(self):x}") if cache is not None else None

    # ------------------------------------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, autocast = self.compute_dtype_for(x)
        spec = self.weight_spec(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        out = Int4LinearFunction.apply(x.to(dtype), bias, self.packed, self.scales, self.zero_points, self.g_idx, spec)
        return out if autocast else out.to(x.dtype)

    def weight_spec(self, dtype: torch.dtype) -> _WeightSpec:
        """How autograd functions get this layer's dense weight in ``dtype`` (the non-tensor half of the weight)."""
        return _WeightSpec(
            self.in_features,
            self.group_size,
            dtype,
            self.cache,
            self.cache_key,
            self.backend,
            bool(self.keep_dense_for_backward),
            self,
        )

    def compute_dtype_for(self, x: torch.Tensor) -> tuple[torch.dtype, bool]:
        """``(dtype, autocast)``: the dtype the matmul runs in for input ``x`` (see the module doc)."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type), True
        return self.compute_dtype or x.dtype, False

    # ------------------------------------------------------------------------------------------------ nn.Linear API

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "weight":
                raise DenseWeightUnavailableError(
                    "Int4Linear has no dense `weight`: its weight stays INT4 (buffers packed / scales / "
                    "zero_points / g_idx); use `.dequantize(dtype)` for a dense copy. Operations that modify the "
                    "base weight (merging LoRA, DoRA, PiSSA/OLoRA-style inits) are not supported on an INT4 base; "
                    "export a merged model with int4lora_train's export instead. If PEFT is wrapping this layer in "
                    "its dense lora.Linear, register the INT4 LoRA layer: import int4lora_train.modeling (installs "
                    "the dispatch) or call int4lora_train.modeling.register_int4_lora(lora_config)."
                ) from None
            raise

    def __deepcopy__(self, memo):
        # The cache is shared by the copies, not copied: it is one budget for a whole model (and holds a lock).
        if self.cache is not None:
            memo.setdefault(id(self.cache), self.cache)
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key not in _TRANSIENT_ATTRIBUTES:
                new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def __getstate__(self):
        # Prepared kernel launches (fast_dequant) refer to compiled kernels and device buffers: rebuilt on demand.
        return {k: v for k, v in self.__dict__.items() if k not in _TRANSIENT_ATTRIBUTES}

    def reset_parameters(self) -> None:
        """Nothing to initialise: the INT4 weight is checkpoint data (nn.Linear's init would need a dense weight)."""

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() / .float() cast every floating buffer; the scales must keep their dtype because
        # the dequantized values are defined by rounding in it (bit-exactness with the checkpoint). Probe what fn does
        # to an empty tensor of the scales' dtype and, if it changes the dtype, move the INT4 buffers by device only.
        if self.scales.is_meta:
            return super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=self.scales.dtype, device=self.scales.device))
        if probe.dtype == self.scales.dtype:
            return super()._apply(fn, recurse)
        protected = {name: self._buffers.pop(name) for name in ("scales",)}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, tensor in protected.items():
                self._buffers[name] = tensor.to(device=probe.device) if tensor is not None else None
        logger.debug("Int4Linear: kept scales in %s while casting the module to %s", self.scales.dtype, probe.dtype)
        return self

    def extra_repr(self) -> str:
        groups = "per-channel" if self.group_size >= self.in_features else f"group_size={self.group_size}"
        if self.scales.shape[0] == 1 and self.out_features > 1:
            groups = "per-tensor"
        parts = [
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            groups,
            "sym" if self.zero_points is None else "asym",
        ]
        if self.g_idx is not None:
            parts.append("g_idx")
        parts += [f"bias={self.bias is not None}", f"scales={str(self.scales.dtype).removeprefix('torch.')}"]
        parts.append(f"mode={self.mode}")
        if self.compute_dtype is not None:
            parts.append(f"compute_dtype={str(self.compute_dtype).removeprefix('torch.')}")
        return ", ".join(parts)


def _int4_weight(packed, scales, zero_points, g_idx, in_features: int, group_size: int) -> Int4Weight:
    """Assemble an Int4Weight from validated buffers without re-validating (this runs on every forward)."""
    out_features = packed.shape[0]
    return Int4Weight(
        packed=packed,
        scales=_expand_rows(scales, out_features),
        in_features=in_features,
        group_size=group_size,
        zero_points=None if zero_points is None else _expand_rows(zero_points, out_features),
        g_idx=g_idx,
    )


def _compact_rows(t: torch.Tensor) -> torch.Tensor:
    """``[out, G]`` whose rows are a stride-0 broadcast of one row -> that row, ``[1, G]``; others unchanged."""
    if t.dim() == 2 and t.shape[0] > 1 and t.stride(0) == 0:
        return t[:1].contiguous()
    return t


def _expand_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Inverse of :func:`_compact_rows`: ``[1, G]`` -> a stride-0 ``[rows, G]`` view."""
    if t.shape[0] == 1 and rows != 1:
        return t.expand(rows, t.shape[1])
    return t
