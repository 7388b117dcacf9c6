"""What vLLM's MoE LoRA loader accepts, as the toolkit's export rules see it."""

from __future__ import annotations

from int4lora_train.export.vllm_rules import module_violations, moe_expert_violations


def test_per_expert_keys_pass_for_qwen_moe():
    modules = [f"model.layers.0.mlp.experts.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")]
    modules += ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.shared_expert.gate_proj"]
    assert module_violations("qwen3_moe", modules) == ([], [])
    assert module_violations("qwen2_moe", modules) == ([], [])


def test_fused_3d_expert_lora_is_refused_with_the_fix():
    errors, _ = module_violations("qwen3_moe", ["model.layers.0.mlp.experts", "model.layers.0.mlp.experts.base_layer"])
    assert len(errors) == 2 and "target_modules=['experts']" in errors[0]


def test_mixtral_expert_lora_needs_vllms_block_name():
    errors = moe_expert_violations("mixtral", ["model.layers.0.mlp.experts.1.w1"])
    assert errors and "block_sparse_moe" in errors[0]
    assert moe_expert_violations("mixtral", ["model.layers.0.block_sparse_moe.experts.1.w1"]) == []
    assert moe_expert_violations("mixtral", ["model.layers.0.block_sparse_moe.experts.1.gate_proj"])


def test_qwen2_moe_has_no_embedding_lora_and_attention_passes_for_mixtral():
    errors, _ = module_violations("qwen2_moe", ["lm_head"])
    assert errors
    assert module_violations("mixtral", ["model.layers.1.self_attn.o_proj"]) == ([], [])
