"""Which kernels run: the one place that chooses between the Triton kernels and the torch references.

Every caller that could run a Triton kernel asks :func:`use_triton` with the tensor's device and the caller's
choice (a function's ``backend=`` argument, an ``Int4Linear``'s ``backend``)::

    choice     runs
    "auto"     Triton on CUDA when Triton imports, the torch reference elsewhere          (the default)
    "torch"    the torch reference, any device
    "triton"   the Triton kernel: on CUDA, or on the CPU in Triton's interpreter (``TRITON_INTERPRET=1`` set before
               the kernel module is imported; the tests do this)

One environment variable is the escape hatch, read here and nowhere else (once, on first use)::

    INT4LORA_KERNELS=auto     the default: Triton on CUDA, launched through prepared launches where Triton's
                              internals are the ones kernels/launch.py was written against (else the ordinary way)
    INT4LORA_KERNELS=public   Triton on CUDA, launched only through Triton's public API (``kernel[grid](...)``): for a
                              Triton version whose internals moved in a way the fast path does not notice
    INT4LORA_KERNELS=torch    the torch references everywhere: no Triton kernel runs unless a caller asks for
                              ``"triton"`` explicitly
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch

from int4lora_train.errors import ConfigError, UnsupportedFormatError

logger = logging.getLogger(__name__)

CHOICES = ("auto", "torch", "triton")
ENV_VAR = "INT4LORA_KERNELS"
ENV_CHOICES = ("auto", "public", "torch")


@functools.cache
def environment_choice() -> str:
    """``INT4LORA_KERNELS`` (see the module docstring), read and checked once."""
    value = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if value not in ENV_CHOICES:
        raise ConfigError(
            f"{ENV_VAR}={value!r} is not one of {ENV_CHOICES}: unset it (the default, auto), or set torch (no Triton "
            "kernels) or public (Triton without the prepared-launch fast path)"
        )
    if value != "auto":
        logger.info("%s=%s: %s", ENV_VAR, value, "torch kernels" if value == "torch" else "public Triton launches")
    return value


def use_triton(device: torch.device, choice: str | None = None) -> bool:
    """Whether a tensor on ``device`` goes through the Triton kernel for ``choice`` (None: ``"auto"``)."""
    if choice is None or choice == "auto":
        return device.type == "cuda" and environment_choice() != "torch" and triton_available()
    if choice == "torch":
        return False
    if choice == "triton":
        if not triton_available():
            raise UnsupportedFormatError(
                "the 'triton' kernel backend needs Triton, which does not import here; install it "
                "(pip install 'int4lora-train[triton]') or choose 'auto' or 'torch'"
            )
        return True
    raise UnsupportedFormatError(f"unknown kernel backend {choice!r}; choose one of {CHOICES}")


def prepared_launches() -> bool:
    """Whether kernels/launch.py may use its prepared launches (Triton internals); False under
    ``INT4LORA_KERNELS=public``."""
    return environment_choice() == "auto"


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (the kernels then run on CUDA, or anywhere under ``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        logger.info("Triton is not available (%s); using the torch kernels", exc)
        return False
    return True


def built_for_interpreter(kernel: Any) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (it then runs in Triton's CPU interpreter).

    ``triton.jit`` reads the variable when it decorates, so a kernel module imported before it was set stays
    compiled; the tests reload such modules (``tests/conftest.py``).
    """
    from triton.runtime import JITFunction

    return not isinstance(kernel, JITFunction)
