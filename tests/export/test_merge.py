"""Merged exports: a dense checkpoint transformers loads (equal to INT4 base + LoRA up to the output dtype) and a
re-quantized W4A16 checkpoint the toolkit loads, with the re-quantization error measured and reported."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from int4lora_train.errors import CheckpointError, ExportError
from int4lora_train.export import iter_merged_tensors, merge_to_dense, merge_to_w4a16
from int4lora_train.modeling import Int4Linear, load_int4_model
from int4lora_train.modeling.tiny_models import build_tokenizer
from int4lora_train.quant.dequant import dequantize
from int4lora_train.quant.packer import quantize_rtn

TOKENS = torch.tensor([[257, 84, 104, 101, 32, 113, 117, 105, 99, 107, 32, 98, 114, 111, 119, 110]])


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(input_ids=TOKENS).logits.float()


def test_merged_weight_is_the_dequantized_base_plus_scaled_b_times_a(lora_model):
    merged = {t.key: t for t in iter_merged_tensors(lora_model)}
    layer = lora_model.base_model.model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = dequantize(layer.base_layer.int4_weight(), torch.float32) + 2.0 * (b @ a)  # scaling = 16 / 8
    item = merged["model.layers.0.self_attn.q_proj.weight"]
    assert item.int4 and torch.equal(item.tensor, expected.detach())
    assert not merged["lm_head.weight"].int4 and "model.norm.weight" in merged
    assert not any("lora" in key or "base_layer" in key for key in merged)


def test_dense_export_loads_in_transformers_and_matches(lora_model, tmp_path):
    merge_to_dense(lora_model, tmp_path / "fp32", dtype=torch.float32, tokenizer=build_tokenizer())
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.float32)
    config = json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert (_logits(dense) - _logits(lora_model)).abs().max() <= 1e-5

    merge_to_dense(lora_model, tmp_path / "bf16")  # the default: bf16
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert bf16.dtype == torch.bfloat16
    assert (_logits(bf16) - _logits(lora_model)).abs().max() <= 0.1  # bf16 rounding of weights and activations


def test_dense_export_refuses_to_replace_a_directory(lora_model, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("mine")
    with pytest.raises(CheckpointError, match="overwrite=True"):
        merge_to_dense(lora_model, tmp_path / "out")
    assert (tmp_path / "out" / "x").read_text() == "mine"


def test_w4a16_export_requantizes_with_the_base_group_size_and_reports_the_error(lora_model, tmp_path):
    report = merge_to_w4a16(lora_model, tmp_path / "w4", tokenizer=build_tokenizer())
    assert (report.group_size, report.symmetric, report.num_requantized) == (64, True, 14)
    merged = load_int4_model(tmp_path / "w4", dtype=torch.float32)
    layer = merged.model.layers[1].mlp.down_proj
    assert isinstance(layer, Int4Linear) and layer.group_size == 64
    # Bit for bit what RTN gives on the merged weight, in the base's scale dtype.
    source = next(t for t in iter_merged_tensors(lora_model) if t.key == "model.layers.1.mlp.down_proj.weight")
    expected = quantize_rtn(source.tensor.to(torch.float16), group_size=64)
    assert torch.equal(layer.packed, expected.packed) and torch.equal(layer.scales, expected.scales)
    # The reported error is the logit change of the written checkpoint against INT4 base + adapter.
    assert report.num_prompts == 4 and report.num_tokens > 0
    assert 0 < report.mean_logit_change <= report.max_logit_change
    assert "re-quantization error" in report.summary()


def test_w4a16_export_measures_on_given_token_prompts(lora_model, tmp_path):
    report = merge_to_w4a16(lora_model, tmp_path / "w4", prompts=[TOKENS[0].tolist()])
    merged = load_int4_model(tmp_path / "w4", dtype=torch.float32)
    change = (_logits(merged) - _logits(lora_model)).abs()
    assert report.num_tokens == TOKENS.shape[1]
    assert report.max_logit_change == pytest.approx(float(change.max()), rel=1e-5)
    assert report.mean_logit_change == pytest.approx(float(change.mean()), rel=1e-5)


def test_lora_on_the_dense_head_is_merged_too(int4_model, tmp_path, projections, lora_helpers):
    seeded_peft_model, randomize_lora_b = lora_helpers
    model = seeded_peft_model(int4_model, LoraConfig(r=4, lora_alpha=4, target_modules=[*projections, "lm_head"]))
    randomize_lora_b(model, std=0.05)
    merge_to_dense(model, tmp_path / "dense", dtype=torch.float32)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    assert (_logits(dense) - _logits(model)).abs().max() <= 1e-5


def test_dora_is_not_merged(int4_model, tmp_path):
    model = get_peft_model(int4_model, LoraConfig(r=4, target_modules=["lm_head"], use_dora=True))
    with pytest.raises(ExportError, match="variant"):
        merge_to_dense(model, tmp_path / "dense")
    assert not (tmp_path / "dense").exists()
