"""The INT4 base's identity: one fingerprint from the checkpoint files or the loaded model, format independent,
sensitive to any changed nibble or scale; and the check when an adapter is loaded onto a base."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from modeling_helpers import tiny_int4_checkpoint

from int4lora_train.errors import CheckpointError
from int4lora_train.export import (
    BaseMismatchWarning,
    check_base_fingerprint,
    checkpoint_identity,
    export_adapter,
    load_adapter,
    model_identity,
)
from int4lora_train.export.fingerprint import compare_identities, weight_digest
from int4lora_train.modeling import Int4Linear, load_int4_model
from int4lora_train.quant.formats import from_gptq, to_gptq
from int4lora_train.quant.packer import quantize_rtn


def test_checkpoint_model_and_peft_model_share_one_fingerprint(tiny_checkpoint, int4_model, lora_model):
    from_files = checkpoint_identity(tiny_checkpoint)
    assert from_files.num_modules == 14
    assert model_identity(int4_model).fingerprint == from_files.fingerprint
    assert model_identity(lora_model).module_digests == from_files.module_digests  # PEFT names normalised
    assert model_identity(int4_model).quantization_config["quant_method"] == "compressed-tensors"
    assert model_identity(int4_model).model_type == "llama"


def test_one_changed_nibble_changes_the_fingerprint_and_names_the_module(tiny_checkpoint, int4_model):
    before = model_identity(int4_model)
    layer = int4_model.model.layers[1].mlp.up_proj
    with torch.no_grad():
        layer.packed[3, 5] ^= 0x10  # one high nibble
    after = model_identity(int4_model)
    assert after.fingerprint != before.fingerprint
    problems = compare_identities(before, after)
    assert len(problems) == 1 and "1 of 14 INT4 modules" in problems[0] and "model.layers.1.mlp.up_proj" in problems[0]


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_exact_scale_upcasts_keep_the_digest_and_rounding_changes_it(scale_dtype):
    weight = quantize_rtn(torch.randn(64, 96), group_size=32, scale_dtype=scale_dtype)
    upcast = dataclasses.replace(weight, scales=weight.scales.float())
    assert weight_digest(upcast) == weight_digest(weight)
    nudged = dataclasses.replace(weight, scales=weight.scales.float() * (1 + 1e-6))
    assert weight_digest(nudged) != weight_digest(weight)


def test_the_digest_is_the_same_whichever_format_carried_the_weights():
    weight = quantize_rtn(torch.randn(64, 128), group_size=32, symmetric=False)
    via_gptq = from_gptq(to_gptq(weight, "gptq"), "w", group_size=32, checkpoint_format="gptq")
    assert weight_digest(via_gptq) == weight_digest(weight)


def test_the_padding_nibble_of_an_odd_width_is_not_hashed():
    weight = quantize_rtn(torch.randn(8, 33), group_size=None, strategy="channel")
    padded = weight.packed.clone()
    padded[:, 16] |= 0xF0  # column 33 does not exist: only padding changes
    assert weight_digest(dataclasses.replace(weight, packed=padded)) == weight_digest(weight)


def test_loading_onto_the_training_base_passes_silently(lora_model, tiny_checkpoint, tmp_path):
    export_adapter(lora_model, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseMismatchWarning)
        assert check_base_fingerprint(load_int4_model(tiny_checkpoint, dtype=torch.float32), tmp_path / "adapter") == []
        model = load_adapter(load_int4_model(tiny_checkpoint, dtype=torch.float32), tmp_path / "adapter", strict=True)
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, Int4Linear)


def test_loading_onto_another_base_warns_or_refuses(lora_model, tmp_path, make_checkpoint):
    export_adapter(lora_model, tmp_path / "adapter")
    other = load_int4_model(make_checkpoint(tmp_path / "other", seed=3), dtype=torch.float32)
    with pytest.warns(BaseMismatchWarning, match="14 of 14 INT4 modules hold different weights"):
        problems = check_base_fingerprint(other, tmp_path / "adapter")
    assert problems
    with pytest.raises(CheckpointError, match="trained on another INT4 base"):
        check_base_fingerprint(other, tmp_path / "adapter", strict=True)
    with pytest.raises(CheckpointError):
        load_adapter(other, tmp_path / "adapter", strict=True)


def test_a_different_quantization_scheme_is_named(lora_model, tmp_path):
    export_adapter(lora_model, tmp_path / "adapter")
    other = tiny_int4_checkpoint(tmp_path / "asym", group_size=32, symmetric=False)
    with pytest.warns(BaseMismatchWarning, match="gs=64 symmetric, base is .*gs=32 asymmetric"):
        check_base_fingerprint(load_int4_model(other, dtype=torch.float32), tmp_path / "adapter")


def test_an_adapter_without_a_record_warns(int4_model, tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.warns(BaseMismatchWarning, match="no int4lora_base.json"):
        check_base_fingerprint(int4_model, tmp_path / "plain")
