"""Activation offloading: the inputs of gradient-checkpointed decoder layers live in pinned host memory.

Under gradient checkpointing each decoder layer keeps exactly one thing on the device between its forward and its
backward: its inputs (``torch.utils.checkpoint`` saves them, outside the checkpoint's own saved-tensor hooks, and
recomputes everything else in backward). That is ``layers x tokens x hidden`` elements, 32 GiB for an 8B model at
128k tokens in bf16; this module moves them to host memory and back::

    forward, per checkpointed layer:    the layer's checkpoint function is called -> push the offloader's hooks
                                        checkpoint saves the layer inputs -> pack: D2H copy on a side stream
                                        (the checkpoint's own hooks take over inside the layer)
                                        the checkpoint function returns (or raises) -> pop
    backward, layer i's recompute:      unpack(i): H2D copy of i (unless prefetched), prefetch i-1 on the side
                                        stream, the compute stream waits for i's copy

Only tensors saved while a checkpointed layer is being entered are seen (the hooks are active around the layer's
``_gradient_checkpointing_func`` call, and the checkpoint's own hooks are innermost inside it; the recompute in
backward calls the layer's function directly): the layer inputs, never the layer's intermediates, the final norm's or the
loss's saved tensors (those are used first in backward; moving them would cost copies and save nothing).

The copies overlap the compute: the D2H copy runs on a side stream after an event of the compute stream, and
``record_stream`` keeps the caching allocator from reusing the device memory before it ends; in backward the copy
of the previous layer's inputs (in forward order) is issued while the current layer is recomputed.

Rules: parameters and buffers are never offloaded (``nn.Parameter``, or the storage of any of the model's
parameters/buffers); tensors under ``min_bytes`` stay where they are; a tensor saved several times in one forward
(the same live tensor object: RoPE tables a model passes positionally to every layer) is copied once. CPU tensors are left alone unless ``include_cpu`` (tests: the same bookkeeping, copies between CPU
tensors).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_MIN_BYTES = 1 << 20
"""Tensors smaller than this (1 MiB) stay on the device: a layer input is ``tokens x hidden x 2`` bytes (64 MiB for
the 8B shape at 8k tokens), smaller saved tensors (masks, position ids) are not worth a copy and a stream sync."""

_STATE_ATTR = "_int4lora_activation_offloader"


def checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of ``model`` that gradient checkpointing recomputes (transformers'
    ``GradientCheckpointingLayer`` modules with ``gradient_checkpointing`` set), in module order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [
        m
        for m in model.modules()
        if isinstance(m, GradientCheckpointingLayer) and getattr(m, "gradient_checkpointing", False)
    ]


class _Offloaded:
    """One offloaded tensor: its host copy, and (while in backward) its device copy."""

    __slots__ = ("seq", "group", "index", "host", "device", "packs", "d2h_event", "dev", "h2d_event", "__weakref__")

    def __init__(self, seq: int, group: list, host: torch.Tensor, device: torch.device, d2h_event: Any):
        self.seq, self.group, self.index = seq, group, len(group)
        self.host, self.device, self.d2h_event = host, device, d2h_event
        self.packs = 1  # how many saves share this copy; each unpack consumes one
        self.dev: torch.Tensor | None = None
        self.h2d_event: Any = None


class ActivationOffloader(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that move large device tensors to host memory and back (see the module docstring).

    Args:
        model: the model whose parameters and buffers are never offloaded.
        min_bytes: tensors smaller than this stay where they are.
        prefetch: in backward, how many earlier offloaded tensors (forward order) to copy back ahead.
        include_cpu: offload CPU tensors too (copies between CPU tensors; the test path of the bookkeeping).

    ``stats`` counts the current forward's offloaded tensors (``offloaded``, ``bytes``, ``deduplicated``) and the
    backward's copies back (``prefetched``, ``fetched``: copied on demand). ``trace``, when set to a list, records
    ``("offload" | "prefetch" | "fetch" | "use", seq)`` events in order.
    """

    def __init__(
        self, model: nn.Module, min_bytes: int = DEFAULT_MIN_BYTES, prefetch: int = 1, include_cpu: bool = False
    ):
        super().__init__(self._pack, self._unpack)
        self.model_ref = weakref.ref(model)
        self.min_bytes, self.prefetch, self.include_cpu = int(min_bytes), int(prefetch), include_cpu
        self.stats: dict[str, int] = {}
        self.trace: list | None = None
        self._group: list = []
        self._seen: dict[int, tuple[weakref.ref, weakref.ref]] = {}  # id(tensor) -> (tensor, its copy)
        self._protected: set[int] = set()
        self._seq = 0
        self._streams: dict[torch.device, tuple[Any, Any]] = {}
        self._active: list[nn.Module] = []
        self.layers: list[nn.Module] = []
        self.entered: set[int] = set()  # id() of the layers entered in this forward
        self.new_forward()

    # -- scope: around the layers' checkpoint calls --------------------------------------------------------------

    def new_forward(self) -> None:
        """Start a forward pass: a new prefetch order and dedupe table; refresh the parameter storages."""
        self._group, self._seen, self.entered = [], {}, set()
        self.stats = {"offloaded": 0, "bytes": 0, "deduplicated": 0, "prefetched": 0, "fetched": 0}
        model = self.model_ref()
        self._protected = set()
        if model is not None:
            for tensor in (*model.parameters(), *model.buffers()):
                tensor = getattr(tensor, "_local_tensor", tensor)  # an FSDP2 DTensor: its shard
                if tensor.device.type != "meta":
                    try:
                        self._protected.add(tensor.untyped_storage().data_ptr())
                    except (RuntimeError, NotImplementedError):  # a tensor subclass without a storage
                        continue

    def enter(self, module: nn.Module) -> None:
        """Make the hooks active for ``module``'s call (its inputs are about to be saved by the checkpoint)."""
        super().__enter__()
        self._active.append(module)

    def exit(self, module: nn.Module) -> None:
        """Undo :meth:`enter` for ``module``; a call that did not enter changes nothing."""
        if self._active and self._active[-1] is module:
            self._active.pop()
            super().__exit__()

    @property
    def active(self) -> bool:
        return bool(self._active)

    # -- pack ----------------------------------------------------------------------------------------------------

    def _eligible(self, t: torch.Tensor) -> bool:
        if isinstance(t, nn.Parameter) or t.layout is not torch.strided or t.is_sparse:
            return False
        if t.device.type != "cuda" and not (self.include_cpu and t.device.type == "cpu"):
            return False
        if t.numel() == 0 or t.numel() * t.element_size() < self.min_bytes or type(t) is not torch.Tensor:
            # empty (torch <= 2.11's checkpoint saves a 0-element marker with the inputs), small, or a tensor
            # subclass (DTensor, FP8 tensors) whose storage is not plain
            return False
        return t.untyped_storage().data_ptr() not in self._protected

    def _pack(self, t: torch.Tensor) -> Any:
        if not self._eligible(t):
            return t
        # The same tensor object saved again (a RoPE table passed to every layer) shares one copy. Identity, not
        # the address: a layer input freed after its copy leaves its address (and shape, and version 0) to the next
        # layer's input, which must get its own copy.
        seen = self._seen.get(id(t))
        handle = seen[1]() if seen is not None and seen[0]() is t else None
        if handle is not None:
            handle.packs += 1
            self.stats["deduplicated"] += 1
            return handle
        if t.device.type == "cuda":
            host, event = self._copy_to_host(t)
        else:
            host, event = t.detach().clone(memory_format=torch.contiguous_format), None
        self._seq += 1
        handle = _Offloaded(self._seq, self._group, host, t.device, event)
        self._group.append(weakref.ref(handle))
        self._seen[id(t)] = (weakref.ref(t), weakref.ref(handle))
        self.stats["offloaded"] += 1
        self.stats["bytes"] += host.numel() * host.element_size()
        if self.trace is not None:
            self.trace.append(("offload", handle.seq))
        return handle

    def _stream(self, device: torch.device, which: int) -> Any:
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[device][which]

    def _copy_to_host(self, t: torch.Tensor) -> tuple[torch.Tensor, Any]:
        compute = torch.cuda.current_stream(t.device)
        side = self._stream(t.device, 0)
        side.wait_stream(compute)  # t is complete once the compute stream's queued work is
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        with torch.cuda.stream(side):
            host.copy_(t.detach(), non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
        t.record_stream(side)  # its memory is not reused before the copy ends, however soon t is freed
        return host, event

    # -- unpack --------------------------------------------------------------------------------------------------

    def _unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Offloaded):
            return packed
        if packed.dev is None:
            self._fetch(packed, "fetch")
        for earlier in self._earlier(packed):
            self._fetch(earlier, "prefetch")
        tensor = packed.dev
        if packed.h2d_event is not None:
            torch.cuda.current_stream(packed.device).wait_event(packed.h2d_event)
        if self.trace is not None:
            self.trace.append(("use", packed.seq))
        packed.packs -= 1
        if packed.packs <= 0:  # every save has its tensor; a further unpack copies again
            packed.dev, packed.h2d_event = None, None
        return tensor

    def _earlier(self, handle: _Offloaded):
        """Up to ``prefetch`` offloaded tensors saved before ``handle`` in its forward, not on the device yet."""
        found = 0
        for i in range(handle.index - 1, -1, -1):
            if found >= self.prefetch:
                return
            other = handle.group[i]()
            if other is None or other.packs <= 0:
                continue
            found += 1
            if other.dev is None:
                yield other

    def _fetch(self, handle: _Offloaded, kind: str) -> None:
        self.stats["prefetched" if kind == "prefetch" else "fetched"] += 1
        if self.trace is not None:
            self.trace.append((kind, handle.seq))
        if handle.device.type != "cuda":
            handle.dev = handle.host.clone()
            return
        compute = torch.cuda.current_stream(handle.device)
        side = self._stream(handle.device, 1)
        dev = torch.empty(handle.host.shape, dtype=handle.host.dtype, device=handle.device)  # compute's pool
        side.wait_stream(compute)  # the block's earlier users on the compute stream are done
        side.wait_event(handle.d2h_event)  # the host copy is complete
        with torch.cuda.stream(side):
            dev.copy_(handle.host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
        dev.record_stream(side)
        handle.dev, handle.h2d_event = dev, event


def _offloading_checkpoint(layer: nn.Module, offloader: ActivationOffloader):
    """``layer``'s checkpoint function with the offloader's hooks active around it.

    transformers calls ``layer._gradient_checkpointing_func(function, *args)`` once per forward; the checkpoint saves
    the inputs under the hooks active at that moment (these) and pushes its own hooks for the layer's inside. The
    recompute in backward calls ``function`` directly, without these hooks. (Module hooks would not do: transformers
    <= 5.17 checkpoints ``__call__``, so forward pre-hooks run inside the checkpoint, and again in the recompute.)"""
    original = layer._gradient_checkpointing_func

    def checkpointed(function, *args, **kwargs):
        # A forward starts at a layer already run in this one: not necessarily the first checkpointed layer, which
        # need not run in every forward (a vision tower on text-only batches).
        if id(layer) in offloader.entered:
            offloader.new_forward()
        offloader.entered.add(id(layer))
        offloader.enter(layer)
        try:
            return original(function, *args, **kwargs)
        finally:
            offloader.exit(layer)

    checkpointed._int4lora_original = original
    return checkpointed


def enable_activation_offload(
    model: nn.Module, min_bytes: int = DEFAULT_MIN_BYTES, prefetch: int = 1, include_cpu: bool = False
) -> ActivationOffloader:
    """Offload the inputs of ``model``'s checkpointed decoder layers (see the module docstring); returns the
    offloader (its ``stats``). Replaces an earlier call's; :func:`disable_activation_offload` undoes it.

    Raises:
        ValueError: ``model`` has no checkpointed layer (enable gradient checkpointing first).
    """
    disable_activation_offload(model)
    layers = checkpointed_layers(model)
    if not layers:
        raise ValueError("activation offloading needs gradient checkpointing: no checkpointed decoder layer found")
    offloader = ActivationOffloader(model, min_bytes=min_bytes, prefetch=prefetch, include_cpu=include_cpu)
    for layer in layers:
        layer._gradient_checkpointing_func = _offloading_checkpoint(layer, offloader)
    offloader.layers = layers
    model.__dict__[_STATE_ATTR] = offloader
    logger.info(
        "activation offloading: the inputs of %d checkpointed layers go to host memory (tensors >= %d bytes)",
        len(layers),
        min_bytes,
    )
    return offloader


def disable_activation_offload(model: nn.Module) -> bool:
    """Undo :func:`enable_activation_offload`; returns whether it was on."""
    offloader = model.__dict__.pop(_STATE_ATTR, None)
    if offloader is None:
        return False
    for layer in offloader.layers:
        original = getattr(layer._gradient_checkpointing_func, "_int4lora_original", None)
        if original is not None:
            layer._gradient_checkpointing_func = original
    while offloader.active:
        offloader.exit(offloader._active[-1])
    return True


def activation_offloader(model: nn.Module) -> ActivationOffloader | None:
    """The offloader :func:`enable_activation_offload` put on ``model``, or None."""
    return model.__dict__.get(_STATE_ATTR)
