"""The INT4 checkpoint loader: round trips through the packer's checkpoint writer in every format, and clear errors
for damaged or inconsistent checkpoints."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from modeling_helpers import ARCHS, GROUP_SIZE, max_diff, tiny
from safetensors.torch import load_file, save_file

from int4lora_train.errors import CheckpointError, UnsupportedFormatError
from int4lora_train.modeling import Int4Linear, load_int4_model, load_tokenizer, quantize_model_rtn
from int4lora_train.modeling.tiny_models import build_tokenizer
from int4lora_train.quant.packer import save_int4_checkpoint

Q_PROJ = "model.layers.0.self_attn.q_proj"


def _save(model, path, fmt="compressed-tensors", symmetric=True, shards=True, **kwargs):
    return save_int4_checkpoint(
        model, path, format=fmt, group_size=GROUP_SIZE, symmetric=symmetric, tokenizer=build_tokenizer(),
        max_shard_bytes=100_000 if shards else None, **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A sharded compressed-tensors checkpoint of a tiny Qwen2 (q/k/v biases), and the model it came from."""
    model = tiny("qwen2")
    path = _save(model, tmp_path_factory.mktemp("ckpt") / "qwen2-w4a16")
    return path, model


def _copy(checkpoint, tmp_path):
    return shutil.copytree(checkpoint[0], tmp_path / "copy")


def _shard_of(path, key):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return path / index["weight_map"][key]


@pytest.mark.parametrize(
    "fmt, symmetric, shards",
    [
        ("compressed-tensors", True, True),
        ("compressed-tensors", False, False),
        ("gptq", True, True),
        ("awq", False, True),
    ],
)
def test_round_trip_equals_the_in_memory_int4_model(fmt, symmetric, shards, tmp_path, tokens, dense_copies):
    model = tiny("qwen2")
    path = _save(model, tmp_path / "ckpt", fmt, symmetric, shards)
    loaded = load_int4_model(path, dtype=torch.float32)
    in_memory = copy.deepcopy(model)
    quantize_model_rtn(in_memory, GROUP_SIZE, symmetric=symmetric)

    assert max_diff(loaded(tokens).logits, in_memory(tokens).logits) <= 1e-5
    names = [m.name for m in loaded.int4_report.converted]
    assert sorted(names) == sorted(in_memory.int4_report.converted_names())
    assert {m.source_format for m in loaded.int4_report.converted} == {fmt}
    assert loaded.int4_report.dense_names() == ["lm_head"]
    assert loaded.int4_checkpoint_config.quant_method == fmt
    assert (
        loaded.int4_checkpoint_config.to_dict() == json.loads((path / "config.json").read_text())["quantization_config"]
    )
    assert getattr(loaded.config, "quantization_config", None) is None
    assert dense_copies(loaded) == []
    assert loaded.get_submodule(Q_PROJ).bias is not None and not loaded.training


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_loads(arch, tmp_path, tokens):
    model = tiny(arch)
    path = _save(model, tmp_path / arch, symmetric=False)
    loaded = load_int4_model(path, dtype=torch.float32)
    quantize_model_rtn(model, GROUP_SIZE, symmetric=False)
    assert loaded.int4_report.converted_names() == model.int4_report.converted_names()
    assert max_diff(loaded(tokens).logits, model(tokens).logits) <= 1e-5


def test_dtype_applies_to_dense_tensors_only_and_nothing_is_dequantized(checkpoint, monkeypatch, tokens):
    import int4lora_train.quant.dequant as dequant

    def refuse(*args, **kwargs):
        raise AssertionError("the loader dequantized a weight")

    monkeypatch.setattr(dequant, "dequantize_torch", refuse)
    loaded = load_int4_model(checkpoint[0], dtype=torch.bfloat16)
    monkeypatch.undo()
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.get_submodule(Q_PROJ).bias.dtype == torch.bfloat16
    assert loaded.get_submodule(Q_PROJ).scales.dtype == torch.float32  # the checkpoint's scale dtype
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.isfinite(loaded(tokens).logits).all()


def test_cache_mode_equals_on_the_fly(checkpoint, tokens):
    on_the_fly = load_int4_model(checkpoint[0], dtype=torch.float32)
    cached = load_int4_model(checkpoint[0], dtype=torch.float32, mode="cache", cache_max_bytes=1 << 20)
    layer = cached.get_submodule(Q_PROJ)
    assert layer.mode == "cache" and layer.cache_key == Q_PROJ
    assert torch.equal(cached(tokens).logits, on_the_fly(tokens).logits)
    assert layer.cache.get_cache_stats()["bytes"] <= 1 << 20


