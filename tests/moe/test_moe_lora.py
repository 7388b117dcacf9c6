"""LoRA on INT4 MoE models: attention / shared-expert LoRA through PEFT as on dense models, per-expert LoRA on
Int4Experts (target "experts"), saved in vLLM's per-expert layout and reloaded by PEFT."""

from __future__ import annotations

import pytest
import torch
from moe_helpers import tiny_moe
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from int4lora_train.modeling import Int4LoraLinear, load_int4_model
from int4lora_train.modeling.expert_lora import Int4ExpertsLora
from int4lora_train.modeling.moe import dequantized_moe_copy

TOKENS = torch.tensor([[1, 5, 9, 200, 33, 7, 81, 12, 64, 3, 99, 150]])
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _randomise_lora(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _train_briefly(peft_model, steps: int = 4) -> list[float]:
    """``steps`` AdamW steps on the adapters (lr 1e-3) on :data:`TOKENS`; the losses."""
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = peft_model(TOKENS, labels=TOKENS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_attention_and_shared_expert_lora_train_and_reload(moe_checkpoints, arch, tmp_path):
    _, path = moe_checkpoints(arch)
    model = load_int4_model(path, dtype=torch.float32)
    targets = ATTENTION + (["gate_proj", "up_proj", "down_proj"] if arch == "qwen2_moe" else [])
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    wrapped = [n for n, m in peft_model.named_modules() if isinstance(m, Int4LoraLinear)]
    assert len(wrapped) == 2 * len(targets)  # 2 layers; experts untouched (not Linear)
    assert not any(isinstance(m, Int4ExpertsLora) for m in peft_model.modules())
    losses = _train_briefly(peft_model)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        want = peft_model(TOKENS).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_int4_model(path, dtype=torch.float32), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, want)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_expert_lora_matches_dense_reference_and_saves_per_expert(moe_checkpoints, arch, tmp_path):
    _, path = moe_checkpoints(arch)
    model = load_int4_model(path, dtype=torch.float32)
    reference = dequantized_moe_copy(model)  # the dense model the INT4 base computes
    config = LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION + ["experts"])
    peft_model = get_peft_model(model, config)
    experts = [m for m in peft_model.modules() if isinstance(m, Int4ExpertsLora)]
    assert len(experts) == 2
    _randomise_lora(peft_model)
    with torch.no_grad():
        got = peft_model(TOKENS).logits
        peft_model.disable_adapter_layers()
        base = peft_model(TOKENS).logits
        peft_model.enable_adapter_layers()
    assert (got - base).abs().max() > 1e-2

    # Dense reference: the dequantized model with every LoRA folded into its dense weights.
    with torch.no_grad():
        for layer_ref, layer in zip(reference.model.layers, peft_model.base_model.model.model.layers):
            lora = layer.mlp.experts
            w = lora.lora_experts["default"]
            s = lora.scaling["default"]
            gate = torch.einsum("eir,erh->eih", w.gate_B, w.gate_A) * s
            up = torch.einsum("eir,erh->eih", w.up_B, w.up_A) * s
            down = torch.einsum("ehr,eri->ehi", w.down_B, w.down_A) * s
            layer_ref.mlp.experts.gate_up_proj += torch.cat([gate, up], dim=1)
            layer_ref.mlp.experts.down_proj += down
            for proj in ATTENTION:
                dense_linear = getattr(layer_ref.self_attn, proj)
                lora_linear = getattr(layer.self_attn, proj)
                delta = lora_linear.lora_B["default"].weight @ lora_linear.lora_A["default"].weight
                dense_linear.weight += delta * lora_linear.scaling["default"]
        want = reference(TOKENS).logits
    assert (got - want).abs().max().item() <= 1e-4

    peft_model.save_pretrained(tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    gate, up, down = peft_model.base_model.model.model.layers[0].mlp.experts.base_layer.projection_names
    key = f"base_model.model.model.layers.0.mlp.experts.3.{gate}.lora_A.weight"
    assert saved[key].shape == (4, 128)
    assert saved[f"base_model.model.model.layers.0.mlp.experts.3.{gate}.lora_B.weight"].shape == (64, 4)
    assert saved[f"base_model.model.model.layers.1.mlp.experts.0.{down}.lora_A.weight"].shape == (4, 64)
    assert not any(k.count("lora_experts") for k in saved)
    reloaded = PeftModel.from_pretrained(load_int4_model(path, dtype=torch.float32), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, got)


def test_expert_lora_trains_only_adapters(moe_checkpoints):
    _, path = moe_checkpoints("qwen3_moe")
    model = load_int4_model(path, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["experts"]))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_experts" in n for n in trainable)
    losses = _train_briefly(peft_model)
    assert losses[-1] < losses[0]


def test_dense_moe_skeleton_is_untouched_by_peft_registration():
    model = tiny_moe("qwen3_moe")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=ATTENTION))
    assert not any(isinstance(m, (Int4ExpertsLora, Int4LoraLinear)) for m in peft_model.modules())
