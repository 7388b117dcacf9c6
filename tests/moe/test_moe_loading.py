"""Loading per-expert INT4 MoE checkpoints into Int4Experts: bit-exact against the real compressed-tensors
library's per-expert decompression, GPTQ / AWQ per-expert tensors, and errors for what is not supported."""

from __future__ import annotations

import json

import pytest
import torch
from moe_helpers import MOE_ARCHS

from int4lora_train.errors import CheckpointError, UnsupportedFormatError
from int4lora_train.modeling import Int4Linear, load_int4_model
from int4lora_train.modeling.int4_experts import Int4Experts
from int4lora_train.modeling.moe import MOE_SPECS
from int4lora_train.quant.checkpoint_dir import CheckpointDir


def _ct_decompress(tensors: dict, symmetric: bool) -> torch.Tensor:
    """compressed-tensors' own decompression of one expert projection (PackedQuantizationCompressor)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=32, symmetric=symmetric)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    return PackedQuantizationCompressor.decompress(dict(tensors), scheme)["weight"]


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_experts_bit_exact_against_compressed_tensors(moe_checkpoints, arch, symmetric):
    pytest.importorskip("compressed_tensors")  # the reference library (a test extra; not on the GPU image)
    _, path = moe_checkpoints(arch, "compressed-tensors", symmetric)
    model = load_int4_model(path, dtype=torch.float32)
    spec = MOE_SPECS[arch]
    checkpoint = CheckpointDir.open(path)
    stored = checkpoint.modules()
    block = spec.checkpoint_block or "mlp"
    experts = [(n, m) for n, m in model.named_modules() if isinstance(m, Int4Experts)]
    assert len(experts) == 2 and all(n.endswith("mlp.experts") for n, _ in experts)
    name, module = experts[0]
    assert module.gate_up_packed.dtype == torch.uint8
    assert module.gate_up_packed.shape == (4, 128, 64) and module.down_packed.shape == (4, 128, 32)
    assert (module.gate_up_zero_points is None) == symmetric
    gate_up, down = module.dequantize("gate_up"), module.dequantize("down")
    layer = name.split(".")[2]
    from safetensors.torch import load_file

    state = load_file(str(path / "model.safetensors"))
    for e in range(4):
        prefix = f"model.layers.{layer}.{block}.experts.{e}"
        parts = []
        for proj in spec.projections:
            keys = stored[f"{prefix}.{proj}"]
            parts.append(_ct_decompress({local: state[key] for local, key in keys.items()}, symmetric))
        gate, up, down_ref = parts
        assert torch.equal(gate_up[e], torch.cat([gate, up])), f"expert {e} gate_up"
        assert torch.equal(down[e], down_ref), f"expert {e} down"
    assert not any(p.dim() == 3 for p in model.parameters()), "no dense expert parameter may remain"


def test_qwen2_moe_shared_expert_stays_int4_linear(moe_checkpoints):
    _, path = moe_checkpoints("qwen2_moe")
    model = load_int4_model(path, dtype=torch.float32)
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.experts, Int4Experts)
    assert all(isinstance(getattr(mlp.shared_expert, p), Int4Linear) for p in ("gate_proj", "up_proj", "down_proj"))
    assert not isinstance(mlp.shared_expert_gate, Int4Linear)  # ignored (re:.*shared_expert_gate$): one row
    report = model.int4_report
    assert any("experts x4" in m.source_format for m in report.converted)


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_gptq_awq_per_expert_tensors(moe_checkpoints, fmt):
    dense, path = moe_checkpoints("qwen3_moe", fmt, False)
    model = load_int4_model(path, dtype=torch.float32)
    module = model.model.layers[1].mlp.experts
    assert isinstance(module, Int4Experts)
    # RTN error of group-32 INT4 on N(0, 0.1) weights is well under a tenth of the weight scale
    reference = dense.model.layers[1].mlp.experts.gate_up_proj.detach()
    error = (module.dequantize("gate_up", torch.float32) - reference).abs().max().item()
    assert 0 < error < 0.05


def test_ct_experts_equal_across_formats(moe_checkpoints):
    """The same RTN weights written as compressed-tensors and as GPTQ load to the same canonical experts."""
    _, ct_path = moe_checkpoints("qwen3_moe", "compressed-tensors", False)
    _, gptq_path = moe_checkpoints("qwen3_moe", "gptq", False)
    a = load_int4_model(ct_path, dtype=torch.float32).model.layers[0].mlp.experts
    b = load_int4_model(gptq_path, dtype=torch.float32).model.layers[0].mlp.experts
    assert torch.equal(a.dequantize("gate_up"), b.dequantize("gate_up"))
    assert torch.equal(a.dequantize("down"), b.dequantize("down"))


def test_missing_expert_tensor_is_named(moe_checkpoints, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    _, path = moe_checkpoints("qwen3_moe")
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    state = load_file(str(broken / "model.safetensors"))
    del state["model.layers.1.mlp.experts.3.up_proj.weight_scale"]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"experts\.3\.up_proj\.weight_scale"):
        load_int4_model(broken)


def test_ignored_experts_are_refused_with_the_fix(moe_checkpoints, tmp_path):
    import shutil

    _, path = moe_checkpoints("qwen3_moe")
    edited = tmp_path / "edited"
    shutil.copytree(path, edited)
    config = json.loads((edited / "config.json").read_text())
    config["quantization_config"]["ignore"].append("re:.*experts\\.2\\..*")
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedFormatError, match=r"experts\.2\.gate_proj is not quantized"):
        load_int4_model(edited)


def test_unsupported_moe_type_is_refused_by_name(tmp_path):
    from int4lora_train.modeling.architectures import check_loadable_architecture

    config = __import__("transformers").OlmoeConfig(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        vocab_size=300,
    )
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedFormatError, match="olmoe.*MoE types"):
        check_loadable_architecture(model, "config.json")