def test_tied_embeddings_and_tokenizer(tmp_path, tokens):
    model = tiny("llama", tie_word_embeddings=True)
    path = _save(model, tmp_path / "tied")
    loaded = load_int4_model(path, dtype=torch.float32)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    in_memory = copy.deepcopy(model)
    quantize_model_rtn(in_memory, GROUP_SIZE)
    assert max_diff(loaded(tokens).logits, in_memory(tokens).logits) <= 1e-5
    tokenizer = load_tokenizer(path)
    assert tokenizer("hi")["input_ids"] == [104, 105]
    (path / "tokenizer.json").unlink()
    (path / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError, match="no loadable tokenizer"):
        load_tokenizer(path)


def test_truncated_shard_is_named(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path)
    shard = _shard_of(path, "lm_head.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: truncated"):
        load_int4_model(path)


def test_corrupt_header_is_named(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path)
    shard = _shard_of(path, f"{Q_PROJ}.weight_packed")
    data = bytearray(shard.read_bytes())
    data[8:16] = b"\xff\xfe{{{{{{"
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: corrupt safetensors header"):
        load_int4_model(path)


def _drop_tensor(path, key, from_index: bool):
    shard = _shard_of(path, key)
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    if from_index:
        index_path = path / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        del index["weight_map"][key]
        index_path.write_text(json.dumps(index))
    return shard


def test_missing_tensor_names_module_tensor_and_shard(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path)
    shard = _drop_tensor(path, f"{Q_PROJ}.weight_scale", from_index=False)
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor '{Q_PROJ}\.weight_scale' is missing"):
        load_int4_model(path)
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][f"{Q_PROJ}.weight_scale"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=rf"missing tensor {Q_PROJ}\.weight_scale of INT4 module {Q_PROJ}.*index\.json"
    ):
        load_int4_model(path)


def test_missing_dense_tensor(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path)
    _drop_tensor(path, "model.norm.weight", from_index=True)
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) \['model\.norm\.weight'\].*index\.json"):
        load_int4_model(path)


def test_unexpected_tensor_is_an_error_unless_not_strict(checkpoint, tmp_path, caplog):
    path = _copy(checkpoint, tmp_path)
    shard = _shard_of(path, "model.norm.weight")
    tensors = load_file(shard)
    tensors["model.layers.0.extra_scale"] = torch.ones(3)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) \['model\.layers\.0\.extra_scale'\]"):
        load_int4_model(path)
    assert isinstance(load_int4_model(path, strict=False).get_submodule(Q_PROJ), Int4Linear)
    assert "extra_scale" in caplog.text


def test_shapes_that_contradict_config_json(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "vocab_size": 400}))
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight has shape \[320, 128\].*\[400, 128\]"):
        load_int4_model(path)
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 512}))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj: the INT4 weight is \[\d+, \d+\].*\[\d+, \d+\]"):
        load_int4_model(path)


def test_pickled_weights_need_opt_in(checkpoint, tmp_path, tokens):
    path = tmp_path / "bin"
    path.mkdir()
    shutil.copy(checkpoint[0] / "config.json", path / "config.json")
    state = {}
    for shard in sorted(checkpoint[0].glob("*.safetensors")):
        state.update(load_file(shard))
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_int4_model(path)
    loaded = load_int4_model(path, allow_pickle=True, dtype=torch.float32)
    reference = load_int4_model(checkpoint[0], dtype=torch.float32)
    assert torch.equal(loaded(tokens).logits, reference(tokens).logits)


def test_configs_the_loader_does_not_support(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "quantization_config"}))
    with pytest.raises(CheckpointError, match="no quantization_config"):
        load_int4_model(path)
    (path / "config.json").write_text(
        json.dumps({**config, "quantization_config": {"quant_method": "gptq", "bits": 8}})
    )
    with pytest.raises(UnsupportedFormatError, match="bits is 8"):
        load_int4_model(path)


def test_moe_with_fused_3d_experts_is_refused_by_name(checkpoint, tmp_path):
    # Mixtral / Qwen-MoE experts load as Int4Experts (tests/moe); other MoE types are still refused by name.
    mixtral = transformers.OlmoeConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, num_experts=4,
    ).to_dict()  # fmt: skip
    quant = json.loads((checkpoint[0] / "config.json").read_text())["quantization_config"]
    path = tmp_path / "moe"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**mixtral, "quantization_config": quant}))
    save_file({"model.norm.weight": torch.ones(64)}, path / "model.safetensors")
    with pytest.raises(UnsupportedFormatError, match=r"fused 3-D.*model\.layers\.0\.mlp\.experts \(OlmoeExperts"):
        load_int4_model(path)


def test_loads_without_compressed_tensors_installed(checkpoint):
    """Library code must not need compressed-tensors (the GPU machine does not have it)."""
    script = (
        "import sys; sys.modules['compressed_tensors'] = None\n"
        "import torch\n"
        "from int4lora_train.modeling import load_int4_model, Int4Linear\n"
        f"m = load_int4_model({str(checkpoint[0])!r}, dtype=torch.float32)\n"
        f"assert isinstance(m.get_submodule({Q_PROJ!r}), Int4Linear)\n"
        "print(m(torch.tensor([[1, 2, 3]])).logits.shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch.Size([1, 3, 320])" in result.stdout
