"""How one ``Int4Linear`` turns its INT4 buffers into its dense weight ``[out, in]``: the layer's *dequantizer*.

::

    select_dequantizer(device, ..., backend, cache)       once per layer and device (Int4Linear.dequantizer)
      CachedDequantizer   cache mode: the dense copy an INT4Unpacker keeps under its memory budget
      TritonDequantizer   kernels.backend.use_triton(device, backend): the fused kernel (kernels.dequant), its launch
                          prepared once and replayed
      TorchDequantizer    otherwise: the torch reference (quant.dequant.dequantize_torch), any device

    dequantizer(buffers, dtype, out=None) -> [out, in] in dtype (into ``out`` when given: a projection group passes
                                              a row slice of its stacked weight)

``buffers`` is the layer's ``(packed, scales, zero_points, g_idx)`` as it stores them: a per-tensor scale (and zero
point) as one ``[1, G]`` row (:func:`compact_rows`), which :func:`int4_weight_view` expands to ``[out, G]`` again.

Why a prepared launch: validating the weight, picking a tile shape and binding the kernel's arguments are the same
work on every call for a layer whose buffers never change, and at batch size 1 the training step waits on that host
work. :class:`TritonDequantizer` asks :func:`~int4lora_train.kernels.dequant.plan_dequant_launch` for the launch on
the first call for an output dtype and placement (row stride, 16-byte alignment), makes it, and keeps it as a
:class:`~int4lora_train.kernels.launch.Replay`; later calls replay it into their output: the same kernel with the
same arguments, so the same bits. A replay serves while the buffers are the same tensor objects: in-place updates
(``load_state_dict``) keep them; ``.to()`` drops the layer's dequantizer, and new tensors (FSDP's re-registration
as parameters, an assigned buffer) get a new launch.
"""

from __future__ import annotations

from typing import Any

import torch

from int4lora_train.kernels.backend import use_triton
from int4lora_train.kernels.launch import Replay
from int4lora_train.quant.dequant import dequantize_torch
from int4lora_train.quant.layout import Int4Weight

Int4Buffers = tuple  # (packed, scales, zero_points, g_idx) of one layer, as the layer stores them


def int4_weight_view(buffers: Int4Buffers, in_features: int, group_size: int) -> Int4Weight:
    """The canonical weight viewing a layer's buffers: no copy and no validation (they were validated when stored);
    one-row ``[1, G]`` scales / zero points are expanded to stride-0 ``[out, G]`` views."""
    packed, scales, zero_points, g_idx = buffers
    out_features = packed.shape[0]
    return Int4Weight(
        packed=packed,
        scales=_expand_rows(scales, out_features),
        in_features=in_features,
        group_size=group_size,
        zero_points=None if zero_points is None else _expand_rows(zero_points, out_features),
        g_idx=g_idx,
    )


def compact_rows(t: torch.Tensor) -> torch.Tensor:
    """``[out, G]`` whose rows are a stride-0 broadcast of one row -> that row, ``[1, G]`` (so that ``.to()`` and
    ``state_dict()`` see a plain tensor); others unchanged. :func:`int4_weight_view` undoes it."""
    if t.dim() == 2 and t.shape[0] > 1 and t.stride(0) == 0:
        return t[:1].contiguous()
    return t


def _expand_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == 1 and rows != 1:
        return t.expand(rows, t.shape[1])
    return t


class Dequantizer:
    """One layer's way to its dense weight (see the module docstring); subclasses define ``__call__``."""

    def __init__(self, device: torch.device, in_features: int, group_size: int) -> None:
        self.device, self.in_features, self.group_size = device, in_features, group_size

    def weight(self, buffers: Int4Buffers) -> Int4Weight:
        return int4_weight_view(buffers, self.in_features, self.group_size)

    def __call__(self, buffers: Int4Buffers, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device})"


class TorchDequantizer(Dequantizer):
    """The torch reference, on any device; allocates a few ``[out, in]`` temporaries."""

    def __call__(self, buffers: Int4Buffers, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        dense = dequantize_torch(self.weight(buffers), dtype)
        return dense if out is None else out.copy_(dense)


class TritonDequantizer(Dequantizer):
    """The fused Triton kernel, one prepared launch per output dtype and placement (see the module docstring)."""

    def __init__(self, device: torch.device, in_features: int, group_size: int) -> None:
        super().__init__(device, in_features, group_size)
        self._replays: dict[tuple, tuple[Int4Buffers, Replay]] = {}

    def __call__(self, buffers: Int4Buffers, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty(buffers[0].shape[0], self.in_features, dtype=dtype, device=self.device)
        placement = (dtype, out.stride(0), out.data_ptr() % 16 == 0)
        held = self._replays.get(placement)
        if held is not None and _same_tensors(held[0], buffers):
            return held[1](out)
        from int4lora_train.kernels import dequant  # imports Triton, an optional dependency

        weight = self.weight(buffers)
        launch = dequant.plan_dequant_launch(weight, dequant.output_buffer(weight, dtype, out))
        if launch is not None:  # None: no rows, nothing to write
            self._replays[placement] = (tuple(buffers), Replay(launch))  # Replay makes this first launch
        return out


class CachedDequantizer(Dequantizer):
    """Cache mode: the dense weight from an :class:`~int4lora_train.quant.unpacker.INT4Unpacker` (one budgeted LRU
    for a whole model), kept under ``key``; shared by the calls, so it is copied into ``out`` when one is given."""

    def __init__(self, device: torch.device, in_features: int, group_size: int, cache: Any, key: str) -> None:
        super().__init__(device, in_features, group_size)
        self.cache, self.key = cache, key

    def __call__(self, buffers: Int4Buffers, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        dense = self.cache.get_dense(self.key, self.weight(buffers), dtype)
        return dense if out is None else out.copy_(dense)


def select_dequantizer(
    device: torch.device,
    in_features: int,
    group_size: int,
    backend: str | None = None,
    cache: Any = None,
    cache_key: str | None = None,
) -> Dequantizer:
    """The dequantizer for a layer on ``device``: cache mode when ``cache`` is given, else the kernel that
    :func:`~int4lora_train.kernels.backend.use_triton` picks for ``backend``."""
    if cache is not None:
        return CachedDequantizer(device, in_features, group_size, cache, cache_key)
    if use_triton(device, backend):
        return TritonDequantizer(device, in_features, group_size)
    return TorchDequantizer(device, in_features, group_size)


def _same_tensors(held: Int4Buffers, buffers: Int4Buffers) -> bool:
    return held[0] is buffers[0] and held[1] is buffers[1] and held[2] is buffers[2] and held[3] is buffers[3]
