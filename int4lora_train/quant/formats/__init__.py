"""The INT4 formats: one file per format, and the one ordered list that registers them (:data:`FORMATS`).

::

    format               weight                         zero points                      scales
    compressed-tensors   weight_packed int32 [out,in/8]  weight_zero_point int32          weight_scale [1] /
                         (K packed, sequential)         [out/8, G] (packed along out;    [out, 1] / [out, G]
                         + weight_shape [2]             tensor strategy: int8 [1])
    GPTQ (v1 / v2)       qweight int32 [in/8, out]      qzeros int32 [G, out/8]          scales [G, out]
                         (K packed, sequential)         (v1 stores zero - 1)
    AWQ GEMM             qweight int32 [in, out/8]      qzeros int32 [G, out/8]          scales [G, out]
                         (N packed, interleaved)        (same interleave)
    uint8 (seed)         weight uint8 [out, in/2]       unpacked, as given               [1] / [out] / [out, G]

    compressed_tensors.py  gptq.py  awq.py  uint8.py    one Int4Format object each (FORMAT), with its readers,
                                                        writers and quantization_config parser / writer
    base.py                                             Int4Format, ReadParams, the checks every reader shares

The stored nibble ``u`` is the canonical one in every format: ``q = u - 8`` for compressed-tensors' signed values
and for GPTQ / AWQ's unsigned ``u``, whose zero points ``z`` become ``zp = z - 8`` (``(u - z) = (q - zp)``). So the
conversions move nibbles between layouts but never change a value. Bit layouts: FORMATS.md. The nibble order, the
offset and the group rule come from :mod:`int4lora_train.quant.layout` only.

Modules are recognised by their tensors (parameters or buffers), never by importing the libraries that made them.
The loader, the packer, the fingerprint, inspection and surgery ask this registry; adding a format is one file and
one entry in :data:`FORMATS` (docs/formats.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from int4lora_train.errors import Int4FormatError, UnsupportedFormatError
from int4lora_train.quant.formats import awq, compressed_tensors, gptq, uint8
from int4lora_train.quant.formats.awq import AWQ_ORDER, AWQ_REVERSE_ORDER, awq_config, awq_permute, from_awq, to_awq
from int4lora_train.quant.formats.base import Int4Format, ReadParams, describe, describe_all
from int4lora_train.quant.formats.compressed_tensors import (
    compressed_tensors_config,
    from_compressed_tensors,
    to_compressed_tensors,
)
from int4lora_train.quant.formats.gptq import GPTQ_V1_ZERO_OFFSET, from_gptq, gptq_config, to_gptq
from int4lora_train.quant.formats.uint8 import from_uint8
from int4lora_train.quant.layout import Int4Weight

logger = logging.getLogger(__name__)

FORMATS: list[Int4Format] = [compressed_tensors.FORMAT, gptq.FORMAT, awq.FORMAT, uint8.FORMAT]
"""Every INT4 format, in detection order: a module's tensors are in the first format whose ``matches`` accepts them."""

__all__ = [
    "AWQ_ORDER",
    "AWQ_REVERSE_ORDER",
    "FORMATS",
    "GPTQ_V1_ZERO_OFFSET",
    "Int4Format",
    "ReadParams",
    "awq_config",
    "awq_permute",
    "checkpoint_formats",
    "compressed_tensors_config",
    "detect_format",
    "find_format",
    "format_for_quant_method",
    "format_named",
    "from_awq",
    "from_compressed_tensors",
    "from_gptq",
    "from_uint8",
    "gptq_config",
    "int4_markers",
    "is_int4_module",
    "is_int4_tensor_name",
    "module_tensors",
    "read_int4_weight",
    "read_module_int4_weight",
    "to_awq",
    "to_compressed_tensors",
    "to_gptq",
]


# ------------------------------------------------------------------------------------------------------ lookups


def checkpoint_formats() -> list[Int4Format]:
    """The formats checkpoints are stored in (those with a ``quant_method``), in registry order."""
    return [fmt for fmt in FORMATS if fmt.quant_method is not None]


def format_named(name: str, in_checkpoints: bool = False) -> Int4Format:
    """The format called ``name`` (``WeightScheme.format``); with ``in_checkpoints``, one checkpoints are stored in."""
    candidates = checkpoint_formats() if in_checkpoints else FORMATS
    for fmt in candidates:
        if fmt.name == name:
            return fmt
    what = "checkpoint format" if in_checkpoints else "INT4 format"
    raise UnsupportedFormatError(f"{what} {name!r} is not supported; choose one of {[fmt.name for fmt in candidates]}.")


def format_for_quant_method(quant_method) -> Int4Format | None:
    """The format of a ``quantization_config`` whose ``quant_method`` is this, or None."""
    return next((fmt for fmt in checkpoint_formats() if fmt.quant_method == quant_method), None)


def find_format(tensors: Mapping[str, torch.Tensor | None]) -> Int4Format | None:
    """The format these module-local tensors are stored in (by names, dtypes and shapes), or None."""
    return next((fmt for fmt in FORMATS if fmt.matches(tensors)), None)


def detect_format(tensors: Mapping[str, torch.Tensor | None]) -> str | None:
    """The name of the format these tensors are stored in (``"compressed-tensors"``, ``"gptq"``, ``"awq"``,
    ``"uint8"``, ...) or None. GPTQ and AWQ share names; ``qweight [in/8, out]`` with ``scales [G, out]`` is GPTQ,
    ``qweight [in, out/8]`` with ``scales [G, 8 * qweight.shape[1]]`` is AWQ."""
    fmt = find_format(tensors)
    return None if fmt is None else fmt.name


