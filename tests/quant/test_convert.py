"""`int4lora-train quantize`: a dense save_pretrained directory -> an INT4 checkpoint the loader (and
compressed-tensors) read back, with a per-layer error report and the toolkit's directory rules."""

from __future__ import annotations

import json

import pytest
import torch

from int4lora_train import cli
from int4lora_train.modeling.int4_linear import Int4Linear
from int4lora_train.modeling.loader import load_int4_model
from int4lora_train.modeling.tiny_models import build_tiny_model, build_tokenizer
from int4lora_train.quant.checkpoint_config import read_checkpoint_quant_config
from int4lora_train.quant.convert import layer_error, quantize_checkpoint
from int4lora_train.quant.dequant import dequantize_torch
from int4lora_train.quant.packer import quantize_rtn


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A tiny dense Llama (fp32) saved with save_pretrained, with its tokenizer; returns (directory, model)."""
    model = build_tiny_model("llama", seed=3, dtype=torch.float32)
    path = tmp_path_factory.mktemp("dense") / "model"
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path, model


def _dense_linears(model) -> dict[str, torch.Tensor]:
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def test_quantize_command_writes_a_checkpoint_the_loader_reads(dense, tmp_path, capsys):
    path, model = dense
    out = tmp_path / "int4"
    assert cli.main(["quantize", "-q", str(path), str(out), "--group-size", "32", "--per-layer"]) == 0
    printed = capsys.readouterr().out
    linears = _dense_linears(model)
    assert f"{len(linears)} linear layers quantized" in printed
    assert "model.layers.1.mlp.down_proj" in printed  # --per-layer
    block = json.loads((out / "config.json").read_text())["quantization_config"]
    assert block["quant_method"] == "compressed-tensors"
    loaded = load_int4_model(out, dtype=torch.float32)
    for name, weight in linears.items():
        module = loaded.get_submodule(name)
        assert isinstance(module, Int4Linear), name
        expected = dequantize_torch(quantize_rtn(weight.detach(), 32, True))
        assert torch.equal(dequantize_torch(module.int4_weight()), expected), name
    assert not isinstance(loaded.lm_head, Int4Linear)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_error_report_measures_the_dequantized_weight(dense, tmp_path):
    path, model = dense
    report = quantize_checkpoint(path, tmp_path / "int4", group_size=32, symmetric=False)
    errors = {e.name: e for e in report.layers}
    assert set(errors) == set(_dense_linears(model))
    for name, weight in _dense_linears(model).items():
        weight = weight.detach()
        dequantized = dequantize_torch(quantize_rtn(weight, 32, False), torch.float32)
        diff = (weight - dequantized).abs()
        assert errors[name].max_rel == pytest.approx(float(diff.max() / weight.abs().max()), rel=1e-5)
        assert errors[name].mean_rel == pytest.approx(float(diff.mean() / weight.abs().mean()), rel=1e-5)
        assert 0 < errors[name].mean_rel < 0.2  # 4 bits: a few percent, never zero on random weights
    # An all-zero weight quantizes exactly: 0, not 0 / 0.
    zeros = torch.zeros(8, 32)
    assert layer_error("x", zeros, quantize_rtn(zeros, 32, True)) == layer_error("x", zeros, quantize_rtn(zeros, 32))
    assert layer_error("x", zeros, quantize_rtn(zeros, 32, True)).max_rel == 0


@pytest.mark.parametrize(("fmt", "symmetric"), [("gptq", True), ("gptq", False), ("awq", False)])
def test_gptq_and_awq_formats(dense, tmp_path, fmt, symmetric):
    path, model = dense
    option = "--symmetric" if symmetric else "--asymmetric"
    assert (
        cli.main(["quantize", "-q", str(path), str(tmp_path / fmt), "--format", fmt, "--group-size", "32", option]) == 0
    )
    assert read_checkpoint_quant_config(tmp_path / fmt).quant_method == fmt
    loaded = load_int4_model(tmp_path / fmt, dtype=torch.float32)
    name, weight = "model.layers.0.self_attn.q_proj", model.model.layers[0].self_attn.q_proj.weight.detach()
    expected = dequantize_torch(quantize_rtn(weight, 32, symmetric))
    assert torch.equal(dequantize_torch(loaded.get_submodule(name).int4_weight()), expected)


def test_existing_output_is_refused_unless_overwrite_and_toolkit_owned(dense, tmp_path, capsys):
    path, _ = dense
    out = tmp_path / "int4"
    argv = ["quantize", "-q", str(path), str(out), "--group-size", "32"]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main([*argv, "--overwrite"]) == 0  # the toolkit's own checkpoint: replaced
    (out / "NOTES.txt").write_text("mine", encoding="utf-8")
    assert cli.main([*argv, "--overwrite"]) == 2
    assert "NOTES.txt" in capsys.readouterr().err
    assert (out / "NOTES.txt").read_text(encoding="utf-8") == "mine"


def test_bad_inputs_are_named(dense, tmp_path, capsys):
    path, _ = dense
    assert cli.main(["quantize", "-q", str(tmp_path / "nowhere"), str(tmp_path / "a")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert cli.main(["quantize", "-q", str(path), str(tmp_path / "b"), "--group-size", "48"]) == 2
    assert "not a multiple of group_size=48" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert cli.main(["quantize", "-q", str(path), str(tmp_path / "c"), "--group-size", "32"]) == 0
    assert cli.main(["quantize", "-q", str(tmp_path / "c"), str(tmp_path / "d")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert cli.main(["quantize", "-q", str(path), str(path / "inside")]) == 2
    assert "inside the dense checkpoint" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
def test_compressed_tensors_reads_the_output(dense, tmp_path):
    pytest.importorskip("compressed_tensors")
    import transformers

    path, model = dense
    out = tmp_path / "int4"
    assert cli.main(["quantize", "-q", str(path), str(out), "--group-size", "32", "--dtype", "bfloat16"]) == 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, quantization_config=transformers.CompressedTensorsConfig(dequantize=True)
    )
    for name, weight in _dense_linears(model).items():
        expected = dequantize_torch(quantize_rtn(weight.detach().to(torch.bfloat16), 32, True))
        assert torch.equal(loaded.get_submodule(name).weight, expected), name
