"""Launch a Triton kernel with less host work per call: a training step launches several hundred small kernels
(dequantization, norms, SwiGLU), and at batch size 1 the step waits on the CPU, not the GPU.

``kernel[grid](*args, **constexprs)`` binds the arguments, computes the specialization key and looks the compiled
kernel up on every call. :class:`DirectLauncher` does that once per *specialization* it has seen and then calls the
compiled kernel's launcher directly. Its key is at least as fine as Triton's own: each tensor's dtype and whether
its address is 16-byte aligned, each integer's ``== 1`` / ``% 16 == 0`` / 64-bit class, the constexprs and the
launch options; so a hit always means the very kernel Triton would have picked.

Falls back to the ordinary launch when Triton's internals differ from what this expects (other Triton versions),
under the CPU interpreter, or when ``INT4LORA_DIRECT_LAUNCH=0``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

logger = logging.getLogger(__name__)

_ENABLED = os.environ.get("INT4LORA_DIRECT_LAUNCH", "1") != "0"


def _compiled_jit(kernel: Any) -> bool:
    """A compiled-mode Triton kernel (the CPU interpreter's kernels are launched the ordinary way)."""
    try:
        from triton.runtime import JITFunction
    except ImportError:
        return False
    return isinstance(kernel, JITFunction) and hasattr(kernel, "warmup") and hasattr(kernel, "arg_names")


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
        self._compiled: dict[tuple, Any] = {}
        self._direct = _ENABLED and _compiled_jit(kernel)

    def __call__(self, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
        if not self._direct:
            self.kernel[grid](*args, **kwargs)
            return
        key = (tuple(_arg_key(a) for a in args), tuple(sorted(kwargs.items())))
        entry = self._compiled.get(key)
        if entry is None:
            self.kernel[grid](*args, **kwargs)  # compiles if needed, and launches this call the ordinary way
            entry = self.prepare(grid, args, kwargs)
            if entry is not None:
                self._compiled[key] = entry
            return
        launch_prepared(entry, grid, args)

    def prepare(self, grid, args: tuple, kwargs: dict) -> tuple | None:
        """``(compiled kernel, constexpr values)`` for arguments like these, for :func:`launch_prepared`; None when
        the direct launch is unavailable (then launch with ``kernel[grid]``). The caller guarantees that later
        arguments specialize the same way (same dtypes, alignments and integer classes)."""
        if not self._direct:
            return None
        try:
            compiled = self.kernel.warmup(*args, grid=grid, **kwargs)
            names = list(self.kernel.arg_names)
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
            logger.info("direct Triton launch unavailable for %s (%s); using kernel[grid]", self.kernel, exc)
            self._direct = False
            return None


def launch_prepared(entry: tuple, grid: tuple[int, ...], args: tuple) -> None:
    """Launch the kernel :meth:`DirectLauncher.prepare` returned with new runtime ``args`` (the first a tensor)."""
    compiled, constexprs = entry
    grid0, grid1, grid2 = (tuple(grid) + (1, 1))[:3]
    stream = torch.cuda.current_stream(args[0].device).cuda_stream
    compiled.run(
        grid0, grid1, grid2, stream, compiled.function, compiled.packed_metadata, None, None, None, *args, *constexprs
    )
