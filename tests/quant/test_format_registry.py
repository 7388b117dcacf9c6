"""The format registry: every registered format round-trips through its own writer and reader, detection follows the
list, and a new format is one object plus one list entry: the toy format below (docs/formats.md's skeleton) is
registered by a fixture and then written, found, read, inspected, fingerprinted and loaded without any other file
knowing about it."""

from __future__ import annotations

import copy

import pytest
import torch

from int4lora_train.errors import CheckpointError, UnsupportedFormatError
from int4lora_train.quant.checkpoint_config import parse_quantization_config, read_checkpoint_quant_config
from int4lora_train.quant.checkpoint_dir import CheckpointDir
from int4lora_train.quant.dequant import dequantize_torch
from int4lora_train.quant.formats import (
    FORMATS,
    Int4Format,
    ReadParams,
    checkpoint_formats,
    detect_format,
    format_named,
    read_int4_weight,
)
from int4lora_train.quant.layout import Int4Weight
from int4lora_train.quant.packer import quantize_rtn, save_int4_checkpoint, write_int4_checkpoint
from int4lora_train.quant.scheme import Int4CheckpointConfig, TargetGroup, WeightScheme


def _swap_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return (packed >> 4) | (packed << 4)


class ToyFormat(Int4Format):
    """The canonical bytes with their two nibbles swapped, ``[out, G]`` scales, symmetric only."""

    name = "toy-int4"
    quant_method = "toy-int4"
    tensor_names = ("toy_packed", "toy_scales", "toy_shape")
    marker = "toy_packed"
    summary = "toy INT4 (tests only)"
    layout = "toy (toy_packed uint8 [out, in/2])"

    def matches(self, tensors):
        return tensors.get("toy_packed") is not None

    def required_tensor_names(self, scheme=None):
        return self.tensor_names

    def read(self, tensors, name, params):
        out_features, in_features = tensors["toy_shape"].tolist()
        packed = _swap_nibbles(tensors["toy_packed"])
        return Int4Weight.create(packed, tensors["toy_scales"], in_features, params.group_size, name=name)

    def write(self, weight, scheme, name):
        if weight.zero_points is not None:
            raise UnsupportedFormatError(f"{name}: the toy format is symmetric only.")
        return {
            "toy_packed": _swap_nibbles(weight.packed),
            "toy_scales": weight.scales.contiguous(),
            "toy_shape": torch.tensor(list(weight.shape)),
        }

    def config_block(self, group_size, symmetric, strategy, ignore, checkpoint_format):
        return {"quant_method": self.quant_method, "group_size": group_size, "ignore": list(ignore)}

    def parse_config(self, block, source):
        scheme = WeightScheme(format=self.name, group_size=block["group_size"], checkpoint_format="toy")
        group = TargetGroup("toy", ("Linear",), scheme)
        return Int4CheckpointConfig(self.quant_method, (group,), tuple(block["ignore"]), source, dict(block))


@pytest.fixture
def toy_format():
    """The toy format, registered for one test only."""
    toy = ToyFormat()
    FORMATS.append(toy)
    yield toy
    FORMATS.remove(toy)


def _same_weight(a: Int4Weight, b: Int4Weight) -> bool:
    return a.shape == b.shape and torch.equal(dequantize_torch(a), dequantize_torch(b))


def test_a_registered_toy_format_round_trips_through_a_checkpoint_directory(toy_format, tmp_path):
    weights = {
        f"model.layers.{i}.mlp.up_proj": quantize_rtn(
            torch.randn(48, 64, generator=torch.Generator().manual_seed(i)), 32
        )
        for i in range(2)
    }
    stream = [*weights.items(), ("model.norm.weight", torch.ones(64))]
    path = write_int4_checkpoint({"model_type": "llama"}, stream, tmp_path / "toy", format="toy-int4", group_size=32)

    quant = read_checkpoint_quant_config(path)
    assert quant.quant_method == "toy-int4" and quant.default_scheme.format == "toy-int4"
    checkpoint = CheckpointDir.open(path)
    assert set(checkpoint.int4_modules()) == set(weights)
    read_back = {name: weight for name, weight, _ in checkpoint.iter_int4_weights(quant)}
    assert read_back.keys() == weights.keys()
    for name, weight in weights.items():
        assert torch.equal(read_back[name].packed, weight.packed) and torch.equal(read_back[name].scales, weight.scales)
        assert read_back[name].group_size == 32


