"""CUDA graphs over each checkpointed decoder layer: its forward, and its recompute with backward, replayed.

At micro batch 1 the step is bound by the host: ~10,000 kernel launches per step from the Python of 32 decoder layers'
forward, recompute and backward (BENCHMARKS.md, "Where the time goes"). Under gradient checkpointing a layer is a
pure function of its input and the step's tensors, so its two halves can each be captured once and replayed::

    forward of layer i:   F_i: out_i = layer(in_i)                     no grad (the checkpoint keeps only in_i)
    backward of layer i:  B_i: out = layer(in_i) with grad; grads = autograd.grad(out, (in_i, *lora), g_i)
                          the recompute (lean recompute and keep_dense_for_backward as under torch's checkpoint)

It replaces the layer's checkpoint function (``layer._gradient_checkpointing_func``, which transformers calls with the
layer's function and its hidden states, the other arguments bound), so it sits exactly where
``torch.utils.checkpoint`` was. The graphs read and write fixed tensors: ``in_i`` is the previous layer's graphed
output where the model passes it straight on (no copy; else a buffer of the layer's own, filled each call), the
tensor arguments (RoPE tables, position ids) are copied once per forward into buffers all layers read, and the
backward graphs pass the hidden-state gradient through two buffers by turns. The dropout masks of the recompute
equal the forward's because the CUDA generator is set back to the state the forward started from before ``B_i``
replays, as ``torch.utils.checkpoint`` does (a replay draws from the generator's state at that moment).

Varlen attention (``packed_attention: varlen``) reads its segments from ``position_ids`` on the host, which a graph
cannot do: the segment boundaries go into a buffer of a fixed capacity (a power of two, the last boundary repeated:
empty segments), with the row length as the longest segment. More segments than the capacity capture the graphs
again with twice the capacity.

A graph replays one shape. A batch is as long as its longest row, so the trainer pads every training batch to the
longest row of the data when graphs are on (``Trainer._apply_layer_graphs``; padding is a segment of its own and
carries no loss): one capture then serves the whole run. Any other shape, dtype, autocast state or plain argument
captures the graphs again (the old ones are dropped), up to :data:`MAX_CAPTURES` times; after that the layers run
under torch's checkpoint, with a warning. A layer also runs as before wherever a graph cannot stand for it: not
training, no gradients, an argument that is not a tensor, a tuple of tensors or a plain value (a KV cache), a
micro-batch larger than ``max_tokens`` (logged once each). A capture that fails raises
:class:`~int4lora_train.errors.TrainingError` naming the setting that turns graphs off: after a failed capture torch
leaves the CUDA generator and allocator in capture mode, so no eager fallback could be trusted. Replays are
bit-identical to the eager layers on the same inputs (the same kernels; the product's loss curves with and without
graphs were equal to the last digit on an H200 before batches were padded; padding changes the matmul shapes and
the dropout masks, so a padded run agrees with an unpadded one up to rounding and dropout noise).

Memory: each layer's output stays in the graphs' pool between steps (torch's checkpoint frees its saved inputs
after the backward), two hidden-state gradient buffers, and the parameters' gradient outputs; measured at 4 x 2048
tokens on the 8B shape, 0.17 GiB more at the peak.

Conditions: single process (FSDP gathers parameters into new memory each forward), gradient checkpointing,
parameters that keep their memory (in-place optimizers, as the trainer's), no activation offloading and no INT4
unpacker cache (both keep per-step state the graph cannot see). ``capture`` is the graph backend: CUDA graphs by
default; tests on the CPU pass :class:`EagerReplay`, which runs the captured function again on every replay.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from int4lora_train.errors import ConfigError, TrainingError
from int4lora_train.modeling import lora_layer
from int4lora_train.speed import varlen_attention

logger = logging.getLogger(__name__)

MAX_CAPTURES = 4
"""Captures of the whole set of graphs (a new shape, more segments, ...) before the layers stay eager."""

MIN_SEGMENT_CAPACITY = 16
"""The smallest segment capacity of a capture (varlen attention)."""

AUTO_MAX_TOKENS = 2048
"""``cuda_graphs: auto`` replays graphs for micro-batches of at most this many tokens (batch x sequence), where the
step is bound by the host. Measured through the product on an H200 (BENCHMARKS.md): at 1 x 2048 tokens the step took
0.256 s with graphs against 0.513 s without; at 2 x 2048, 0.418 against 0.406 s, and at 4 x 2048 0.651 against
0.623 s with 0.5 GiB more (GPU-bound: the replays' input copies and stand-in gradients cost more than the launches
they save). Larger micro-batches run eagerly."""

_STATE_ATTR = "_int4lora_layer_graphs"


# ---------------------------------------------------------------------------------------------------------------
# Graph backends


class CudaGraphCapture:
    """Captures functions into CUDA graphs sharing one memory pool, on one side stream (after one eager warm-up run
    there, as torch's ``make_graphed_callables`` does)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)

    def __call__(self, fn: Callable[[], Any], before_run: Callable[[], None]) -> tuple[Callable[[], None], Any]:
        """``(replay, outputs)``: ``fn`` captured; ``before_run()`` is called before the warm-up and the capture."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            before_run()
            fn()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        before_run()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            outputs = fn()
        return graph.replay, outputs


class EagerReplay:
    """A stand-in for CUDA graphs on any device: "capturing" runs ``fn`` once and keeps its outputs; a replay runs it
    again and copies the new outputs into those tensors. Exercises every buffer and ordering rule of
    :class:`LayerGraphs` without a GPU (tests); it saves no host time."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.captures = 0

    def __call__(self, fn: Callable[[], Any], before_run: Callable[[], None]) -> tuple[Callable[[], None], Any]:
        self.captures += 1
        before_run()
        outputs = fn()

        def replay():
            before_run()
            for kept, new in zip(_tensors(outputs), _tensors(fn())):
                kept.copy_(new)

        return replay, outputs


def _tensors(outputs: Any) -> list[torch.Tensor]:
    items = outputs if isinstance(outputs, tuple | list) else (outputs,)
    return [t for t in items if isinstance(t, torch.Tensor)]


# ---------------------------------------------------------------------------------------------------------------
# The autograd node


class GraphedLayerFunction(torch.autograd.Function):
    """One decoder layer as one node: forward replays ``F_i``, backward replays ``B_i`` (:class:`LayerGraphs`)."""

    @staticmethod
    def forward(ctx, graphs: LayerGraphs, layer: _Layer, hidden: torch.Tensor, *params: torch.Tensor):
        ctx.graphs, ctx.layer = graphs, layer
        return graphs.run_forward(layer, hidden).detach()  # a new tensor object over the graph's output memory

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_in, param_grads = ctx.graphs.run_backward(ctx.layer, grad)
        return (None, None, grad_in, *param_grads)


# ---------------------------------------------------------------------------------------------------------------
# State


@dataclass(eq=False)
class _Layer:
    """One graphed layer: its module, eager checkpoint function, trainable parameters and graphs."""

    module: nn.Module
    eager: Callable
    slots: tuple[tuple[nn.Module, str], ...]  # where the trainable parameters live: (submodule, name)
    function: Any = None  # the layer's function (a partial, kwargs bound by transformers), as last called
    input: torch.Tensor | None = None  # what F_i and B_i read as the layer input
    input_shared: bool = False  # ``input`` is the previous layer's output (read in place, never written)
    needs_input_grad: bool = False  # whether B_i computes the input gradient
    output: torch.Tensor | None = None  # what F_i writes
    forward_replay: Callable[[], None] | None = None
    backward_replay: Callable[[], None] | None = None
    grad_slot: torch.Tensor | None = None  # what B_i reads as the output gradient
    grad_in: torch.Tensor | None = None  # what B_i writes as the input gradient
    param_grads: tuple = ()
    rng_state: torch.Tensor | None = None  # the generator's state when this forward started
    index: int = 0

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        return tuple(sub._parameters[name] for sub, name in self.slots)

    def forget(self) -> None:
        self.input = self.output = self.forward_replay = self.backward_replay = None
        self.grad_slot = self.grad_in = None
        self.input_shared, self.param_grads = False, ()


@dataclass(eq=False)
class _Captured:
    """What every graph of one capture shares: the signature it was captured for and the argument buffers."""

    signature: tuple
    kwargs: dict[str, Any]  # the layer arguments the graphs read: buffers and plain values
    seen: dict[str, Any] = field(default_factory=dict)  # the argument objects copied into the buffers last
    segments: varlen_attention.Segments | None = None  # varlen attention's, with cu_seqlens of a fixed capacity
    grad_buffers: list[torch.Tensor] = field(default_factory=list)  # the hidden-state gradient, by turns


class LayerGraphs:
    """The graphs of a model's checkpointed decoder layers (see the module docstring); :func:`enable_layer_graphs`
    makes one. ``stats`` counts captures (of the whole set), graphed and eager layer calls."""

    def __init__(
        self,
        model: nn.Module,
        layers: list[nn.Module],
        device: torch.device,
        capture: Any = None,
        max_tokens: int | None = None,
    ) -> None:
        self.max_tokens = max_tokens
        self.model_config = getattr(model, "config", None)
        self.device = _device_with_index(device)
        self.capture_factory = capture or CudaGraphCapture
        self.capture: Any = None
        self.layers = [
            _Layer(m, m._gradient_checkpointing_func, _trainable_slots(m), index=i) for i, m in enumerate(layers)
        ]
        self.captured: _Captured | None = None
        self.last_output: torch.Tensor | None = None
        self.stats = {"captures": 0, "graphed_calls": 0, "eager_calls": 0}
        self._reasons: set[str] = set()

    # -- the checkpoint function -------------------------------------------------------------------------------

    def checkpoint_function(self, layer: _Layer) -> Callable:
        """The function that stands for ``layer``'s ``_gradient_checkpointing_func``."""

        def graphed_checkpoint(function, *args, **kwargs):
            reason = self._why_eager(layer, function, args, kwargs)
            if reason is None:
                layer.function = function
                reason = self._prepare_forward(layer, args[0])
            if reason is not None:
                self.stats["eager_calls"] += 1
                if reason not in self._reasons:
                    self._reasons.add(reason)
                    log = logger.warning if reason.startswith("a new shape") else logger.info
                    log("layer graphs: a layer runs under torch's checkpoint (%s)", reason)
                return layer.eager(function, *args, **kwargs)
            self.stats["graphed_calls"] += 1
            return GraphedLayerFunction.apply(self, layer, args[0], *layer.params)

        graphed_checkpoint._int4lora_original = layer.eager
        return graphed_checkpoint

    def _why_eager(self, layer: _Layer, function: Any, args: tuple, kwargs: dict) -> str | None:
        """Why this call cannot replay graphs (None: it can, and the argument buffers hold this call's)."""
        if not torch.is_grad_enabled() or not layer.module.training:
            return "no gradients or not training"
        if (
            kwargs
            or len(args) != 1
            or not isinstance(function, functools.partial)
            or any(isinstance(a, torch.Tensor) for a in function.args)
        ):
            return "arguments other than the hidden states and bound keywords"
        hidden = args[0]
        if not isinstance(hidden, torch.Tensor) or hidden.device != self.device:
            return "hidden states not a tensor on the graphs' device"
        if self.max_tokens is not None and hidden.shape[:-1].numel() > self.max_tokens:
            return f"micro-batches of more than {self.max_tokens} tokens: the step is bound by the GPU (auto)"
        if self._same_arguments(hidden, function.keywords):
            return None  # the layers after the first of a forward: the buffers already hold these arguments
        signature = self._signature(hidden, function.keywords)
        if signature is None:
            return "an argument that is neither a tensor nor a plain value (a KV cache?)"
        if self.captured is None or self.captured.signature != signature:
            if self.stats["captures"] >= MAX_CAPTURES:
                return f"a new shape or setting after {MAX_CAPTURES} captures"
            self._new_capture(signature, hidden, function.keywords)
        self._fill_arguments(function.keywords)
        return None

    def _same_arguments(self, hidden: torch.Tensor, kwargs: dict) -> bool:
        """Whether this call passes the very argument objects copied into the buffers last, hidden states of the
        captured shape and the captured autocast state (then its signature is the captured one)."""
        captured = self.captured
        if captured is None or len(kwargs) != len(captured.seen):
            return False
        if any(captured.seen.get(name) is not value for name, value in kwargs.items()):
            return False
        device_type = self.device.type
        autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        return _tensor_key(hidden) == captured.signature[0] and autocast == captured.signature[1:3]

    def _signature(self, hidden: torch.Tensor, kwargs: dict) -> tuple | None:
        """What the graphs depend on besides tensor contents; None when an argument cannot be held in a buffer."""
        parts: list[Any] = [
            _tensor_key(hidden),
            torch.is_autocast_enabled(self.device.type),
            torch.get_autocast_dtype(self.device.type),
        ]
        for name in sorted(kwargs):
            value = kwargs[name]
            if isinstance(value, torch.Tensor):
                parts.append((name, _tensor_key(value)))
            elif isinstance(value, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
                parts.append((name, tuple(_tensor_key(v) for v in value)))
            elif value is None or isinstance(value, bool | int | float | str):
                parts.append((name, value))
            else:
                return None
        parts.append(("segment_capacity", self._segment_capacity(kwargs.get("position_ids"), hidden)))
        return tuple(parts)

    # -- argument buffers -------------------------------------------------------------------------------------

    def _varlen(self) -> bool:
        return getattr(self.model_config, "_attn_implementation", None) == varlen_attention.IMPLEMENTATION

    def _segment_capacity(self, position_ids: Any, hidden: torch.Tensor) -> int | None:
        """The captured capacity if this forward's segments fit it, else the power of two they need; None without
        varlen attention."""
        if not self._varlen() or not isinstance(position_ids, torch.Tensor):
            return None
        needed = len(self._lengths(position_ids, hidden.shape[0]))
        segments = self.captured.segments if self.captured is not None else None
        if segments is not None and needed <= segments.cu_seqlens.numel() - 1:
            return segments.cu_seqlens.numel() - 1
        capacity = MIN_SEGMENT_CAPACITY
        while capacity < needed:
            capacity *= 2
        return capacity

    def _lengths(self, position_ids: torch.Tensor, batch: int) -> list[int]:
        """The segment lengths of this forward's rows (:func:`~.varlen_attention.segments_for` keeps them per
        ``position_ids`` tensor: those the trainer preset from the batch's host copy, else a device-to-host copy)."""
        return list(varlen_attention.segments_for(position_ids, batch).lengths)

    def _new_capture(self, signature: tuple, hidden: torch.Tensor, kwargs: dict) -> None:
        """Forget every graph; new argument buffers for ``signature`` (graphs are captured as the layers run)."""
        self.stats["captures"] += 1
        self.capture = self.capture_factory(self.device)
        buffers: dict[str, Any] = {}
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                buffers[name] = value.clone()
            elif isinstance(value, tuple):
                buffers[name] = tuple(v.clone() for v in value)
            else:
                buffers[name] = value
        self.captured = _Captured(signature, buffers)
        for layer in self.layers:
            layer.forget()
        self.last_output = None
        capacity = signature[-1][1]  # _signature's last part: ("segment_capacity", capacity or None)
        if capacity is not None:
            cu = torch.zeros(capacity + 1, dtype=torch.int32, device=self.device)
            rows, width = hidden.shape[0], buffers["position_ids"].shape[-1]
            self.captured.segments = varlen_attention.Segments(cu, width, (), rows, width)

    def _fill_arguments(self, kwargs: dict) -> None:
        """Copy this forward's tensor arguments into the buffers, once per forward (every layer gets the same
        objects), and the segments of its ``position_ids``."""
        captured = self.captured
        for name, value in kwargs.items():
            if captured.seen.get(name) is value:
                continue
            buffer = captured.kwargs[name]
            if isinstance(value, torch.Tensor):
                buffer.copy_(value)
            elif isinstance(value, tuple):
                for b, v in zip(buffer, value):
                    b.copy_(v)
            captured.seen[name] = value
            if name == "position_ids" and captured.segments is not None:
                self._fill_segments(value, captured.segments)

    def _fill_segments(self, position_ids: torch.Tensor, segments: varlen_attention.Segments) -> None:
        """The boundaries of this forward's segments into ``cu_seqlens``, the last one repeated up to the capacity
        (empty segments); ``lengths`` are the real ones (the CPU's masked path reads them)."""
        lengths = self._lengths(position_ids, segments.batch)
        segments.cu_seqlens.copy_(varlen_attention.cu_seqlens(lengths, segments.cu_seqlens.numel() - 1))
        segments.lengths = tuple(lengths)
        segments.masks.clear()

    def _bind_segments(self) -> None:
        """Make varlen attention read the segment buffers for the ``position_ids`` buffer (before a layer's Python
        runs: a capture, a warm-up, an eager replay)."""
        captured = self.captured
        if captured is not None and captured.segments is not None:
            varlen_attention.preset_segments(captured.kwargs["position_ids"], captured.segments)

    # -- forward and backward ---------------------------------------------------------------------------------

    def _prepare_forward(self, layer: _Layer, hidden: torch.Tensor) -> str | None:
        """Capture ``F_i`` if this capture has not yet (None), or why the layer runs eagerly now."""
        if layer.forward_replay is not None:
            if layer.input_shared and not _same_tensor(hidden, layer.input):
                return "its input is not the previous layer's output"
            if layer.needs_input_grad != hidden.requires_grad:
                layer.backward_replay = None  # captured again for this input
                layer.needs_input_grad = hidden.requires_grad
            return None
        layer.input_shared = self.last_output is not None and _same_tensor(hidden, self.last_output)
        layer.input = self.last_output if layer.input_shared else torch.empty_like(hidden)
        layer.needs_input_grad = hidden.requires_grad
        if not layer.input_shared:
            layer.input.copy_(hidden)
        func, args, kwargs, autocast = layer.function.func, layer.function.args, self.captured.kwargs, self._autocast()

        def forward():
            with torch.no_grad(), autocast(), lora_layer.no_adapter_reuse():
                return func(*args, layer.input, **kwargs)

        layer.rng_state = _rng_state(self.device)
        layer.forward_replay, layer.output = self._capture(layer, forward, "forward")
        return None

    def run_forward(self, layer: _Layer, hidden: torch.Tensor) -> torch.Tensor:
        """Replay ``F_i`` on ``hidden``; returns the graph's output tensor."""
        layer.rng_state = _rng_state(self.device)
        if not _same_tensor(hidden, layer.input):
            layer.input.copy_(hidden)
        layer.forward_replay()
        self.last_output = layer.output
        return layer.output

    def run_backward(self, layer: _Layer, grad: torch.Tensor) -> tuple[torch.Tensor | None, tuple]:
        """Replay ``B_i`` (capturing it first if needed) with the output gradient ``grad``; returns the input
        gradient (None when the input needs none) and the parameters' gradients."""
        after = _rng_state(self.device)  # where the generator stands for what follows the backward
        if layer.backward_replay is None:
            self._capture_backward(layer, grad)
        if not _same_tensor(grad, layer.grad_slot):
            layer.grad_slot.copy_(grad)
        _set_rng_state(self.device, layer.rng_state)
        layer.backward_replay()
        _set_rng_state(self.device, after)
        return (layer.grad_in if layer.needs_input_grad else None), layer.param_grads

    def _capture_backward(self, layer: _Layer, grad: torch.Tensor) -> None:
        captured = self.captured
        if not captured.grad_buffers:
            captured.grad_buffers = [torch.empty_like(layer.output), torch.empty_like(layer.output)]
        first, second = captured.grad_buffers
        layer.grad_slot = second if _same_tensor(grad, second) else first
        layer.grad_in = first if layer.grad_slot is second else second
        needs_input = layer.needs_input_grad
        func, args, kwargs = layer.function.func, layer.function.args, captured.kwargs
        autocast, params = self._autocast(), layer.params

        def backward():
            # The gradient is taken for leaves made here, on the capture stream, standing for the input and the
            # parameters: the parameters' own gradient accumulators belong to the stream of their first backward,
            # and autograd would make that stream wait on the capture (which invalidates it).
            with torch.enable_grad(), autocast(), lora_layer.no_adapter_reuse():
                inp = layer.input.detach().requires_grad_(needs_input)
                leaves = tuple(p.detach().requires_grad_() for p in params)
                with _parameters_as(layer.slots, leaves):
                    out = func(*args, inp, **kwargs)
                inputs = ((inp,) if needs_input else ()) + leaves
                grads = torch.autograd.grad(out, inputs, layer.grad_slot, allow_unused=True)
            if needs_input:
                layer.grad_in.copy_(grads[0])
                grads = grads[1:]
            return tuple(grads)

        layer.grad_slot.copy_(grad)
        layer.backward_replay, layer.param_grads = self._capture(layer, backward, "backward")

    def _capture(self, layer: _Layer, fn: Callable[[], Any], which: str) -> tuple[Callable, Any]:
        """``self.capture(fn)``, the generator set to ``layer.rng_state`` before each run of ``fn``; left there (the
        replay that follows draws from it). A failure is a TrainingError (see the module docstring)."""

        def before_run():
            _set_rng_state(self.device, layer.rng_state)
            self._bind_segments()

        try:
            replay, outputs = self.capture(fn, before_run)
        except Exception as exc:
            raise TrainingError(
                f"capturing the CUDA graph of decoder layer {layer.index}'s {which} ({type(layer.module).__name__}) "
                f"failed: {type(exc).__name__}: {exc}. Set train.speed.cuda_graphs: off (speed.apply(model, "
                "cuda_graphs='off')) to run the layers under torch's checkpoint."
            ) from exc
        before_run()
        return replay, outputs

    def _autocast(self) -> Callable:
        """The autocast state of this capture's signature, without the weight-cast cache (graphs cannot hold it)."""
        enabled, dtype = self.captured.signature[1], self.captured.signature[2]
        device_type = self.device.type
        return lambda: torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=False)


def _trainable_slots(module: nn.Module) -> tuple[tuple[nn.Module, str], ...]:
    """``(submodule, name)`` of each trainable parameter of ``module`` (each parameter once)."""
    slots, seen = [], set()
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None and p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                slots.append((sub, name))
    return tuple(slots)


@contextlib.contextmanager
def _parameters_as(slots: tuple, tensors: tuple) -> Iterator[None]:
    """The parameters in ``slots`` replaced by ``tensors`` while the block runs."""
    saved = [sub._parameters[name] for sub, name in slots]
    for (sub, name), t in zip(slots, tensors):
        sub._parameters[name] = t
    try:
        yield
    finally:
        for (sub, name), p in zip(slots, saved):
            sub._parameters[name] = p


def _device_with_index(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _tensor_key(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.stride(), t.dtype, t.device)


def _same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Whether ``a`` and ``b`` are the same memory seen the same way."""
    if a is None or b is None:
        return False
    return a.data_ptr() == b.data_ptr() and _tensor_key(a) == _tensor_key(b)


def _rng_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


# ---------------------------------------------------------------------------------------------------------------
# Switching it on and off


def graph_blockers(model: nn.Module, device: torch.device, need_cuda: bool = True) -> list[str]:
    """Why the layers of ``model`` cannot be graphed on ``device`` (empty: they can); ``need_cuda=False`` for a
    capture that runs anywhere (:class:`EagerReplay`)."""
    from int4lora_train.memory.offload import activation_offloader, checkpointed_layers
    from int4lora_train.modeling.int4_linear import Int4Linear

    reasons = []
    if need_cuda and (device.type != "cuda" or not torch.cuda.is_available()):
        reasons.append(f"CUDA graphs need a CUDA device, the model computes on {device} (CUDA available: "
                       f"{torch.cuda.is_available()})")  # fmt: skip
    if not checkpointed_layers(model):
        reasons.append("no gradient-checkpointed decoder layer (train.gradient_checkpointing: true)")
    if activation_offloader(model) is not None:
        reasons.append("activation offloading moves the layer inputs to the host (train.memory.offload_activations)")
    if any(isinstance(m, Int4Linear) and m.cache is not None for m in model.modules()):
        reasons.append("an INT4 layer dequantizes through the unpacker cache")
    return reasons


def set_layer_graphs(
    model: nn.Module, choice: bool | str, device: torch.device | str | None = None, capture: Any = None
) -> bool:
    """Switch layer graphs on ``model`` (``speed.apply``'s ``cuda_graphs``): ``"auto"`` where
    :func:`graph_blockers` finds nothing, ``"on"`` (ConfigError naming the blockers otherwise), ``"off"``. Returns
    whether they are on. ``device``: where the model computes (default: its first parameter's device). Under ``auto``
    micro-batches of more than :data:`AUTO_MAX_TOKENS` tokens run eagerly."""
    disable_layer_graphs(model)
    choice = {True: "on", False: "off"}.get(choice, choice)
    if choice == "off":
        return False
    if device is None:
        device = next(model.parameters()).device
    device = _device_with_index(device)
    blockers = graph_blockers(model, device, need_cuda=capture is None)
    if blockers:
        if choice == "on":
            raise ConfigError(
                f"cuda_graphs: on cannot work here: {'; '.join(blockers)}. Set train.speed.cuda_graphs: auto (on "
                "where it can run) or off."
            )
        logger.info("CUDA graphs of the decoder layers not used: %s", "; ".join(blockers))
        return False
    enable_layer_graphs(model, device, capture=capture, max_tokens=AUTO_MAX_TOKENS if choice == "auto" else None)
    return True


def enable_layer_graphs(
    model: nn.Module, device: torch.device | str, capture: Any = None, max_tokens: int | None = None
) -> LayerGraphs:
    """Graph ``model``'s checkpointed decoder layers (see the module docstring) for micro-batches of at most
    ``max_tokens`` tokens (None: any); returns the :class:`LayerGraphs` (``stats``). Replaces an earlier call's;
    :func:`disable_layer_graphs` undoes it.

    Raises:
        ValueError: ``model`` has no checkpointed layer (enable gradient checkpointing first).
    """
    from int4lora_train.memory.offload import checkpointed_layers

    disable_layer_graphs(model)
    layers = checkpointed_layers(model)
    if not layers:
        raise ValueError("layer graphs need gradient checkpointing: no checkpointed decoder layer found")
    graphs = LayerGraphs(model, layers, device, capture, max_tokens)
    for layer in graphs.layers:
        layer.module._gradient_checkpointing_func = graphs.checkpoint_function(layer)
    model.__dict__[_STATE_ATTR] = graphs
    logger.info("layer graphs: %d checkpointed decoder layers are captured and replayed", len(layers))
    return graphs


def disable_layer_graphs(model: nn.Module) -> bool:
    """Undo :func:`enable_layer_graphs`; returns whether it was on."""
    graphs = model.__dict__.pop(_STATE_ATTR, None)
    if graphs is None:
        return False
    for layer in graphs.layers:
        layer.module._gradient_checkpointing_func = layer.eager
    return True


def layer_graphs(model: nn.Module) -> LayerGraphs | None:
    """The :class:`LayerGraphs` :func:`enable_layer_graphs` put on ``model``, or None."""
    return model.__dict__.get(_STATE_ATTR)
