"""Launching Triton kernels with less host work; the one module that relies on Triton's private internals.

A training step launches several hundred small kernels (dequantization, norms, SwiGLU), and at batch size 1 the
step waits on the CPU, not the GPU. ``kernel[grid](*args, **constexprs)`` binds the arguments, computes the
specialization key and looks the compiled kernel up on every call. Two ways around that, both built on
:func:`_prepare` (the compiled kernel for arguments like these) and :func:`_run` (call it directly):

- :class:`DirectLauncher` (norm, SwiGLU, cross-entropy): does the lookup once per *specialization* it has seen. Its
  key is at least as fine as Triton's own: each tensor's dtype and whether its address is 16-byte aligned, each
  integer's ``== 1`` / ``% 16 == 0`` / 64-bit class, the constexprs and the launch options; so a hit always means
  the very kernel Triton would have picked.
- :class:`Replay` (a layer's dequantization): one :class:`KernelLaunch` made once the ordinary way, then repeated
  with a new output tensor and every other argument the same.

The internals used (Triton 3.6): ``JITFunction.warmup`` / ``arg_names``, and ``CompiledKernel.run`` / ``function`` /
``packed_metadata``. When they differ (another Triton), under the CPU interpreter, or with
``INT4LORA_KERNELS=public`` (:mod:`int4lora_train.kernels.backend`), every launch is the ordinary ``kernel[grid]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from int4lora_train.kernels.backend import prepared_launches

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelLaunch:
    """One launch, ``kernel[grid](*args, **kwargs)``; ``out_index`` is the position of the output tensor in ``args``
    (a :class:`Replay` swaps a new output in there)."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict
    out_index: int

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)


class Replay:
    """``launch`` made now, the ordinary way; then ``replay(out)`` repeats it into ``out`` (same arguments otherwise).

    The caller guarantees that ``out`` is placed like the first output (dtype, device, row stride, 16-byte
    alignment), so that the prepared kernel is the one Triton would pick.
    """

    def __init__(self, launch: KernelLaunch) -> None:
        launch()
        self.kernel, self.grid, self.kwargs, self.out_index = (
            launch.kernel,
            launch.grid,
            launch.kwargs,
            launch.out_index,
        )
        self.prepared = _prepare(launch.kernel, launch.grid, launch.args, launch.kwargs)
        self.args = list(launch.args)
        # Hold no reference to the first output: a replay lives as long as its layer, and every layer makes one in
        # the first step, so a kept output would keep a whole model's dense weights alive.
        self.args[self.out_index] = None

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        args = self.args
        args[self.out_index] = out
        try:
            if self.prepared is not None:
                _run(self.prepared, self.grid, args)
            else:
                self.kernel[self.grid](*args, **self.kwargs)
        finally:
            args[self.out_index] = None
        return out


def _arg_key(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.data_ptr() % 16 == 0)
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, int):
        return ("i", value == 1, value % 16 == 0, -(2**31) <= value < 2**31)
    if isinstance(value, float):
        return "f"
    return ("o", value)


class DirectLauncher:
    """``launcher(grid, *args, **constexprs_and_options)`` == ``kernel[grid](*args, **constexprs_and_options)``."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self._prepared: dict[tuple, tuple] = {}
        self._direct = prepared_launches() and _compiled_jit(kernel)

    def __call__(self, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
        if not self._direct:
            self.kernel[grid](*args, **kwargs)
            return
        key = (tuple(_arg_key(a) for a in args), tuple(sorted(kwargs.items())))
        prepared = self._prepared.get(key)
        if prepared is not None:
            _run(prepared, grid, args)
            return
        self.kernel[grid](*args, **kwargs)  # compiles if needed, and launches this call the ordinary way
        prepared = _prepare(self.kernel, grid, args, kwargs)
        if prepared is None:
            self._direct = False
        else:
            self._prepared[key] = prepared


# ------------------------------------------------------------------------------------------------ Triton internals

_UNPREPARABLE: set[int] = set()  # id() of kernels whose preparation failed once: Triton's internals moved


def _prepare(kernel: Any, grid: tuple[int, ...], args: tuple, kwargs: dict) -> tuple | None:
    """``(compiled kernel, constexpr values)`` for arguments like these, for :func:`_run`; None when the ordinary
    launch must be used (interpreter, ``INT4LORA_KERNELS=public``, or Triton internals other than expected)."""
    if not prepared_launches() or id(kernel) in _UNPREPARABLE or not _compiled_jit(kernel):
        return None
    try:
        compiled = kernel.warmup(*args, grid=grid, **kwargs)
        names = list(kernel.arg_names)
        if hasattr(compiled, "result"):
            compiled = compiled.result()
        compiled.run  # noqa: B018 - loads the module and builds the launcher now, so failures show here
        if not all(hasattr(compiled, a) for a in ("function", "packed_metadata")):
            raise AttributeError("CompiledKernel lacks function / packed_metadata")
        # Runtime arguments are passed positionally, so the keyword ones are the signature's tail.
        tail = names[len(args) :]
        if not all(n in kwargs for n in tail):
            raise TypeError(f"parameters {[n for n in tail if n not in kwargs]} not passed by keyword")
        return compiled, [kwargs[n] for n in tail]
    except Exception as exc:  # Triton internals moved: keep the ordinary launch for this kernel
        logger.info("prepared Triton launch unavailable for %s (%s); using kernel[grid]", kernel, exc)
        _UNPREPARABLE.add(id(kernel))
        return None


def _run(prepared: tuple, grid: tuple[int, ...], args) -> None:
    """Launch what :func:`_prepare` returned with new runtime ``args`` (the first one a tensor)."""
    compiled, constexprs = prepared
    grid0, grid1, grid2 = (tuple(grid) + (1, 1))[:3]
    stream = torch.cuda.current_stream(args[0].device).cuda_stream
    compiled.run(
        grid0, grid1, grid2, stream, compiled.function, compiled.packed_metadata, None, None, None, *args, *constexprs
    )


def _compiled_jit(kernel: Any) -> bool:
    """A compiled-mode Triton kernel (the CPU interpreter's kernels are launched the ordinary way)."""
    try:
        from triton.runtime import JITFunction
    except ImportError:
        return False
    return isinstance(kernel, JITFunction) and hasattr(kernel, "warmup") and hasattr(kernel, "arg_names")