def test_the_toy_format_is_inspected_fingerprinted_and_loaded_like_a_builtin(toy_format, tmp_path):
    from int4lora_train.export.fingerprint import checkpoint_identity, model_identity
    from int4lora_train.modeling import load_int4_model, quantize_model_rtn
    from int4lora_train.modeling.tiny_models import build_tiny_model, build_tokenizer
    from int4lora_train.quant.inspect import inspect_checkpoint

    model = build_tiny_model("llama", seed=0, dtype=torch.float32)
    path = save_int4_checkpoint(model, tmp_path / "toy", format="toy-int4", group_size=32, tokenizer=build_tokenizer())

    layout = inspect_checkpoint(path)
    assert {m.format for m in layout.modules} == {"toy-int4"} and len(layout.modules) == 14
    loaded = load_int4_model(path, dtype=torch.float32)
    assert {m.source_format for m in loaded.int4_report.converted} == {"toy-int4"}
    in_memory = copy.deepcopy(model)
    quantize_model_rtn(in_memory, 32)
    tokens = torch.tensor([[1, 5, 9, 2]])
    assert torch.equal(loaded(tokens).logits, in_memory(tokens).logits)
    assert checkpoint_identity(path).fingerprint == model_identity(loaded).fingerprint


def test_the_toy_format_is_gone_after_its_fixture(tmp_path):
    with pytest.raises(UnsupportedFormatError, match="checkpoint format 'toy-int4' is not supported"):
        write_int4_checkpoint({}, [], tmp_path / "x", format="toy-int4")
    with pytest.raises(UnsupportedFormatError, match="quant_method is 'toy-int4'"):
        parse_quantization_config({"quant_method": "toy-int4"})


@pytest.mark.parametrize("fmt", checkpoint_formats(), ids=lambda f: f.name)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_every_checkpoint_format_reads_back_what_it_writes(fmt, symmetric):
    weight = quantize_rtn(torch.randn(24, 64, generator=torch.Generator().manual_seed(1)), 16, symmetric=symmetric)
    block = fmt.config_block(16, symmetric, "group", ("lm_head",), "gptq_v2")
    scheme = parse_quantization_config(block).default_scheme
    assert scheme.format == fmt.name
    tensors = fmt.write(weight, scheme, "m")
    assert set(fmt.required_tensor_names(scheme)) <= set(tensors) <= set(fmt.tensor_names)
    assert fmt.matches(tensors) and detect_format(tensors) == fmt.name
    assert _same_weight(fmt.read(tensors, "m", ReadParams.from_scheme(scheme, "m")), weight)
    assert _same_weight(read_int4_weight(tensors, "m", scheme), weight)


def test_lookups_name_what_is_registered():
    assert [fmt.name for fmt in FORMATS] == ["compressed-tensors", "gptq", "awq", "uint8"]
    assert [fmt.name for fmt in checkpoint_formats()] == ["compressed-tensors", "gptq", "awq"]
    assert format_named("uint8").quant_method is None
    with pytest.raises(UnsupportedFormatError, match=r"checkpoint format 'uint8' is not supported.*'awq'\]"):
        format_named("uint8", in_checkpoints=True)


def test_module_requests_are_read_across_shards_and_checked(tmp_path):
    weights = [(f"layer{i}.proj", quantize_rtn(torch.randn(64, 64), 32)) for i in range(3)]
    path = write_int4_checkpoint({}, weights, tmp_path / "ckpt", group_size=32, max_shard_bytes=2_000)
    checkpoint = CheckpointDir.open(path)
    assert len(checkpoint.shards) == 3 and checkpoint.where == path / "model.safetensors.index.json"
    modules = checkpoint.modules()
    assert modules["layer1.proj"] == {
        local: f"layer1.proj.{local}" for local in ("weight_packed", "weight_scale", "weight_shape")
    }
    # one request spanning all three shards is yielded once, after its last tensor
    spanning = {"all": {f"packed{i}": f"layer{i}.proj.weight_packed" for i in range(3)}}
    ((name, tensors),) = list(checkpoint.iter_module_tensors(spanning))
    assert name == "all" and sorted(tensors) == ["packed0", "packed1", "packed2"]
    with pytest.raises(CheckpointError, match="'layer9.proj.weight_packed' wanted as .*no such tensor"):
        list(checkpoint.iter_module_tensors({"x": {"weight_packed": "layer9.proj.weight_packed"}}))