def int4_markers() -> set[str]:
    """The tensor names that mark a checkpoint module as INT4 (``weight_packed``, ``qweight``, ...)."""
    return {fmt.marker for fmt in checkpoint_formats()}


def is_int4_tensor_name(local_name: str) -> bool:
    """Whether a module-local tensor name holds packed INT4 data: a format's marker, also when the packed parameter
    is not ``weight`` (compressed-tensors packs a fused MoE parameter ``gate_up_proj`` into ``gate_up_proj_packed``,
    as it packs ``weight`` into ``weight_packed``)."""
    return any(marker.removeprefix("weight_") in local_name for marker in int4_markers())


# -------------------------------------------------------------------------------------------------- reading


def read_int4_weight(tensors: Mapping[str, torch.Tensor | None], name: str = "weight", scheme=None) -> Int4Weight:
    """Any supported tensor set (module-local names) -> canonical. ``scheme``: a
    :class:`~int4lora_train.quant.scheme.WeightScheme` or a compressed-tensors ``QuantizationScheme`` /
    ``QuantizationArgs`` (for the group size, strategy and GPTQ version)."""
    fmt = find_format(tensors)
    params = ReadParams.from_scheme(scheme, name)
    if fmt is None:
        expected = "; ".join(f"{f.name} ({', '.join(f.required_tensor_names())})" for f in FORMATS)
        raise Int4FormatError(
            f"{name}: tensors {describe_all(tensors)} are not a known INT4 layout; expected one of: {expected}."
        )
    return fmt.read(tensors, name, params)


def read_module_int4_weight(module: torch.nn.Module, name: str = "module", scheme=None) -> Int4Weight | None:
    """The canonical INT4 weight held by ``module``, or None when it holds none.

    Recognised by tensors (parameters or buffers) and attributes, never by class: ``nn.Linear`` modules with
    compressed-tensors parameters (transformers 5.x with compressed-tensors >= 0.15), the older ``CompressedLinear``
    (``module.quantization_scheme`` gives the group size), GPTQ / AWQ quant-linear modules (``qweight``, ``qzeros``,
    ``scales`` [, ``g_idx``]; ``bits`` / ``w_bit``, ``group_size``, ``infeatures`` / ``in_features`` attributes
    when present) and a uint8 ``weight`` with ``weight_scale``. A quantized module of another bit width raises
    :class:`UnsupportedFormatError`; a malformed one :class:`Int4FormatError`.
    """
    tensors = module_tensors(module)
    fmt = find_format(tensors)
    scheme = scheme if scheme is not None else getattr(module, "quantization_scheme", None)
    params = ReadParams.from_scheme(scheme, name)
    bits = _module_bits(module, params)
    if fmt is None:
        _reject_other_quantized(module, tensors, name, bits)
        return None
    if bits not in (None, 4):
        raise UnsupportedFormatError(
            f"{name}: {type(module).__name__} is a {bits}-bit {fmt.name} module; only 4-bit weights are supported."
        )
    return fmt.read_module(module, tensors, name, params)


def is_int4_module(module: torch.nn.Module) -> bool:
    """True when ``module`` holds an INT4 weight in a supported layout (by tensor names and bit width; a malformed
    one is still True, and :func:`read_module_int4_weight` then says what is wrong)."""
    tensors = module_tensors(module)
    fmt = find_format(tensors)
    if fmt is None:
        return False
    try:
        bits = _module_bits(module, ReadParams.from_scheme(getattr(module, "quantization_scheme", None), "module"))
    except UnsupportedFormatError:
        return False
    return bits in (None, 4) and fmt.is_readable(tensors)


def module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's own parameters and buffers (not its children's) by local name, parameters detached (sharing
    their storage and in-place version counter)."""
    tensors = {key: value.detach() for key, value in module.named_parameters(recurse=False)}
    tensors.update(module.named_buffers(recurse=False))
    return tensors


def _module_bits(module: torch.nn.Module, params: ReadParams) -> int | None:
    for attr in ("bits", "w_bit"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return params.num_bits


def _reject_other_quantized(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], name: str, bits) -> None:
    """A module that is quantized, but not in an INT4 layout, is an error rather than 'not INT4'."""
    weight = tensors.get("weight")
    if weight is not None and not weight.is_floating_point() and tensors.get("weight_scale") is not None:
        raise UnsupportedFormatError(
            f"{name}: {type(module).__name__} holds a {describe(weight)} weight with weight_scale (an 8-bit "
            "int-quantized / FP8 layout); only INT4 weights are supported."
        )
    if (
        weight is not None
        and weight.is_floating_point()
        and weight.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    ):
        raise UnsupportedFormatError(f"{name}: weight is {describe(weight)} (FP8); only INT4 weights are supported.")
    for marker in sorted(int4_markers()):
        if tensors.get(marker) is not None:
            layouts = [fmt.layout for fmt in checkpoint_formats() if fmt.marker == marker]
            mismatch = f"match neither {' nor '.join(layouts)}" if len(layouts) > 1 else f"do not match {layouts[0]}"
            raise Int4FormatError(
                f"{name}: {type(module).__name__} has {marker} {describe(tensors[marker])} but its tensors "
                f"{describe_all(tensors)} {mismatch}."
            )
    if bits not in (None, 4) and weight is None:
        raise UnsupportedFormatError(f"{name}: a {bits}-bit quantized module; only 4-bit weights are supported.")
