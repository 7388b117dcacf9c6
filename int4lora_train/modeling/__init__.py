"""INT4 models: ``Int4Linear``, the surgery over transformers models, the INT4 checkpoint loader, PEFT LoRA.

The training-speed features built on these live in :mod:`int4lora_train.speed`, the kernels in
:mod:`int4lora_train.kernels`. Importing this package installs the PEFT dispatch for ``Int4Linear`` (see
:func:`int4lora_train.modeling.peft_integration.install_peft_dispatch` for what it does and why), so that plain
``get_peft_model`` / ``PeftModel.from_pretrained`` wrap INT4 layers with :class:`Int4LoraLinear`.
"""

from int4lora_train.modeling.architectures import (
    ARCHITECTURES,
    ArchitectureSpec,
    architecture_for,
    find_fused_expert_modules,
    projection_names,
)
from int4lora_train.modeling.int4_linear import DenseWeightUnavailableError, Int4Linear, Int4LinearFunction
from int4lora_train.modeling.loader import load_int4_model, load_tokenizer
from int4lora_train.modeling.lora_layer import Int4LoraLinear, check_lora_config
from int4lora_train.modeling.peft_integration import (
    install_peft_dispatch,
    load_adapter,
    make_lora_config,
    prepare_for_training,
    register_int4_lora,
    trainable_parameter_count,
    uninstall_peft_dispatch,
)
from int4lora_train.modeling.surgery import SurgeryReport, convert_to_int4, dequantized_copy, quantize_model_rtn

install_peft_dispatch()

__all__ = [
    "ARCHITECTURES",
    "ArchitectureSpec",
    "DenseWeightUnavailableError",
    "Int4Linear",
    "Int4LinearFunction",
    "Int4LoraLinear",
    "SurgeryReport",
    "architecture_for",
    "check_lora_config",
    "convert_to_int4",
    "dequantized_copy",
    "find_fused_expert_modules",
    "install_peft_dispatch",
    "load_adapter",
    "load_int4_model",
    "load_tokenizer",
    "make_lora_config",
    "prepare_for_training",
    "projection_names",
    "quantize_model_rtn",
    "register_int4_lora",
    "trainable_parameter_count",
    "uninstall_peft_dispatch",
]
