"""The RTN packer against compressed-tensors' observer + quantizer, and checkpoint directories that the library
(through transformers) loads bit-exactly."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from int4lora_train.errors import CheckpointError, Int4FormatError, UnsupportedFormatError
from int4lora_train.modeling.tiny_models import build_tiny_model, build_tokenizer
from int4lora_train.quant.checkpoint_config import read_checkpoint_quant_config
from int4lora_train.quant.dequant import dequantize_torch
from int4lora_train.quant.formats import from_awq, from_gptq, read_module_int4_weight, to_compressed_tensors
from int4lora_train.quant.layout import unpack_nibbles
from int4lora_train.quant.packer import quantize_rtn, save_int4_checkpoint, write_int4_checkpoint

LAYOUTS = [("group", 32), ("channel", None), ("tensor", None)]


def _signed_q(weight) -> torch.Tensor:
    return unpack_nibbles(weight.packed)[:, : weight.in_features].to(torch.int8) - 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("strategy, group_size", LAYOUTS, ids=[s for s, _ in LAYOUTS])
def test_rtn_equals_the_library(ct, strategy, group_size, symmetric, dtype):
    gen = torch.Generator().manual_seed(7)
    dense = (torch.randn(12, 64, generator=gen) * 0.05 + 0.01).to(dtype)
    dense[3, :32] = 0  # an all-zero group: the library's scale == 0 guard
    made = ct.quantize(dense, strategy, group_size, symmetric)
    ours = quantize_rtn(dense, group_size, symmetric, strategy)
    assert ours.scales.dtype == dtype
    per_row = (lambda t: t.reshape(1, 1).expand(12, 1)) if strategy == "tensor" else (lambda t: t)
    assert torch.equal(ours.scales, per_row(made.scale))
    assert torch.equal(_signed_q(ours), made.q)
    if not symmetric:
        assert torch.equal(ours.zero_points, per_row(made.zero_point))
    # and the written tensors are exactly the library's compress() output
    written = to_compressed_tensors(ours)
    assert sorted(written) == sorted(made.tensors)
    for key, value in made.tensors.items():
        assert written[key].dtype == value.dtype and torch.equal(written[key], value), key


def test_all_zero_weight_quantizes_to_zero():
    for symmetric in (True, False):
        weight = quantize_rtn(torch.zeros(4, 32, dtype=torch.bfloat16), 16, symmetric)
        assert (weight.scales == torch.finfo(torch.bfloat16).eps).all()
        assert (dequantize_torch(weight) == 0).all()


def test_scale_dtype_and_partial_groups():
    gen = torch.Generator().manual_seed(1)
    dense = torch.randn(6, 200, generator=gen)
    weight = quantize_rtn(dense, 128, symmetric=False, scale_dtype=torch.bfloat16)
    assert weight.scales.dtype == torch.bfloat16 and weight.scales.shape == (6, 2)
    error = (dequantize_torch(weight, torch.float32) - dense).abs()
    step = weight.scales.float()[:, torch.arange(200) // 128]
    # Round to nearest: within half a step, plus what rounding the scale to bf16 (2^-9 relative) moves 15 steps.
    assert (error <= step * (0.5 + 15 * 2**-9)).all()


@pytest.mark.parametrize(
    "dense, message",
    [
        (torch.ones(4), r"2-D float16 / bfloat16 / float32 weight \[out, in\], got torch.float32 \[4\]"),
        (torch.ones(4, 4, dtype=torch.int32), "got torch.int32"),
        (torch.tensor([[1.0, float("nan")]]), "NaN or inf"),
    ],
)
def test_rtn_rejects_bad_weights(dense, message):
    with pytest.raises(Int4FormatError, match=message):
        quantize_rtn(dense, 2, name="model.layers.0.q_proj")


def test_rtn_rejects_bad_settings():
    with pytest.raises(UnsupportedFormatError, match="positive group_size"):
        quantize_rtn(torch.ones(2, 8), None)
    with pytest.raises(UnsupportedFormatError, match="strategy 'block'"):
        quantize_rtn(torch.ones(2, 8), 4, strategy="block")


# ------------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def tiny_model():
    return build_tiny_model("llama", seed=3, dtype=torch.bfloat16, num_hidden_layers=1)


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_checkpoint_loads_in_compressed_tensors_bit_exactly(ct, tmp_path, tiny_model, symmetric):
    """transformers + compressed-tensors decompress our directory into exactly our dequantized weights."""
    import transformers

    path = save_int4_checkpoint(
        tiny_model,
        tmp_path / "ckpt",
        group_size=64,
        symmetric=symmetric,
        tokenizer=build_tokenizer(),
        max_shard_bytes=40_000,
    )
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    stored = {}
    for shard in shards:
        stored.update(load_file(path / shard))
    assert sorted(stored) == sorted(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    assert (path / "generation_config.json").exists() and (path / "tokenizer.json").exists()
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] == symmetric
    assert config["dtype"] == "bfloat16"
    assert stored["model.embed_tokens.weight"].dtype == torch.bfloat16

    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=transformers.CompressedTensorsConfig(dequantize=True)
    )
    for name, module in _linears(tiny_model).items():
        ours = dequantize_torch(quantize_rtn(module.weight, 64, symmetric))
        assert torch.equal(loaded.get_submodule(name).weight, ours), name
    assert torch.equal(loaded.lm_head.weight, tiny_model.lm_head.weight)
    assert torch.equal(loaded.model.norm.weight, tiny_model.model.norm.weight)
    assert transformers.AutoTokenizer.from_pretrained(path)("ab")["input_ids"] == [97, 98]


def test_packed_modules_loaded_by_transformers_are_readable(ct, tmp_path, tiny_model):
    """transformers 5.x + compressed-tensors >= 0.15 without dequantize: nn.Linear modules with packed params."""
    import transformers

    path = save_int4_checkpoint(tiny_model, tmp_path / "ckpt", group_size=32)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path)
    name = "model.layers.0.mlp.down_proj"
    weight = read_module_int4_weight(loaded.get_submodule(name), name)
    assert weight.group_size == 32
    expected = dequantize_torch(quantize_rtn(tiny_model.get_submodule(name).weight, 32))
    assert torch.equal(dequantize_torch(weight), expected)


@pytest.mark.parametrize("fmt, checkpoint_format", [("gptq", "gptq"), ("gptq", "gptq_v2"), ("awq", "gptq")])
def test_gptq_and_awq_checkpoints(tmp_path, tiny_model, fmt, checkpoint_format):
    symmetric = checkpoint_format == "gptq"  # v1 asymmetric can overflow; v2 and AWQ store any zero
    path = save_int4_checkpoint(
        tiny_model, tmp_path / fmt, format=fmt, group_size=32, symmetric=symmetric, checkpoint_format=checkpoint_format
    )
    quant_config = read_checkpoint_quant_config(path)
    assert quant_config.quant_method == fmt
    stored = load_file(path / "model.safetensors")
    for name, module in _linears(tiny_model).items():
        tensors = {k.rsplit(".", 1)[1]: v for k, v in stored.items() if k.rsplit(".", 1)[0] == name}
        scheme = quant_config.scheme_for(name, module)
        if fmt == "gptq":
            weight = from_gptq(tensors, name, scheme.group_size, scheme.checkpoint_format)
        else:
            weight = from_awq(tensors, name, scheme.group_size)
        expected = dequantize_torch(quantize_rtn(module.weight, 32, symmetric))
        assert torch.equal(dequantize_torch(weight), expected), name


def test_group_size_must_divide_in_features(tmp_path, tiny_model):
    with pytest.raises(UnsupportedFormatError, match="not a multiple of group_size=96"):
        save_int4_checkpoint(tiny_model, tmp_path / "x", group_size=96)
    assert not (tmp_path / "x").exists()


def test_existing_directory_is_never_destroyed(tmp_path, tiny_model):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "precious.txt").write_text("user data")
    with pytest.raises(CheckpointError, match="overwrite=True"):
        save_int4_checkpoint(tiny_model, target)
    with pytest.raises(CheckpointError, match="not written by int4lora-train"):  # overwrite replaces only its own
        save_int4_checkpoint(tiny_model, target, overwrite=True, group_size=32)
    assert (target / "precious.txt").read_text() == "user data"
    (target / "precious.txt").unlink()
    save_int4_checkpoint(tiny_model, target, group_size=32)
    save_int4_checkpoint(tiny_model, target, overwrite=True, group_size=32)  # its own checkpoint: replaced
    assert (target / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary or backup left behind


def test_failure_midway_leaves_nothing(tmp_path, tiny_model):
    def stream():
        yield "a.weight", torch.ones(2, 2)
        raise RuntimeError("source went away")

    with pytest.raises(RuntimeError, match="source went away"):
        write_int4_checkpoint(tiny_model.config, stream(), tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_streaming_writer_flushes_shards_while_the_stream_runs(tmp_path, tiny_model):
    """A shard is on disk before the stream ends, so a huge model is never held whole."""
    flushed_during_stream = []

    def stream():
        for i in range(6):
            weight = quantize_rtn(torch.randn(64, 128), 128, name=f"layers.{i}.proj")
            yield f"layers.{i}.proj", weight
            flushed_during_stream.append(len(list(tmp_path.glob(".ckpt.tmp-*/shard-*.tmp"))))
        yield "norm.weight", torch.ones(128, dtype=torch.bfloat16)

    path = write_int4_checkpoint(tiny_model.config, stream(), tmp_path / "ckpt", group_size=128, max_shard_bytes=9000)
    assert flushed_during_stream[-1] >= 2
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["layers.5.proj.weight_packed"] == index["weight_map"]["layers.5.proj.weight_scale"]
    assert len(set(index["weight_map"].values())) == len(list(path.glob("model-*-of-*.safetensors")))


def test_writer_checks_weights_against_the_scheme(tmp_path, tiny_model):
    asym = quantize_rtn(torch.randn(8, 64), 32, symmetric=False)
    with pytest.raises(CheckpointError, match="pass symmetric=False"):
        write_int4_checkpoint(tiny_model.config, [("p", asym)], tmp_path / "a", group_size=32)
    with pytest.raises(CheckpointError, match="group_size 32 differs"):
        write_int4_checkpoint(tiny_model.config, [("p", asym)], tmp_path / "b", group_size=16, symmetric=False)
    with pytest.raises(CheckpointError, match="given twice"):
        write_int4_checkpoint(tiny_model.config, [("p", torch.ones(1)), ("p", torch.ones(1))], tmp_path / "c")
    reordered = quantize_rtn(torch.randn(8, 64), 32)
    reordered = dataclasses.replace(reordered, g_idx=torch.zeros(64, dtype=torch.int32))
    with pytest.raises(CheckpointError, match="activation-order g_idx"):
        write_int4_checkpoint(tiny_model.config, [("p", reordered)], tmp_path / "d", group_size=32)
