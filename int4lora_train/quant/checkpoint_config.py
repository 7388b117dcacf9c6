"""The ``quantization_config`` block of a checkpoint's ``config.json``: parse it (each format's parser, found by
``quant_method`` in the format registry) and read it from a checkpoint directory.

The formats' parsers understand (FORMATS.md §1.5, §3.4, §4.3):

- ``"compressed-tensors"`` (llm-compressor): ``config_groups`` of ``{targets, weights, input_activations, ...}``
  plus a top-level ``ignore``; only ``pack-quantized`` INT4 weights (W4A16, W4A16_ASYM, channel / tensor
  variants, ``actorder``) are supported.
- ``"gptq"`` (AutoGPTQ / GPTQModel / optimum): ``bits``, ``group_size``, ``desc_act``, ``sym``,
  ``checkpoint_format`` / ``format`` (``gptq`` = v1 zero-minus-one, ``gptq_v2``).
- ``"awq"`` (AutoAWQ): ``bits``, ``group_size``, ``zero_point``, ``version`` / ``format`` (only ``gemm``).

In a compressed-tensors block, weight-only 8-bit groups (int8 ``pack-quantized`` / ``int-quantized``, FP8
``float-quantized``) beside INT4 ones parse to a :class:`WeightScheme` with ``dequantize=True``: the loader dequantizes
them at load (``quant/dequant_at_load.py``, docs/formats.md "Mixed schemes"). Everything else (other bit widths, FP4,
sparse or Marlin-2:4 layouts, activation quantization, transforms) is an :class:`UnsupportedFormatError` that says
what was found and what is supported. The parsed result
(:class:`Int4CheckpointConfig`, :class:`WeightScheme`) and the module matching live in :mod:`.scheme`; the block
writers (:func:`compressed_tensors_config`, :func:`gptq_config`, :func:`awq_config`) with their formats.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from int4lora_train.errors import CheckpointError, UnsupportedFormatError
from int4lora_train.quant.checkpoint_dir import read_json
from int4lora_train.quant.formats import (
    awq_config,
    checkpoint_formats,
    compressed_tensors_config,
    format_for_quant_method,
    gptq_config,
)
from int4lora_train.quant.formats.base import supported
from int4lora_train.quant.scheme import (
    CT_FORMAT,
    STRATEGIES,
    Int4CheckpointConfig,
    TargetGroup,
    WeightScheme,
    check_block_types,
)

__all__ = [
    "CT_FORMAT",
    "STRATEGIES",
    "Int4CheckpointConfig",
    "TargetGroup",
    "WeightScheme",
    "awq_config",
    "compressed_tensors_config",
    "gptq_config",
    "parse_quantization_config",
    "read_checkpoint_quant_config",
]


def parse_quantization_config(block: Mapping | object, source: str = "config.json") -> Int4CheckpointConfig:
    """Parse a ``quantization_config`` block (a dict, or a transformers config object with ``to_dict()``).

    ``source`` names where the block came from (a path) for error messages.
    """
    if not isinstance(block, Mapping):
        to_dict = getattr(block, "to_dict", None)
        if to_dict is None:
            raise CheckpointError(f"{source}: quantization_config must be a JSON object, got {type(block).__name__}.")
        block = to_dict()
    if not isinstance(block, Mapping):
        raise CheckpointError(f"{source}: quantization_config must be a JSON object, got {type(block).__name__}.")
    method = block.get("quant_method")
    fmt = format_for_quant_method(method)
    if fmt is None:
        methods = [f.quant_method for f in checkpoint_formats()]
        raise UnsupportedFormatError(
            f"{source}: quantization_config.quant_method is {method!r}; {supported()} (quant_method one of {methods})."
        )
    check_block_types(block, source)
    try:
        return fmt.parse_config(dict(block), source)
    except (AttributeError, TypeError, KeyError) as exc:  # a shape of block no check above foresaw
        raise CheckpointError(
            f"{source}: quantization_config is malformed for quant_method {method!r} ({type(exc).__name__}: {exc}); "
            "compare it with the format's documented block and fix config.json (or re-export the checkpoint)."
        ) from exc


def read_checkpoint_quant_config(directory: str | Path, required: bool = False) -> Int4CheckpointConfig | None:
    """Parse ``<directory>/config.json``'s ``quantization_config``; None when the model is not quantized (an error
    with ``required``)."""
    path = Path(directory) / "config.json"
    block = read_json(path, "config.json").get("quantization_config")
    if block is None:
        if required:
            raise CheckpointError(
                f"{path}: no quantization_config, so this is not an INT4 checkpoint ({supported()}). Point at an "
                "INT4 checkpoint, or load the dense model with transformers and call quantize_model_rtn()."
            )
        return None
    return parse_quantization_config(block, source=str(path))
