"""Surgery on every supported architecture: compressed-tensors (library-quantized), GPTQ / AWQ quant-linear modules,
uint8 modules and RTN; logits and input gradients equal a dense model built from the dequantized weights."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from modeling_helpers import ARCHS, GROUP_SIZE, max_diff, tiny
from torch import nn

from int4lora_train.errors import CheckpointError, UnsupportedFormatError
from int4lora_train.modeling import (
    ARCHITECTURES,
    Int4Linear,
    convert_to_int4,
    dequantized_copy,
    projection_names,
    quantize_model_rtn,
)
from int4lora_train.quant.checkpoint_config import compressed_tensors_config, gptq_config, parse_quantization_config
from int4lora_train.quant.dequant import dequantize
from int4lora_train.quant.formats import to_awq, to_gptq
from int4lora_train.quant.packer import quantize_rtn


def ct_compress(model: nn.Module, preset: str = "W4A16", group_size: int | None = GROUP_SIZE) -> nn.Module:
    """Quantize ``model`` in place with the compressed-tensors library (min-max observer) and compress it, leaving
    what transformers 5.x + compressed-tensors >= 0.15 leaves: ``nn.Linear`` modules holding packed parameters and
    a decompress-on-first-forward hook. Returns the dense reference: a copy of the original model holding the
    weights the library itself decompresses."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    reference = copy.deepcopy(model)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    if group_size is None:
        scheme.weights.group_size = None
        scheme.weights.strategy = "channel"
    else:
        scheme.weights.group_size = group_size
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    for module in model.modules():
        args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if args is None:
            continue
        weight = module.weight.data
        out_features, in_features = weight.shape
        size = in_features if group_size is None else group_size
        grouped = weight.reshape(out_features, in_features // size, size)
        scale, zero_point = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero_point.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    decompressed = copy.deepcopy(model)
    compressor.decompress_model(decompressed)
    for name, module in reference.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            module.weight.data.copy_(decompressed.get_submodule(name).weight.detach().float())
    return reference


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


@pytest.mark.parametrize("arch", ARCHS)
def test_compressed_tensors_model_equals_library_dequantized_dense(arch, tokens, dense_copies):
    """Quantized and packed by the compressed-tensors library, converted by surgery: logits and the gradient with
    respect to the input embeddings equal the dense model holding the library's own decompressed weights."""
    model = tiny(arch)
    names = _linear_names(model)
    reference = ct_compress(model, "W4A16_ASYM" if arch in ("llama", "phi3") else "W4A16")
    report = convert_to_int4(model)

    assert sorted(report.converted_names()) == sorted(names)
    assert report.dense_names() == ["lm_head"]
    assert report.removed_hooks  # compressed-tensors' decompress-everything hook is gone
    assert all(isinstance(model.get_submodule(n), Int4Linear) for n in names)
    assert dense_copies(model) == []
    if arch == "phi3":
        assert {n.rsplit(".", 1)[1] for n in names} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}

    embeds = model.get_input_embeddings()(tokens).detach()
    x_int4, x_ref = embeds.clone().requires_grad_(), embeds.clone().requires_grad_()
    logits = model(inputs_embeds=x_int4).logits
    ref_logits = reference(inputs_embeds=x_ref).logits
    assert max_diff(logits, ref_logits) <= 1e-5
    logits.logsumexp(-1).sum().backward()
    ref_logits.logsumexp(-1).sum().backward()
    assert max_diff(x_int4.grad, x_ref.grad) <= 1e-5
    assert isinstance(model.get_submodule(names[0]), Int4Linear)  # the first forward did not decompress anything


def test_compressed_tensors_channel_strategy(tokens):
    model = tiny("qwen2")
    reference = ct_compress(model, "W4A16", group_size=None)
    convert_to_int4(model)
    assert model.model.layers[0].mlp.down_proj.group_size == 256
    assert max_diff(model(tokens).logits, reference(tokens).logits) <= 1e-5


class _GPTQLinear(nn.Module):
    """What AutoGPTQ / GPTQModel quant-linear modules hold (their libraries are never imported)."""

    def __init__(self, tensors, in_features, out_features, bias):
        super().__init__()
        for key, value in tensors.items():
            self.register_buffer(key, value)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.infeatures, self.outfeatures, self.bits, self.group_size = in_features, out_features, 4, GROUP_SIZE


class _UInt8Linear(nn.Module):
    def __init__(self, packed, scales):
        super().__init__()
        self.register_buffer("weight", packed)
        self.register_buffer("weight_scale", scales)


