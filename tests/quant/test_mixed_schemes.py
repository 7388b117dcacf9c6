"""Mixed-precision compressed-tensors checkpoints: W4A16 groups stay packed, weight-only 8-bit (int8 / FP8) groups are
dequantized once at load, bit-exactly as the compressed-tensors library decompresses them; anything else is refused
naming the group."""

from __future__ import annotations

import copy
import json
import logging
import re

import pytest
import torch
from modeling_helpers import tiny
from safetensors.torch import load_file, save_file

from int4lora_train.errors import UnsupportedFormatError
from int4lora_train.quant.checkpoint_config import parse_quantization_config
from int4lora_train.quant.dequant_at_load import dequantize_stored

pytest.importorskip("compressed_tensors")

W4A16 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32, "dynamic": False}


def _weights(kind="int", strategy="channel", group_size=None, symmetric=True, num_bits=8) -> dict:
    return {
        "num_bits": num_bits, "type": kind, "symmetric": symmetric, "strategy": strategy, "group_size": group_size,
        "dynamic": False,
    }  # fmt: skip


def _block(*groups) -> dict:
    """A compressed-tensors block: ``groups`` are (targets, weights, format[, input_activations])."""
    config_groups = {}
    for i, (targets, weights, fmt, *acts) in enumerate(groups):
        config_groups[f"group_{i}"] = {
            "targets": targets, "weights": weights, "format": fmt,
            "input_activations": acts[0] if acts else None, "output_activations": None,
        }  # fmt: skip
    return {
        "quant_method": "compressed-tensors", "format": "mixed-precision", "quantization_status": "compressed",
        "config_groups": config_groups, "ignore": ["lm_head"],
    }  # fmt: skip


