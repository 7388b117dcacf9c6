"""A malformed quantization_config or a damaged shard is a CheckpointError naming the file, the key and the fix,
never an AttributeError / TypeError / SafetensorError from deep inside a parser."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from int4lora_train import cli
from int4lora_train.errors import CheckpointError
from int4lora_train.quant.checkpoint_config import parse_quantization_config

CT = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32},
        }
    },
    "ignore": ["lm_head"],
}


def _mutated(path: tuple, value):
    block = copy.deepcopy(CT)
    node = block
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return block


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (("config_groups", "group_0"), "W4A16", r"config_groups.group_0 is 'W4A16' \(a str\); each config group"),
        (("config_groups", "group_0", "weights", "group_size"), "32", r"group_size is '32'.*write it as a number: 32"),
        (("config_groups", "group_0", "weights", "num_bits"), 4.5, "num_bits is 4.5"),
        (("config_groups", "group_0", "weights"), ["int4"], r"weights is \['int4'\].*JSON object"),
        (("config_groups", "group_0", "targets"), [1], "targets is"),
        (("config_groups",), "group_0", "config_groups is 'group_0'"),
        (("ignore",), {"lm_head": True}, "ignore is"),
        (("config_groups", "group_0", "weights", "symmetric"), "yes", "symmetric is 'yes'.*true or false"),
    ],
)
def test_malformed_compressed_tensors_blocks_are_named(path, value, match):
    with pytest.raises(CheckpointError, match=match) as caught:
        parse_quantization_config(_mutated(path, value), source="model/config.json")
    assert str(caught.value).startswith("model/config.json: quantization_config")


@pytest.mark.parametrize("field", ["group_size", "bits"])
def test_malformed_gptq_and_awq_blocks_are_named(field):
    for method in ("gptq", "awq"):
        block = {"quant_method": method, "bits": 4, "group_size": 128, field: "128" if field == "group_size" else "4"}
        with pytest.raises(CheckpointError, match=f"{field} is"):
            parse_quantization_config(block)


def test_a_block_that_is_not_an_object_is_named():
    with pytest.raises(CheckpointError, match="must be a JSON object"):
        parse_quantization_config(["compressed-tensors"], source="x/config.json")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from int4lora_train.modeling.tiny_models import build_tiny_model, build_tokenizer
    from int4lora_train.quant.packer import save_int4_checkpoint

    model = build_tiny_model(
        "llama", seed=0, dtype=torch.bfloat16, hidden_size=64, intermediate_size=128, num_attention_heads=2,
        num_key_value_heads=1,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("ckpt") / "model"
    return save_int4_checkpoint(model, out, group_size=32, tokenizer=build_tokenizer(), max_shard_bytes=20000)


def test_loading_a_model_with_a_malformed_block_is_a_checkpoint_error(tmp_path, checkpoint):
    from int4lora_train.modeling import load_int4_model

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    next(iter(config["quantization_config"]["config_groups"].values()))["weights"]["group_size"] = "32"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json: quantization_config.*group_size is '32'"):
        load_int4_model(broken)


@pytest.mark.parametrize("cut", ["data", "header", "all"])
def test_inspect_on_a_truncated_shard_is_one_line(tmp_path, checkpoint, capsys, cut):
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint, damaged)
    shard = sorted(damaged.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    keep = {"data": len(data) - 5, "header": 8 + header_len // 2, "all": 3}[cut]
    shard.write_bytes(data[:keep])
    assert cli.main(["inspect", str(damaged)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {shard}") and "re-download" in err and "Traceback" not in err


def test_the_unpacker_names_bad_inputs():
    from int4lora_train.errors import ConfigError, Int4FormatError
    from int4lora_train.quant.unpacker import INT4Unpacker

    with pytest.raises(ConfigError, match="max_cache_bytes must be >= 0"):
        INT4Unpacker(max_cache_bytes=-1)
    with pytest.raises(Int4FormatError, match=r"expected uint8 \[out, in/2\]"):
        INT4Unpacker().unpack_int4_weights(torch.zeros(4, 8), torch.ones(4))
    with pytest.raises(Int4FormatError, match=r"scales has shape \(3,\)"):
        INT4Unpacker().unpack_int4_weights(torch.zeros(4, 8, dtype=torch.uint8), torch.ones(3))