def _swap_linears(model, make):
    for name in _linear_names(model):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, make(name, model.get_submodule(name)))


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2", "awq", "uint8"])
def test_quant_linear_modules_are_recognised_by_their_tensors(fmt, tokens):
    model = tiny("qwen2")  # qwen2 has q/k/v biases
    expected = {}

    def make(name, linear):
        weight = quantize_rtn(linear.weight.detach(), GROUP_SIZE, symmetric=fmt == "uint8")
        expected[name] = weight
        if fmt == "uint8":
            return _UInt8Linear(weight.packed, weight.scales)
        tensors = to_awq(weight) if fmt == "awq" else to_gptq(weight, checkpoint_format=fmt)
        return _GPTQLinear(tensors, linear.in_features, linear.out_features, linear.bias)

    _swap_linears(model, make)
    # GPTQ v1 and v2 differ only in the zero-point convention, which only the config can tell
    config = parse_quantization_config(gptq_config(GROUP_SIZE, False, "gptq_v2")) if fmt == "gptq_v2" else None
    report = convert_to_int4(model, config)
    assert {m.source_format for m in report.converted} == {fmt.split("_")[0]}
    assert len(report.converted) == len(expected)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Int4Linear) and (fmt == "uint8" or q_proj.bias is not None)
    for name, weight in expected.items():
        assert torch.equal(model.get_submodule(name).dequantize(), dequantize(weight))
    reference = dequantized_copy(model)
    assert max_diff(model(tokens).logits, reference(tokens).logits) <= 1e-5


def test_older_compressed_linear_class_is_recognised():
    """compressed-tensors <= 0.14 swapped linears into a ``CompressedLinear`` (an nn.Linear subclass with packed
    parameters and a quantization_scheme); recognised by its tensors like the rest."""
    from compressed_tensors.quantization import preset_name_to_scheme

    from int4lora_train.quant.formats import to_compressed_tensors

    class CompressedLinear(nn.Linear):
        pass

    layer = CompressedLinear(64, 32, bias=False)
    weight = quantize_rtn(layer.weight.detach(), 16, symmetric=False)
    del layer.weight
    for key, value in to_compressed_tensors(weight).items():
        layer.register_parameter(key, nn.Parameter(value, requires_grad=False))
    scheme = preset_name_to_scheme("W4A16_ASYM", ["Linear"])
    scheme.weights.group_size = 16
    layer.quantization_scheme = scheme
    model = nn.Sequential(layer)
    report = convert_to_int4(model)
    assert report.converted_names() == ["0"] and isinstance(model[0], Int4Linear)
    assert torch.equal(model[0].dequantize(), dequantize(weight))


def test_ignore_list_is_honoured_and_contradictions_are_errors(tokens):
    model = tiny("llama")
    ct_compress(model, "W4A16")
    block = compressed_tensors_config(GROUP_SIZE, ignore=["lm_head", "re:.*layers\\.1\\.mlp\\..*"])
    config = parse_quantization_config(block, source="test config")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.\w+_proj: Linear carries INT4 tensors"):
        convert_to_int4(model, config)

    dense = tiny("llama")
    report = quantize_model_rtn(dense, GROUP_SIZE, ignore=["lm_head", "re:.*layers\\.1\\.mlp\\..*"])
    assert sorted(report.dense_names()) == sorted(
        ["lm_head"] + [f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    )
    assert all("ignore list" in m.reason for m in report.left_dense)
    assert type(dense.model.layers[1].mlp.up_proj) is nn.Linear
    assert dense.int4_checkpoint_config.ignore == ("lm_head", "re:.*layers\\.1\\.mlp\\..*")
    assert "3 left dense" not in report.summary() and "4 left dense" in report.summary()


def test_rtn_surgery_matches_dense_reference_and_keeps_names(tokens):
    model = tiny("mistral")
    names_before = [n for n, _ in model.named_modules()]
    quantize_model_rtn(model, GROUP_SIZE, symmetric=False)
    assert [n for n, _ in model.named_modules()] == names_before
    assert max_diff(model(tokens).logits, dequantized_copy(model)(tokens).logits) <= 1e-5
    assert not any(isinstance(m, Int4Linear) for m in dequantized_copy(model).modules())
    # a second call changes nothing and still reports every INT4 layer
    again = convert_to_int4(model)
    assert len(again.converted) == 14 and {m.source_format for m in again.converted} == {"rtn"}


def test_fused_3d_moe_experts_with_int4_tensors_are_refused():
    config = transformers.MixtralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, num_local_experts=4,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    experts = model.model.layers[0].mlp.experts
    # compressed-tensors >= 0.17 packs 3-D expert weights per expert: [experts, out, in/8] int32
    experts.register_buffer("gate_up_proj_packed", torch.zeros(4, 256, 8, dtype=torch.int32))
    experts.register_buffer("gate_up_proj_scale", torch.ones(4, 256, 2))
    with pytest.raises(
        UnsupportedFormatError, match=r"fused 3-D.*model\.layers\.0\.mlp\.experts \(MixtralExperts.*gate_up_proj_packed"
    ):
        convert_to_int4(model)


def test_architecture_facts():
    assert set(ARCHITECTURES) == set(ARCHS)
    assert ARCHITECTURES["phi3"].fused["qkv_proj"] == ("q_proj", "k_proj", "v_proj")
    seven = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert projection_names(tiny("llama")) == seven
    assert projection_names(nn.Sequential(nn.Linear(2, 2))) == ("0",)
