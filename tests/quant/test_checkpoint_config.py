"""Parsing and writing the quantization_config block of config.json (compressed-tensors, GPTQ, AWQ)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from int4lora_train.errors import CheckpointError, UnsupportedFormatError
from int4lora_train.quant.checkpoint_config import (
    WeightScheme,
    awq_config,
    compressed_tensors_config,
    gptq_config,
    parse_quantization_config,
    read_checkpoint_quant_config,
)

# FORMATS.md 1.5: what ModelCompressor.update_config wrote for W4A16_ASYM (compressed-tensors 0.20).
CT_W4A16_ASYM = {
    "config_groups": {
        "group_0": {
            "format": "pack-quantized",
            "input_activations": None,
            "output_activations": None,
            "targets": ["Linear"],
            "weights": {
                "dynamic": False,
                "group_size": 128,
                "num_bits": 4,
                "strategy": "group",
                "symmetric": False,
                "type": "int",
            },
        }
    },
    "format": "pack-quantized",
    "global_compression_ratio": None,
    "ignore": ["lm_head"],
    "kv_cache_scheme": None,
    "moe_sparsity_config": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
    "sparsity_config": {},
    "transform_config": {},
    "version": "0.20.0",
}


def _with(block: dict, path: str, value) -> dict:
    """A copy of ``block`` with the dotted ``path`` set to ``value``."""
    block = copy.deepcopy(block)
    *parents, last = path.split(".")
    node = block
    for key in parents:
        node = node[key]
    node[last] = value
    return block


def test_compressed_tensors_w4a16_asym():
    config = parse_quantization_config(CT_W4A16_ASYM, "ckpt/config.json")
    scheme = config.scheme_for("model.layers.0.self_attn.q_proj", torch.nn.Linear(4, 4))
    assert scheme == WeightScheme("compressed-tensors", 128, False, "group", None, "pack-quantized")
    assert config.scheme_for("lm_head", "Linear") is None
    assert config.scheme_for("model.embed_tokens", torch.nn.Embedding(4, 4)) is None
    assert config.to_dict() == CT_W4A16_ASYM


def test_older_writer_keys_and_strategy_inference():
    """compressed-tensors <= 0.12 also wrote observer / observer_kwargs / actorder / block_structure."""
    weights = {
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "group_size": -1,
        "strategy": None,
        "actorder": None,
        "block_structure": None,
        "observer": "minmax",
        "observer_kwargs": {},
        "dynamic": False,
    }
    scheme = parse_quantization_config(_with(CT_W4A16_ASYM, "config_groups.group_0.weights", weights)).default_scheme
    assert (scheme.strategy, scheme.group_size, scheme.symmetric) == ("channel", None, True)
    weights.update(group_size=None)
    assert (
        parse_quantization_config(
            _with(CT_W4A16_ASYM, "config_groups.group_0.weights", weights)
        ).default_scheme.strategy
        == "tensor"
    )


@pytest.mark.parametrize(
    "actorder, expected",
    [("group", "group"), ("dynamic", "group"), (True, "group"), ("weight", None), ("static", None), (None, None)],
)
def test_actorder_aliases(actorder, expected):
    block = _with(CT_W4A16_ASYM, "config_groups.group_0.weights.actorder", actorder)
    assert parse_quantization_config(block).default_scheme.actorder == expected


def test_targets_ignore_and_regexes():
    block = copy.deepcopy(CT_W4A16_ASYM)
    block["config_groups"]["group_1"] = _with(block["config_groups"]["group_0"], "targets", ["re:.*mlp\\.down_proj$"])
    block["config_groups"]["group_1"]["weights"]["group_size"] = 32
    block["config_groups"] = {
        "group_1": block["config_groups"]["group_1"],
        "group_0": block["config_groups"]["group_0"],
    }
    block["ignore"] = ["lm_head", "re:model\\.layers\\.1\\..*"]
    config = parse_quantization_config(block)
    assert config.scheme_for("model.layers.0.mlp.down_proj", "Linear").group_size == 32  # first matching group
    assert config.scheme_for("model.layers.0.mlp.up_proj", "Linear").group_size == 128
    assert config.scheme_for("model.layers.1.mlp.up_proj", "Linear") is None  # ignored by regex
    assert config.scheme_for("model.layers.0.mlp.up_proj", "Embedding") is None  # not a target class


def test_class_targets_match_base_classes():
    class MyLinear(torch.nn.Linear):
        pass

    block = _with(CT_W4A16_ASYM, "config_groups.group_0.targets", ["Linear"])
    assert parse_quantization_config(block).scheme_for("x", MyLinear(2, 2)) is not None


@pytest.mark.parametrize(
    "path, value, found",
    [
        ("config_groups.group_0.weights.num_bits", 2, "num_bits is 2"),
        ("config_groups.group_0.weights.num_bits", 8, "every config group is 8-bit"),  # W8A16 only beside W4A16
        ("config_groups.group_0.weights.type", "float", "type 'float'"),
        ("config_groups.group_0.format", "nvfp4-pack-quantized", "FP4"),
        ("config_groups.group_0.format", "marlin-24", "2:4-sparse Marlin"),
        ("config_groups.group_0.format", "sparse-24-bitmask", "sparse format"),
        ("config_groups.group_0.format", "int-quantized", "num_bits is 4 in format 'int-quantized'"),
        ("config_groups.group_0.input_activations", {"num_bits": 8, "type": "int"}, "W4A8 / W8A8"),
        ("config_groups.group_0.weights.strategy", "block", "strategy 'block'"),
        ("config_groups.group_0.weights.dynamic", True, "dynamic=True"),
        ("quantization_status", "frozen", "'frozen'"),
        ("sparsity_config", {"format": "sparse-bitmask"}, "sparsity_config is set"),
        ("transform_config", {"config_groups": {"u": {"type": "hadamard"}}}, "transform_config is set"),
        ("quant_method", "bitsandbytes", "'bitsandbytes'"),
    ],
)
def test_unsupported_compressed_tensors_configs_say_what_and_what_is_supported(path, value, found):
    with pytest.raises(UnsupportedFormatError, match=found) as info:
        parse_quantization_config(_with(CT_W4A16_ASYM, path, value), "some/dir/config.json")
    assert "some/dir/config.json" in str(info.value)
    assert "supported" in str(info.value)


def test_gptq_blocks():
    autogptq = {
        "bits": 4,
        "group_size": 128,
        "desc_act": True,
        "sym": True,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "true_sequential": True,
    }
    config = parse_quantization_config(autogptq)
    scheme = config.default_scheme
    assert (scheme.format, scheme.group_size, scheme.actorder, scheme.checkpoint_format) == (
        "gptq",
        128,
        "group",
        "gptq",
    )
    assert config.scheme_for("model.layers.0.mlp.up_proj", "Linear") == scheme
    assert config.scheme_for("lm_head", "Linear") is None
    gptqmodel = {
        "bits": 4,
        "group_size": -1,
        "desc_act": False,
        "sym": False,
        "quant_method": "gptq",
        "format": "gptq_v2",
        "modules_to_not_convert": ["model.layers.0.mlp.down_proj"],
        "lm_head": False,
    }
    config = parse_quantization_config(gptqmodel)
    assert config.default_scheme.strategy == "channel" and config.default_scheme.group_size is None
    assert config.default_scheme.checkpoint_format == "gptq_v2" and not config.default_scheme.symmetric
    assert config.scheme_for("model.layers.0.mlp.down_proj", "Linear") is None


def test_awq_blocks():
    autoawq = {
        "quant_method": "awq",
        "zero_point": True,
        "group_size": 128,
        "bits": 4,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
    scheme = parse_quantization_config(autoawq).default_scheme
    assert (scheme.format, scheme.group_size, scheme.checkpoint_format) == ("awq", 128, "gemm")
    assert parse_quantization_config(dict(autoawq, version=None, format="GEMM")).default_scheme.format == "awq"


@pytest.mark.parametrize(
    "block, found",
    [
        ({"quant_method": "gptq", "bits": 8}, "bits is 8"),
        ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "'marlin'"),
        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "'gemv'"),
        ({"quant_method": "awq", "bits": 4, "version": "gemm", "zero_point": False}, "zero_point is false"),
        ({"quant_method": "awq", "bits": 3}, "bits is 3"),
    ],
)
def test_unsupported_gptq_awq(block, found):
    with pytest.raises(UnsupportedFormatError, match=found):
        parse_quantization_config(block)


def test_compressed_tensors_writer_matches_the_library(ct):
    """Our block equals what compressed-tensors itself serialises for the same scheme."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    for strategy, group_size, symmetric in [
        ("group", 128, False),
        ("group", 32, True),
        ("channel", None, False),
        ("tensor", None, True),
    ]:
        ours = compressed_tensors_config(group_size, symmetric, strategy, ignore=["lm_head"])
        args = QuantizationArgs(
            num_bits=4, type="int", strategy=strategy, group_size=group_size, symmetric=symmetric, dynamic=False
        )
        theirs = QuantizationConfig(
            config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")},
            ignore=["lm_head"],
            format="pack-quantized",
            quantization_status="compressed",
        ).model_dump()
        assert ours["config_groups"]["group_0"]["weights"] == {
            k: v for k, v in theirs["config_groups"]["group_0"]["weights"].items()
        }
        QuantizationConfig.model_validate(ours)  # the library parses our block
        parsed = parse_quantization_config(ours).default_scheme
        assert (parsed.strategy, parsed.group_size, parsed.symmetric) == (strategy, group_size, symmetric)


def test_writers_round_trip():
    assert parse_quantization_config(gptq_config(64, False, "gptq_v2")).default_scheme.checkpoint_format == "gptq_v2"
    assert parse_quantization_config(awq_config(None)).default_scheme.strategy == "channel"
    with pytest.raises(UnsupportedFormatError, match="positive group_size"):
        compressed_tensors_config(None, True, "group")


def test_read_checkpoint_quant_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        read_checkpoint_quant_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_checkpoint_quant_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert read_checkpoint_quant_config(tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": CT_W4A16_ASYM}))
    assert read_checkpoint_quant_config(tmp_path).source == str(tmp_path / "config.json")