def _ct_compress(weight: torch.Tensor, weights: dict, fmt: str):
    """The library: observer -> compress -> decompress. Returns (stored tensors, the library's dense weight)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(**{k: v for k, v in weights.items() if v is not None})
    out_features = weight.shape[0]
    if args.strategy == "group":
        grouped = weight.reshape(out_features, -1, args.group_size)
        low, high = grouped.amin(-1), grouped.amax(-1)
    elif args.strategy == "channel":
        low, high = weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
    else:
        low, high = weight.amin().reshape(1), weight.amax().reshape(1)
    scale, zero_point = calculate_qparams(low, high, args)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    stored = compressor.compress({"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point}, scheme)
    stored = {k: v.contiguous() for k, v in stored.items()}
    dense = compressor.decompress(dict(stored), scheme)["weight"]
    return stored, dense


CASES = [
    ("pack-quantized", _weights("int", "channel")),
    ("pack-quantized", _weights("int", "channel", symmetric=False)),
    ("pack-quantized", _weights("int", "group", 32)),
    ("pack-quantized", _weights("int", "group", 32, symmetric=False)),
    ("pack-quantized", _weights("int", "tensor")),
    ("int-quantized", _weights("int", "channel")),
    ("int-quantized", _weights("int", "group", 32, symmetric=False)),
    ("float-quantized", _weights("float", "channel")),
    ("float-quantized", _weights("float", "tensor")),
    ("naive-quantized", _weights("float", "group", 32)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt, weights", CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_dequantized_at_load_equals_the_library_bit_for_bit(fmt, weights, dtype):
    weight = torch.randn(24, 96, generator=torch.Generator().manual_seed(1)).to(dtype)
    stored, dense = _ct_compress(weight, weights, fmt)
    scheme = parse_quantization_config(_block((["re:.*mlp.*"], W4A16, "pack-quantized"), (["Linear"], weights, fmt)))
    scheme = scheme.groups[1].scheme
    assert scheme.dequantize and scheme.treatment == "dequantized at load"
    ours = dequantize_stored(stored, scheme, "layer", dtype)
    assert ours.dtype == dense.dtype == dtype
    assert torch.equal(ours, dense)


def test_mixed_block_parses_every_group_with_its_treatment():
    block = _block(
        (["re:.*mlp.*"], W4A16, "pack-quantized"),
        (["re:.*self_attn.*"], _weights("int", "channel"), "pack-quantized"),
        (["re:.*layers\\.1\\..*"], _weights("float", "tensor"), "float-quantized"),
    )
    config = parse_quantization_config(block)
    assert [g.scheme.treatment for g in config.groups] == ["packed INT4", "dequantized at load", "dequantized at load"]
    assert (
        config.scheme_for("model.layers.0.self_attn.q_proj", "Linear").describe() == "int8 channel sym (pack-quantized)"
    )
    assert config.group_for("model.layers.0.mlp.up_proj", "Linear").name == "group_0"


@pytest.mark.parametrize(
    "group, found",
    [
        ((["Linear"], _weights("int", "channel"), "int-quantized", {"num_bits": 8, "type": "int"}), "activation"),
        ((["Linear"], _weights("float", "tensor"), "float-quantized", {"num_bits": 8, "type": "float"}), "activation"),
        ((["Linear"], _weights("int", "group", 32, num_bits=2), "pack-quantized"), "num_bits is 2"),
        ((["Linear"], _weights("float", "group", 16, num_bits=4), "nvfp4-pack-quantized"), "FP4"),
        ((["Linear"], _weights("int", "channel", num_bits=8), "marlin-24"), "Marlin"),
    ],
)
def test_unhandled_groups_are_refused_naming_the_group_and_the_fix(group, found):
    block = _block((["re:.*mlp.*"], W4A16, "pack-quantized"), group)
    with pytest.raises(UnsupportedFormatError, match=found) as info:
        parse_quantization_config(block, "some/config.json")
    assert "config_groups.group_1" in str(info.value)
    assert "some/config.json" in str(info.value)


def test_a_checkpoint_without_int4_groups_is_refused():
    with pytest.raises(UnsupportedFormatError, match="every config group is 8-bit"):
        parse_quantization_config(_block((["Linear"], _weights("int", "channel"), "pack-quantized")))


# ---------------------------------------------------------------------------------------------- a whole checkpoint

INT8_GROUP = ("re:.*layers\\.0\\.self_attn\\..*", _weights("int", "group", 32, symmetric=False), "pack-quantized")
FP8_GROUP = ("re:.*layers\\.1\\.self_attn\\.(q|k|v)_proj$", _weights("float", "channel"), "float-quantized")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A tiny Llama: MLPs W4A16 (the toolkit's packer), layer 0 attention int8 pack-quantized (asym, group 32), layer
    1 q/k/v FP8 (the library's compressors), layer 1 o_proj and lm_head dense. Returns (path, the dense model the
    library's decompression gives)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from int4lora_train.modeling.tiny_models import build_tokenizer
    from int4lora_train.quant.packer import save_int4_checkpoint

    model = tiny("llama")
    path = tmp_path_factory.mktemp("mixed") / "llama-mixed"
    save_int4_checkpoint(
        model, path, group_size=32, ignore=["lm_head", "re:.*self_attn.*"], tokenizer=build_tokenizer()
    )
    reference = copy.deepcopy(model)
    tensors = load_file(path / "model.safetensors")
    for target, weights, fmt in (INT8_GROUP, FP8_GROUP):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and re.match(target[3:], name):
                stored, dense = _ct_compress(module.weight.detach(), weights, fmt)
                del tensors[f"{name}.weight"]
                tensors.update({f"{name}.{local}": t for local, t in stored.items()})
                reference.get_submodule(name).weight.data = dense
    four_bit = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**{**W4A16}))
    packed = BaseCompressor.get_value_from_registry("pack-quantized")
    for name, module in reference.named_modules():
        if f"{name}.weight_packed" in tensors and ".mlp." in name:
            own = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
            module.weight.data = packed.decompress(own, four_bit)["weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = _block(
        (["re:.*mlp.*"], W4A16, "pack-quantized"), ([INT8_GROUP[0]], *INT8_GROUP[1:]), ([FP8_GROUP[0]], *FP8_GROUP[1:])
    )
    (path / "config.json").write_text(json.dumps(config))
    return path, reference


def test_loaded_mixed_checkpoint_equals_the_library_decompressed_model(mixed, caplog):
    from int4lora_train.modeling import Int4Linear, load_int4_model

    path, reference = mixed
    with caplog.at_level(logging.INFO, logger="int4lora_train.modeling.loader"):
        model = load_int4_model(path, dtype=torch.float32)
    q0 = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert type(q0) is torch.nn.Linear and not q0.weight.requires_grad and q0.weight.dtype == torch.float32
    assert isinstance(model.get_submodule("model.layers.0.mlp.up_proj"), Int4Linear)
    assert type(model.get_submodule("model.layers.1.self_attn.o_proj")) is torch.nn.Linear
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.k_proj"):
        assert torch.equal(model.get_submodule(name).weight, reference.get_submodule(name).weight)
    tokens = torch.randint(0, reference.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(tokens).logits, reference.eval()(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("config group")]
    assert len(logged) == 2  # one line per 8-bit group
    assert "group_1" in logged[0] and "4 linear(s)" in logged[0] and "MiB" in logged[0]
    assert "group_2" in logged[1] and "3 linear(s)" in logged[1]
    reasons = {m.name: m.reason for m in model.int4_report.left_dense}
    assert reasons["model.layers.1.self_attn.v_proj"].startswith("dequantized at load from config group group_2")
    assert "not targeted" in reasons["model.layers.1.self_attn.o_proj"]


def test_lora_attaches_to_dequantized_modules_and_the_fingerprint_covers_them(mixed, tmp_path):
    import shutil

    from peft import LoraConfig, get_peft_model

    from int4lora_train.export.fingerprint import checkpoint_identity, model_identity
    from int4lora_train.modeling import load_int4_model

    path, _ = mixed
    model = load_int4_model(path, dtype=torch.float32)
    bare = model_identity(model)
    on_disk = checkpoint_identity(path)
    assert bare.fingerprint == on_disk.fingerprint
    assert "model.layers.1.self_attn.q_proj" in on_disk.module_digests
    assert "model.layers.0.mlp.up_proj" in on_disk.module_digests

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    wrapped = peft_model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert hasattr(wrapped, "lora_A") and type(wrapped.base_layer) is torch.nn.Linear
    assert model_identity(peft_model).fingerprint == bare.fingerprint
    peft_model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    assert wrapped.lora_B["default"].weight.grad is not None
    assert wrapped.base_layer.weight.grad is None

    changed = shutil.copytree(path, tmp_path / "changed")
    tensors = load_file(changed / "model.safetensors")
    key = "model.layers.1.self_attn.q_proj.weight_scale"
    tensors[key] = tensors[key] * 2
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    other = checkpoint_identity(changed)
    assert other.fingerprint != on_disk.fingerprint
    differ = [n for n in on_disk.module_digests if on_disk.module_digests[n] != other.module_digests[n]]
    assert differ == ["model.layers.1.self_attn.q_proj"]


def test_inspect_shows_every_group_and_its_treatment(mixed, tmp_path, capsys):
    from int4lora_train.cli import main
    from int4lora_train.quant.inspect import inspect_checkpoint

    path, _ = mixed
    table = inspect_checkpoint(path).table()
    assert "group_0: targets ['re:.*mlp.*'] -- int4 group 32 sym (pack-quantized) -> packed INT4" in table
    assert "int8 group 32 asym (pack-quantized) -> dequantized at load to nn.Linear (4 modules" in table
    assert "fp8 channel sym (float-quantized) -> dequantized at load to nn.Linear (3 modules" in table

    refused = tmp_path / "refused"
    refused.mkdir()
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_2"]["input_activations"] = {"num_bits": 8, "type": "float"}
    (refused / "config.json").write_text(json.dumps(config))
    (refused / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    assert main(["inspect", str(refused)]) != 0
    out = capsys.readouterr()
    assert "group_2: targets" in out.out and "-> refused: " in out.out
    assert "group_1: targets" in out.out and "dequantized at load" in out.out
