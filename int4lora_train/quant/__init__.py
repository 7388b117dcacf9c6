"""INT4 weights: the canonical layout, the format registry (readers / writers), the checkpoint-directory reader,
dequantization, the cached unpacker, the packer."""

from int4lora_train.quant.checkpoint_config import (
    Int4CheckpointConfig,
    WeightScheme,
    awq_config,
    compressed_tensors_config,
    gptq_config,
    parse_quantization_config,
    read_checkpoint_quant_config,
)
from int4lora_train.quant.checkpoint_dir import CheckpointDir
from int4lora_train.quant.dequant import dequantize, dequantize_torch
from int4lora_train.quant.formats import (
    FORMATS,
    Int4Format,
    detect_format,
    from_awq,
    from_compressed_tensors,
    from_gptq,
    from_uint8,
    is_int4_module,
    read_int4_weight,
    read_module_int4_weight,
    to_awq,
    to_compressed_tensors,
    to_gptq,
)
from int4lora_train.quant.layout import Int4Weight
from int4lora_train.quant.packer import quantize_rtn, save_int4_checkpoint, write_int4_checkpoint
from int4lora_train.quant.unpacker import INT4Unpacker, get_unpacker

__all__ = [
    "CheckpointDir",
    "FORMATS",
    "INT4Unpacker",
    "Int4CheckpointConfig",
    "Int4Format",
    "Int4Weight",
    "WeightScheme",
    "awq_config",
    "compressed_tensors_config",
    "dequantize",
    "dequantize_torch",
    "detect_format",
    "from_awq",
    "from_compressed_tensors",
    "from_gptq",
    "from_uint8",
    "get_unpacker",
    "gptq_config",
    "is_int4_module",
    "parse_quantization_config",
    "quantize_rtn",
    "read_checkpoint_quant_config",
    "read_int4_weight",
    "read_module_int4_weight",
    "save_int4_checkpoint",
    "to_awq",
    "to_compressed_tensors",
    "to_gptq",
    "write_int4_checkpoint",
]
