"""PEFT's own expectations, checked against an INT4 model (adapted from PEFT 0.21's tests of custom-module dispatch
(``TestDynamicDispatch``), ``ModulesToSaveWrapper`` copies and ``autocast_adapter_dtype``), and a deterministic
adapter_config.json."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from modeling_helpers import GROUP_SIZE, tiny
from peft import LoraConfig, get_peft_model
from peft.tuners import lora
from peft.utils.other import ModulesToSaveWrapper

from int4lora_train.errors import UnsupportedFormatError
from int4lora_train.modeling import Int4Linear, quantize_model_rtn
from int4lora_train.modeling.lora_layer import Int4LoraLinear
from int4lora_train.modeling.peft_integration import install_peft_dispatch, uninstall_peft_dispatch


def _int4(dtype=torch.float32):
    model = tiny("llama").to(dtype)
    quantize_model_rtn(model, GROUP_SIZE)
    return model


class MyInt4Lora(Int4LoraLinear):
    """A user's own LoRA layer for Int4Linear (PEFT: a custom LoRA class for a custom module type)."""


class MyDenseLora(lora.Linear):
    """A user's own LoRA layer for dense nn.Linear."""


def test_a_users_own_lora_class_for_int4linear_is_used():
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    config._register_custom_module({Int4Linear: MyInt4Lora})
    model = get_peft_model(_int4(), config)
    attn = model.base_model.model.model.layers[0].self_attn
    assert type(attn.q_proj) is MyInt4Lora and type(attn.v_proj) is MyInt4Lora
    assert config._custom_modules[Int4Linear] is MyInt4Lora  # not replaced by the toolkit's (its MoE layer may join)


def test_a_users_class_for_nn_linear_keeps_dense_layers_and_int4_layers_get_the_int4_one():
    config = LoraConfig(r=4, target_modules=["q_proj", "lm_head"])
    config._register_custom_module({torch.nn.Linear: MyDenseLora})
    model = get_peft_model(_int4(), config)
    inner = model.base_model.model
    assert type(inner.lm_head) is MyDenseLora  # the dense head: the user's class
    assert type(inner.model.layers[0].self_attn.q_proj) is Int4LoraLinear  # INT4: needs no dense weight


def test_deepcopy_keeps_the_modules_to_save_wrapper_around_an_int4_layer():
    uninstall_peft_dispatch()  # PEFT's own modules_to_save path (the toolkit refuses it, next test)
    try:
        config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["k_proj"])
        config._register_custom_module({Int4Linear: Int4LoraLinear})
        model = get_peft_model(_int4(), config)
    finally:
        install_peft_dispatch()
    wrapper = model.base_model.model.model.layers[0].self_attn.k_proj
    assert isinstance(wrapper, ModulesToSaveWrapper)
    copied = copy.deepcopy(wrapper)
    assert type(copied) is ModulesToSaveWrapper and isinstance(copied.original_module, Int4Linear)
    whole = copy.deepcopy(model)
    assert isinstance(whole.base_model.model.model.layers[0].self_attn.k_proj, ModulesToSaveWrapper)
    tokens = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(whole(tokens).logits, model(tokens).logits)


def test_modules_to_save_on_an_int4_layer_is_refused_clearly():
    with pytest.raises(UnsupportedFormatError, match="modules_to_save names an INT4 layer.*target_modules"):
        get_peft_model(_int4(), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["k_proj"]))
    model = get_peft_model(_int4(), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert isinstance(model.base_model.model.lm_head, ModulesToSaveWrapper)  # a dense module: PEFT's as usual


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_adapter_dtype(dtype):
    """PEFT: with autocast_adapter_dtype=False the adapter takes the base layer's dtype; with True (default) half
    precision adapters are upcast to fp32."""
    kept = get_peft_model(_int4(dtype), LoraConfig(r=4, target_modules=["q_proj"]), autocast_adapter_dtype=False)
    layer = kept.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == dtype and layer.lora_B["default"].weight.dtype == dtype
    upcast = get_peft_model(_int4(dtype), LoraConfig(r=4, target_modules=["q_proj"]))
    assert upcast.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32


def test_adapter_config_json_lists_target_modules_sorted(tmp_path):
    from int4lora_train.export.adapter import adapter_config_json
    from int4lora_train.train.job import save_adapter

    text = adapter_config_json({"target_modules": {"v_proj", "q_proj", "k_proj", "o_proj"}, "r": 4})
    assert json.loads(text)["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    model = get_peft_model(_int4(), LoraConfig(r=4, target_modules=["v_proj", "up_proj", "q_proj", "down_proj"]))
    save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["down_proj", "q_proj", "up_proj", "v_proj"]
