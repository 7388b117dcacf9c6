"""export_adapter: the files and keys vLLM reads, the rules it enforces, folding per-module scales, atomic writes,
and the exported adapter reloaded with plain PEFT reproducing the trained model."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from int4lora_train.atomic import MARKER
from int4lora_train.errors import CheckpointError, ExportError
from int4lora_train.export import SIDECAR_NAME, checkpoint_identity, export_adapter, read_sidecar
from int4lora_train.export.vllm_rules import mis_scaled_modules
from int4lora_train.modeling import load_int4_model

TOKENS = torch.tensor([[257, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]])


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(input_ids=TOKENS).logits


def test_export_writes_the_files_and_keys_vllm_reads(lora_model, tiny_checkpoint, tmp_path, projections):
    report = export_adapter(lora_model, tmp_path / "adapter", base_model_dir=tiny_checkpoint)
    out = tmp_path / "adapter"
    names = ["adapter_config.json", "adapter_model.safetensors", SIDECAR_NAME, MARKER]  # MARKER: the toolkit wrote it
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    tensors = load_file(out / "adapter_model.safetensors")
    expected = {
        f"base_model.model.model.layers.{layer}.{block}.{proj}.lora_{ab}.weight"
        for layer in range(2)
        for block, projs in (("self_attn", projections[:4]), ("mlp", projections[4:]))
        for proj in projs
        for ab in "AB"
    }
    assert set(tensors) == expected
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["inference_mode"]) == (8, 16, True)
    assert config["base_model_name_or_path"] == str(tiny_checkpoint)
    assert report.max_lora_rank == 8 and report.num_tensors == 28 and len(report.modules) == 14
    assert report.target_modules == sorted(projections)
    # The sidecar identifies the base the adapter was trained on: the checkpoint it was loaded from.
    assert read_sidecar(out).fingerprint == checkpoint_identity(tiny_checkpoint).fingerprint
    assert f"--lora-modules adapter={out} --max-lora-rank 8" in report.commands["api_server"]
    assert str(tiny_checkpoint) in report.commands["vllm_serve"]
    assert "LoRARequest('adapter', 1," in report.summary()


def test_exported_adapter_reloaded_with_plain_peft_reproduces_the_trained_model(lora_model, tiny_checkpoint, tmp_path):
    export_adapter(lora_model, tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_int4_model(tiny_checkpoint, dtype=torch.float32), tmp_path / "adapter")
    trained, again = _logits(lora_model), _logits(reloaded)
    with lora_model.disable_adapter():
        base = _logits(lora_model)
    assert (trained - base).abs().max() > 0.1  # the adapter does something ...
    assert (again - trained).abs().max() <= 1e-5  # ... and the export reproduces it


def test_per_module_scales_are_refused_unless_folded(int4_model, tiny_checkpoint, tmp_path, projections, lora_helpers):
    seeded_peft_model, randomize_lora_b = lora_helpers
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=projections, rank_pattern={"down_proj": 16}, alpha_pattern={"o_proj": 64}
    )
    model = seeded_peft_model(int4_model, config)
    randomize_lora_b(model, std=0.05)
    with pytest.raises(ExportError, match="fold_scaling=True") as refused:
        export_adapter(model, tmp_path / "refused")
    assert "model.layers.0.mlp.down_proj" in str(refused.value)
    assert not (tmp_path / "refused").exists()

    report = export_adapter(model, tmp_path / "folded", fold_scaling=True)
    assert report.folded == pytest.approx(
        {f"model.layers.{i}.{m}": f for i in range(2) for m, f in (("mlp.down_proj", 0.5), ("self_attn.o_proj", 4.0))}
    )
    exported = json.loads((tmp_path / "folded" / "adapter_config.json").read_text())
    assert exported["rank_pattern"] == {"down_proj": 16}  # PEFT needs it for the tensor shapes
    ranks = {m: 16 if m.endswith("down_proj") else 8 for m in report.modules}
    assert mis_scaled_modules(exported, ranks) == {}  # one global alpha/r is right for every module now
    assert report.max_lora_rank == 16
    # Plain PEFT reading the folded adapter gives the patterned model's outputs.
    reloaded = PeftModel.from_pretrained(load_int4_model(tiny_checkpoint, dtype=torch.float32), tmp_path / "folded")
    assert (_logits(reloaded) - _logits(model)).abs().max() <= 1e-5
    # The folded lora_B of down_proj is the original times alpha_i/r_i / (alpha/r) = (16/16) / (16/8).
    original = model.base_model.model.model.layers[0].mlp.down_proj.lora_B["default"].weight
    folded = load_file(tmp_path / "folded" / "adapter_model.safetensors")
    torch.testing.assert_close(
        folded["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"], original.detach() * 0.5, rtol=0, atol=0
    )


def test_a_rank_outside_vllms_set_gets_the_next_allowed_max_lora_rank(int4_model, tmp_path):
    model = get_peft_model(int4_model, LoraConfig(r=12, lora_alpha=24, target_modules=["q_proj"]))
    report = export_adapter(model, tmp_path / "r12")
    assert (report.r, report.max_lora_rank) == (12, 16)
    assert "--max-lora-rank 16" in report.commands["api_server"]


def _write_adapter(directory, config: dict, tensors: dict) -> None:
    directory.mkdir(parents=True)
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "none"}
    (directory / "adapter_config.json").write_text(json.dumps({**base, **config}))
    save_file(tensors, str(directory / "adapter_model.safetensors"))


def _pair(module: str, r: int = 4, dims: tuple[int, int] = (128, 128)) -> dict:
    return {
        f"base_model.model.{module}.lora_A.weight": torch.randn(r, dims[1]),
        f"base_model.model.{module}.lora_B.weight": torch.randn(dims[0], r),
    }


def test_every_violation_is_reported_at_once_with_its_fix(tmp_path):
    tensors = _pair("model.layers.0.self_attn.q_proj") | _pair("lm_head", dims=(320, 128))
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(128)
    _write_adapter(tmp_path / "bad", {"use_dora": True, "modules_to_save": ["score"], "bias": "all"}, tensors)
    with pytest.raises(ExportError) as error:
        export_adapter(tmp_path / "bad", tmp_path / "out", model_type="qwen2")
    message = str(error.value)
    for expected in (
        "use_dora=False",
        "modules_to_save",
        "bias='none'",
        "lora_magnitude_vector",
        "lm_head",
        "Qwen2ForCausalLM",
    ):
        assert expected in message
    assert "(5 problem(s))" in message
    assert not (tmp_path / "out").exists()


def test_base_embeddings_peft_may_save_are_dropped(tmp_path):
    tensors = _pair("model.layers.0.self_attn.q_proj")
    tensors["base_model.model.model.embed_tokens.base_layer.weight"] = torch.randn(320, 128)
    _write_adapter(tmp_path / "a", {}, tensors)
    report = export_adapter(tmp_path / "a", tmp_path / "out", model_type="llama")
    assert report.dropped_keys == ["base_model.model.model.embed_tokens.base_layer.weight"]
    assert set(load_file(tmp_path / "out" / "adapter_model.safetensors")) == set(
        _pair("model.layers.0.self_attn.q_proj")
    )


def test_an_unknown_architecture_only_warns(tmp_path):
    _write_adapter(tmp_path / "a", {}, _pair("transformer.h.0.attn.c_attn"))
    report = export_adapter(tmp_path / "a", tmp_path / "out", model_type="gpt2")
    assert report.warnings and "gpt2" in report.warnings[0]


def test_existing_output_is_never_replaced_unless_asked(lora_model, tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ExportError, match="overwrite=True"):
        export_adapter(lora_model, out)
    with pytest.raises(ExportError, match="not written by int4lora-train"):  # overwrite replaces only its own
        export_adapter(lora_model, out, overwrite=True)
    assert (out / "mine.txt").read_text() == "keep me"
    export_adapter(lora_model, out, overwrite=True, force=True)  # told explicitly
    assert not (out / "mine.txt").exists() and (out / "adapter_model.safetensors").is_file()
    export_adapter(lora_model, out, overwrite=True)  # its own export: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary or backup directories left


def test_an_adapter_recorded_for_another_base_is_refused_for_this_base_dir(lora_model, tmp_path, make_checkpoint):
    export_adapter(lora_model, tmp_path / "adapter")
    other = make_checkpoint(tmp_path / "other-base", seed=7)
    with pytest.raises(ExportError, match="different INT4 base"):
        export_adapter(tmp_path / "adapter", tmp_path / "again", base_model_dir=other)


def test_exporting_from_a_directory_keeps_the_recorded_base(lora_model, tmp_path):
    first = export_adapter(lora_model, tmp_path / "first")
    second = export_adapter(tmp_path / "first", tmp_path / "second", dtype=torch.float16)
    assert second.base.fingerprint == first.base.fingerprint
    tensors = load_file(tmp_path / "second" / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float16}


def test_pickled_adapters_are_not_read(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(
        json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
    )
    torch.save({}, tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="safe_serialization=True"):
        export_adapter(tmp_path / "a", tmp_path / "out")
