"""Per-layer prepared launches of the fused dequantization kernel, for the training step's hot path.

:func:`int4lora_train.quant.dequant.dequantize` validates the weight, picks a tile shape and binds the kernel's
arguments on every call; for a layer whose buffers never change that work is the same each time. A
:class:`DequantPlan` asks :func:`~int4lora_train.quant.triton_dequant.plan_dequant_launch` for a layer's launch
once (so it stays correct whatever tile or argument list that module chooses), and then replays it with a new
output buffer through :mod:`int4lora_train.modeling.launch_cache`. The output is the same
bits: same kernel, same arguments.

A plan is valid while the layer's buffers are the same tensors, for one output dtype and one output placement
(a fresh ``[out, in]`` tensor, or a row slice of a larger buffer at a fixed offset, as a projection group uses).
Anything else (other devices, cache mode, ``INT4LORA_DEQUANT_BACKEND=torch``) goes through ``dequantize``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from int4lora_train.quant.dequant import dequantize
from int4lora_train.quant.layout import Int4Weight

logger = logging.getLogger(__name__)


class DequantPlan:
    """The dequantization launch of one weight into outputs placed like ``out`` (see the module docstring)."""

    def __init__(self, weight: Int4Weight, dtype: torch.dtype, out: torch.Tensor) -> None:
        from int4lora_train.modeling.launch_cache import DirectLauncher
        from int4lora_train.quant.triton_dequant import plan_dequant_launch

        self.buffers = (weight.packed, weight.scales, weight.zero_points, weight.g_idx)
        self.dtype = dtype
        launch = plan_dequant_launch(weight, out)
        if launch is None:
            raise RuntimeError("an empty weight needs no launch")
        launch()
        grid, args, kwargs = launch.grid, launch.args, launch.kwargs
        self.grid, self.args, self.kwargs, self.out_position = grid, list(args), kwargs, launch.out_index
        self.out_aligned = out.data_ptr() % 16 == 0
        self.launcher = DirectLauncher(launch.kernel)
        self.prepared = self.launcher.prepare(grid, args, kwargs)
        # Hold no reference to this first output: a plan lives as long as its layer, and every layer makes one in
        # the first step, so a kept output would keep a whole model's dense weights alive until each plan's reuse.
        self.args[self.out_position] = None

    def valid_for(self, buffers: tuple, dtype: torch.dtype, out: torch.Tensor) -> bool:
        return (
            dtype == self.dtype
            and all(a is b for a, b in zip(buffers, self.buffers))
            and (out.data_ptr() % 16 == 0) == self.out_aligned
        )

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        args = self.args
        args[self.out_position] = out
        try:
            if self.prepared is not None:
                from int4lora_train.modeling.launch_cache import launch_prepared

                launch_prepared(self.prepared, self.grid, args)
            else:
                self.launcher.kernel[self.grid](*args, **self.kwargs)
        finally:
            args[self.out_position] = None  # hold no reference to the output
        return out


_FAST = os.environ.get("INT4LORA_FAST_DEQUANT", "1") != "0"
_MISSING = object()


def fast_dequantize(
    owner: Any, weight: Int4Weight, dtype: torch.dtype, out: torch.Tensor | None = None, slot: Any = None
) -> torch.Tensor:
    """``dequantize(weight, dtype)`` (into ``out`` when given), through ``owner``'s cached plan on CUDA.

    ``owner`` is the object the plans are cached on (the :class:`~int4lora_train.modeling.Int4Linear`); ``slot``
    names the output placement (None: a fresh tensor; a projection group passes its row offset).
    """
    backend = os.environ.get("INT4LORA_DEQUANT_BACKEND", "auto")
    if not _FAST or weight.device.type != "cuda" or backend == "torch":
        dense = dequantize(weight, dtype, backend=None if backend == "auto" else backend)
        return dense if out is None else out.copy_(dense)
    if out is None:
        out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    plans = owner.__dict__.setdefault("_dequant_plans", {})
    key = (dtype, slot)
    buffers = (weight.packed, weight.scales, weight.zero_points, weight.g_idx)
    plan = plans.get(key, _MISSING)
    if plan is not None and plan is not _MISSING and plan.valid_for(buffers, dtype, out):
        return plan(out)
    if plan is not None:
        try:
            plans[key] = DequantPlan(weight, dtype, out)  # launches once, the ordinary way
            return out
        except Exception as exc:  # the kernel module changed shape: plain dequantization for this layer
            logger.info("prepared dequantization unavailable (%s); using dequantize_triton()", exc)
            plans[key] = None
    from int4lora_train.quant.triton_dequant import dequantize_triton

    return dequantize_triton(weight, dtype, out=out)
