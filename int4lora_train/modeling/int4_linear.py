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

The dense weight comes from the layer's *dequantizer* (:mod:`int4lora_train.kernels.dequantizer`), chosen the first
time the layer runs on a device: on CUDA the fused Triton kernel with a prepared launch, elsewhere the torch
reference, in cache mode the unpacker. The CUDA forward, call by call::

    Int4Linear.forward(x)
      Int4LinearFunction.apply(x, bias, *int4_tensors(), spec)   spec = weight_spec(dtype)
        spec.dense(packed, scales, zero_points, g_idx)
          TritonDequantizer((packed, ...), dtype)    kernels/dequantizer.py: same buffers -> replay the launch
            Replay(out)                              kernels/launch.py: the compiled kernel, called directly
        F.linear(x, W, bias)

Under gradient checkpointing a layer is dequantized three times per step (forward, recompute, backward). The
recompute runs inside the backward pass, right before the backward of the same layer, so there the dense weight is
saved for backward instead of the packed buffers (``keep_dense_for_backward``, default on): two dequantizations
instead of three, for the memory of one checkpointed block's dense weights while its backward runs. See
:func:`dense_save_is_transient` for how that moment is recognised; everywhere else only the packed buffers are saved.

A layer whose output is read by nothing its checkpoint saves (``output_unread_in_recompute``, set by
:func:`int4lora_train.speed.apply` on the MLP's down projection of Llama-like decoder layers, where that output only
reaches the layer's output through the residual add) skips its matmul in the recompute: what the recompute keeps are
the tensors saved for backward, and this output is none of them (:func:`in_recompute`).

The compute dtype is the autocast dtype under ``torch.autocast``, else ``compute_dtype`` when given, else the input's
dtype; without autocast the output has the input's dtype, like ``nn.Linear``.

``Int4Linear`` subclasses ``nn.Linear`` (without calling its constructor) so that everything that selects linear
layers by type (PEFT's ``target_modules="all-linear"``, training scripts' ``find_all_linear_names``) finds it. It has
no ``weight`` parameter: asking for one raises :class:`DenseWeightUnavailableError`, which says what to do instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from int4lora_train.errors import Int4FormatError, UnsupportedFormatError
from int4lora_train.kernels.dequantizer import Dequantizer, compact_rows, int4_weight_view, select_dequantizer
from int4lora_train.quant.dequant import dequantize
from int4lora_train.quant.layout import INT4_INTEGER_DTYPES, INT4_TENSOR_NAMES, Int4Weight

logger = logging.getLogger(__name__)

MODES = ("on_the_fly", "cache")


def _as_int4_dtype(name: str, tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor`` viewed in the canonical dtype of INT4 tensor ``name`` (a no-op for scales and absent tensors)."""
    want = INT4_INTEGER_DTYPES.get(name)
    if tensor is None or want is None or tensor.dtype == want:
        return tensor
    return tensor.view(want)


def in_dtype(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t.to(dtype)`` (None stays None) without the call when ``t`` already has it: ``.to`` returns ``t`` itself
    then, but its dispatch costs host time on every projection call."""
    if t is None or t.dtype == dtype:
        return t
    return t.to(dtype)


def dense_save_is_transient() -> bool:
    """Whether a tensor saved for backward *now* lives only briefly, so that saving a dense weight is cheap.

    True in two cases, both created by ``torch.utils.checkpoint``:

    - inside a backward pass (the autograd engine's graph task is running): a forward running there is a
      checkpoint's recompute (reentrant or not), whose saved tensors are consumed by the backward that follows;
    - inside a non-reentrant checkpoint's first forward: its pack hook replaces every saved tensor by a placeholder,
      so nothing is kept (and the recompute must save tensors of the same shapes, which it does).

    Everywhere else (no checkpointing, or other saved-tensor hooks such as CPU offloading) it is False.
    """
    if in_recompute():
        return True
    try:
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, TypeError):  # private API: if it moves, keep the safe choice
        return False
    if not hooks:
        return False
    return getattr(hooks[0], "__qualname__", "").startswith("_checkpoint_hook.")


def in_recompute() -> bool:
    """Whether a forward running *now* is a checkpoint's recompute: it runs inside a backward pass (the autograd
    engine's graph task is running), where only the tensors it saves for backward are kept."""
    return torch._C._current_graph_task_id() != -1


class DenseWeightUnavailableError(UnsupportedFormatError, AttributeError):
    """``Int4Linear.weight`` was asked for: the layer keeps no dense weight.

    It is an ``AttributeError`` too, so ``hasattr(layer, "weight")`` and ``getattr(layer, "weight", None)`` keep
    their meaning (no dense weight) while a direct access explains itself.
    """


@dataclass(frozen=True)
class _WeightSpec:
    """The non-tensor half of an INT4 weight, passed through autograd: the compute dtype, the layer's dequantizer and
    whether the dense weight may be saved for backward (see the module docstring)."""

    dtype: torch.dtype
    dequantizer: Dequantizer | None
    keep_dense: bool = False
    output_unread_in_recompute: bool = False

    def dense(self, packed, scales, zero_points, g_idx, out: torch.Tensor | None = None) -> torch.Tensor:
        """The ``[out, in]`` weight in ``self.dtype``: a fresh temporary (or ``out``), or the cache's shared copy."""
        return self.dequantizer((packed, scales, zero_points, g_idx), self.dtype, out)

    def keeps_dense(self, needed: bool) -> bool:
        """Whether a forward running now saves the dense weight for backward (rather than the packed buffers)."""
        return bool(needed and self.keep_dense and dense_save_is_transient())

    def skips_output(self) -> bool:
        """Whether a forward running now may leave its output uncomputed: a recompute whose output nothing reads."""
        return self.output_unread_in_recompute and in_recompute()


def lean_forward_weight(spec: _WeightSpec, buffers: tuple, needed: bool) -> tuple[torch.Tensor | None, bool]:
    """``(weight, skip)`` for a forward that saves its weight with :func:`save_weight_tensors` (same ``needed``).

    ``skip``: the forward may leave its output uncomputed (:meth:`_WeightSpec.skips_output`). ``weight``: the dense
    ``[out, in]`` weight; None only when ``skip`` and the packed buffers are saved (nothing reads it then)."""
    skip = spec.skips_output()
    if skip and not spec.keeps_dense(needed):
        return None, True
    return spec.dense(*buffers), skip


class Int4LinearFunction(torch.autograd.Function):
    """``y = x @ dequantize(W).T + bias`` that saves only the packed weight for backward.

    All floating inputs are already in the compute dtype (:meth:`Int4Linear.forward` casts them, so autograd casts
    the gradients back). Returns grads for ``x`` and ``bias`` only: the INT4 buffers are data, not parameters.
    """

    @staticmethod
    def forward(ctx, x, bias, packed, scales, zero_points, g_idx, spec: _WeightSpec):
        buffers = (packed, scales, zero_points, g_idx)
        weight, skip = lean_forward_weight(spec, buffers, ctx.needs_input_grad[0])
        save_weight_tensors(ctx, weight, buffers, spec, ctx.needs_input_grad[0])
        ctx.out_features = packed.shape[0]
        if skip:  # a recompute's output that nothing reads
            return x.new_empty(*x.shape[:-1], packed.shape[0])
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
    ctx.dense_saved = spec.keeps_dense(needed)
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
    ``cache_key`` (default: a key unique to this layer). ``backend`` (``"auto"``, ``"torch"``, ``"triton"``) is the
    kernel choice (:mod:`int4lora_train.kernels.backend`). ``keep_dense_for_backward`` (class default True; set per
    layer or with :func:`int4lora_train.speed.apply`) saves the dense weight during a gradient-checkpoint recompute
    instead of dequantizing it a third time in backward.
    """

    keep_dense_for_backward: bool = True
    output_unread_in_recompute: bool = False

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
        self.register_buffer("scales", compact_rows(weight.scales))
        zero_points = None if weight.zero_points is None else compact_rows(weight.zero_points)
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

    def int4_tensors(self) -> list:
        """``[packed, scales, zero_points, g_idx]`` in their canonical dtypes, read from the buffers, or from the
        parameters where FSDP sharding re-registered them (``train.distributed``, which stores the integer ones in
        float dtypes of the same width: viewed back here, no copy); no ``nn.Module.__getattr__`` detour (this runs
        on every call)."""
        buffers, parameters = self._buffers, self._parameters
        return [
            buffers[name] if name in buffers else _as_int4_dtype(name, parameters.get(name))
            for name in INT4_TENSOR_NAMES
        ]

    def int4_weight(self) -> Int4Weight:
        """The canonical weight viewing this layer's buffers (no copy; per-tensor scales expanded, stride 0)."""
        return int4_weight_view(self.int4_tensors(), self.in_features, self.group_size)

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
        self._drop_dequantizer()  # chosen again, with the cache, on the next use

    @property
    def dequantizer(self) -> Dequantizer:
        """How this layer's dense weight is made (:mod:`int4lora_train.kernels.dequantizer`): chosen the first time it
        is needed on a device, and again after the layer moves, its cache changes or it is copied."""
        packed = self._buffers.get("packed")
        device = (self._parameters["packed"] if packed is None else packed).device  # FSDP: re-registered as parameter
        dequantizer = self.__dict__.get("_dequantizer")
        if dequantizer is None or dequantizer.device != device:
            dequantizer = select_dequantizer(
                device, self.in_features, self.group_size, self.backend, self.cache, self.cache_key
            )
            self.__dict__["_dequantizer"] = dequantizer
        return dequantizer

    def _drop_dequantizer(self) -> None:
        """Forget the dequantizer and the weight spec that holds it (:meth:`weight_spec`)."""
        self.__dict__.pop("_dequantizer", None)
        self.__dict__.pop("_weight_spec", None)

    # ------------------------------------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, autocast = self.compute_dtype_for(x)
        spec = self.weight_spec(dtype)
        bias = self._parameters.get("bias")
        out = Int4LinearFunction.apply(in_dtype(x, dtype), in_dtype(bias, dtype), *self.int4_tensors(), spec)
        return out if autocast else in_dtype(out, x.dtype)

    def weight_spec(self, dtype: torch.dtype) -> _WeightSpec:
        """How autograd functions get this layer's dense weight in ``dtype`` (the non-tensor half of the weight).

        Asked for on every call of the layer, so the last spec made is kept (``_weight_spec``) and served while it
        still describes the layer: the same dtype, dequantizer and policy flags (``speed.apply`` and
        ``set_lean_recompute`` set those on the layer at any time; a move or a cache change replaces the
        dequantizer). One spec, not one per dtype: an outdated spec must not keep an old dequantizer (and the
        buffers its launches hold) alive."""
        dequantizer = self.dequantizer
        keep, unread = bool(self.keep_dense_for_backward), bool(self.output_unread_in_recompute)
        spec = self.__dict__.get("_weight_spec")
        if (
            spec is None
            or spec.dtype != dtype
            or spec.dequantizer is not dequantizer
            or spec.keep_dense != keep
            or spec.output_unread_in_recompute != unread
        ):
            spec = self.__dict__["_weight_spec"] = _WeightSpec(dtype, dequantizer, keep, unread)
        return spec

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

    # No __deepcopy__ here: copy.deepcopy finds an instance's __deepcopy__ through PEFT's ModulesToSaveWrapper's
    # attribute forwarding and would copy this layer in place of the wrapper. deepcopy goes through __getstate__;
    # the cache shares itself (INT4Unpacker.__deepcopy__).
    def __getstate__(self):
        # The dequantizer's prepared launches refer to compiled kernels and device buffers: chosen again on demand.
        return {k: v for k, v in self.__dict__.items() if k not in ("_dequantizer", "_weight_spec")}

    def reset_parameters(self) -> None:
        """Nothing to initialise: the INT4 weight is checkpoint data (nn.Linear's init would need a dense weight)."""

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() / .float() cast every floating buffer; the scales must keep their dtype because
        # the dequantized values are defined by rounding in it (bit-exactness with the checkpoint). Probe what fn does
        # to an empty tensor of the scales' dtype and, if it changes the dtype, move the INT4 buffers by device only.
        self._drop_dequantizer()  # its launches refer to the buffers this replaces
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
