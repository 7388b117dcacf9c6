"""vLLM's adapter rules: ranks, config fields, tensor keys, supported modules, scales, serve commands; and the
module table checked against the installed vLLM's model classes."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from int4lora_train.errors import ExportError
from int4lora_train.export import vllm_rules
from int4lora_train.export.vllm_rules import (
    MAX_LORA_RANKS,
    VLLM_LORA_MODULES,
    config_violations,
    max_lora_rank_for,
    mis_scaled_modules,
    module_violations,
    parse_lora_key,
    serve_commands,
)

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
BASE_CONFIG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "bias": "none"}


@pytest.mark.parametrize(("rank", "expected"), [(1, 1), (2, 8), (8, 8), (9, 16), (64, 64), (300, 320), (321, 512)])
def test_max_lora_rank_is_the_smallest_allowed_value_at_least_r(rank, expected):
    assert max_lora_rank_for(rank) == expected
    assert expected in MAX_LORA_RANKS


@pytest.mark.parametrize("rank", [0, 513])
def test_ranks_vllm_cannot_serve_are_refused(rank):
    with pytest.raises(ExportError, match="rank"):
        max_lora_rank_for(rank)


def test_a_plain_lora_config_has_no_violations():
    assert config_violations(BASE_CONFIG) == []
    assert config_violations({**BASE_CONFIG, "use_rslora": True, "init_lora_weights": "gaussian"}) == []


@pytest.mark.parametrize(
    ("field", "value", "fix"),
    [
        ("use_dora", True, "use_dora=False"),
        ("modules_to_save", ["lm_head"], "merge_to_dense"),
        ("bias", "all", "bias='none'"),
        ("lora_bias", True, "lora_bias=False"),
        ("init_lora_weights", "pissa", "path_initial_model_for_weight_conversion"),
        ("alora_invocation_tokens", [1, 2], "aLoRA"),
        ("layer_replication", [[0, 1]], "layer_replication"),
        ("use_qalora", True, "use_qalora=False"),
        ("trainable_token_indices", [3], "trainable_token_indices"),
        ("target_parameters", ["experts.gate_up_proj"], "target_modules"),
    ],
)
def test_each_refused_config_field_is_named_with_its_fix(field, value, fix):
    problems = config_violations({**BASE_CONFIG, field: value})
    assert len(problems) == 1 and field in problems[0] and fix in problems[0]


def test_missing_required_fields_and_other_peft_types_are_refused():
    assert any("lora_alpha" in p for p in config_violations({"r": 8, "target_modules": ["q_proj"]}))
    assert "LORA" in config_violations({**BASE_CONFIG, "peft_type": "IA3"})[0]


def test_lora_keys_parse_as_vllm_does():
    key = parse_lora_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    assert (key.module, key.part, key.is_a, key.leaf) == ("model.layers.0.self_attn.q_proj", "lora_A", True, "q_proj")
    embedding = parse_lora_key("base_model.model.model.embed_tokens.lora_embedding_B")
    assert embedding.is_embedding and not embedding.is_a
    assert embedding.key() == "base_model.model.model.embed_tokens.lora_embedding_B"
    assert parse_lora_key("base_model.model.model.embed_tokens.base_layer.weight") is None  # vLLM skips it


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", "DoRA"),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", "lora_bias"),
        ("base_model.model.lm_head.modules_to_save.default.weight", "modules_to_save"),
        ("base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta", "trainable"),
    ],
)
def test_keys_vllm_rejects_are_errors_that_say_why(key, message):
    with pytest.raises(ExportError, match=message):
        parse_lora_key(key)


def test_module_support_follows_each_architecture():
    llama = ["model.layers.0.self_attn.q_proj", "lm_head", "model.embed_tokens"]
    assert module_violations("llama", llama) == ([], [])
    errors, _ = module_violations("qwen2", ["model.layers.0.mlp.up_proj", "lm_head"])
    assert len(errors) == 1 and "lm_head" in errors[0] and "embedding_modules" in errors[0]
    errors, _ = module_violations("phi3", ["model.layers.0.self_attn.q_proj"])
    assert errors and "qkv_proj" in errors[0]  # Phi-3 keeps the fused projection names
    assert module_violations("phi3", ["model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"]) == (
        [],
        [],
    )
    errors, warnings = module_violations("falcon", ["transformer.h.0.self_attention.query_key_value"])
    assert errors == [] and "falcon" in warnings[0]


def test_scales_that_differ_from_the_global_ratio_are_found():
    config = {**BASE_CONFIG, "rank_pattern": {"down_proj": 16}, "alpha_pattern": {"o_proj": 64}}
    ranks = {
        "model.layers.0.mlp.down_proj": 16,
        "model.layers.0.self_attn.o_proj": 8,
        "model.layers.0.self_attn.q_proj": 8,
    }
    assert mis_scaled_modules(config, ranks) == pytest.approx(
        {"model.layers.0.mlp.down_proj": (16 / 16) / 2, "model.layers.0.self_attn.o_proj": (64 / 8) / 2}
    )
    # A pattern that keeps alpha/r equal to the global ratio is harmless.
    consistent = {**BASE_CONFIG, "rank_pattern": {"down_proj": 16}, "alpha_pattern": {"down_proj": 32}}
    assert mis_scaled_modules(consistent, ranks) == {}
    rslora = {**BASE_CONFIG, "use_rslora": True, "rank_pattern": {"down_proj": 32}}
    factor = mis_scaled_modules(rslora, {"model.layers.0.mlp.down_proj": 32})["model.layers.0.mlp.down_proj"]
    assert factor == pytest.approx((16 / math.sqrt(32)) / (16 / math.sqrt(8)))


def test_serve_commands_name_the_base_the_adapter_and_the_rank():
    commands = serve_commands("/models/base w4", "/adapters/a", 16, lora_name="mine", dtype="float16")
    assert commands["api_server"].startswith("python -m vllm.entrypoints.openai.api_server --model '/models/base w4'")
    for command in (commands["api_server"], commands["vllm_serve"]):
        assert "--enable-lora --lora-modules mine=/adapters/a --max-lora-rank 16" in command
    assert commands["vllm_serve"].startswith("vllm serve ")
    assert "LoRARequest('mine', 1, '/adapters/a')" in commands["offline"] and "max_lora_rank=16" in commands["offline"]
    compile(commands["offline"], "offline", "exec")
    with pytest.raises(ExportError):
        serve_commands("b", "a", 12)


_INSPECT_VLLM = r"""
import json, typing
from vllm.config.lora import MaxLoRARanks
from vllm.lora.peft_helper import PEFTHelper
from vllm.model_executor.models import llama, mistral, qwen2, qwen3, phi3, gemma2, qwen3_moe, qwen2_moe, mixtral
classes = {"llama": llama.LlamaForCausalLM, "mistral": mistral.MistralForCausalLM, "qwen2": qwen2.Qwen2ForCausalLM,
           "qwen3": qwen3.Qwen3ForCausalLM, "phi3": phi3.Phi3ForCausalLM, "gemma2": gemma2.Gemma2ForCausalLM,
           "qwen3_moe": qwen3_moe.Qwen3MoeForCausalLM, "qwen2_moe": qwen2_moe.Qwen2MoeForCausalLM,
           "mixtral": mixtral.MixtralForCausalLM}
out = {"ranks": list(typing.get_args(MaxLoRARanks)), "models": {}, "rejects": {}}
for name, cls in classes.items():
    packed = getattr(cls, "packed_modules_mapping", {}) or {}
    out["models"][name] = {"class": cls.__name__, "packed": {k: list(v) for k, v in packed.items()},
                           "embedding": sorted(getattr(cls, "embedding_modules", {}) or {})}
base = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
for field, value in [("use_dora", True), ("modules_to_save", ["lm_head"]), ("bias", "all"), ("lora_bias", True),
                     ("init_lora_weights", "pissa"), ("use_qalora", True), ("layer_replication", [[0, 1]])]:
    helper = PEFTHelper.from_dict({**base, field: value})
    errors = helper._validate_features() + ([] if helper.bias == "none" else ["bias"])
    out["rejects"][field] = bool(errors)
print("JSON" + json.dumps(out))
"""


MOE_MODEL_TYPES = ("qwen3_moe", "qwen2_moe", "mixtral")


@pytest.mark.vllm
def test_the_module_table_and_rules_match_the_installed_vllm():
    if not VLLM_PYTHON.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{VLLM_PYTHON} is missing in CI; .ci/run must run scripts/setup_vllm_cpu.sh first")
        pytest.skip(f"{VLLM_PYTHON} is absent (run `bash scripts/setup_vllm_cpu.sh`)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(VLLM_PYTHON), "-c", _INSPECT_VLLM], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.split("JSON", 1)[1])
    assert tuple(found["ranks"]) == MAX_LORA_RANKS
    assert all(found["rejects"].values()), found["rejects"]
    for model_type, arch in VLLM_LORA_MODULES.items():
        info = found["models"][model_type]
        assert info["class"] == arch.vllm_class
        children = {child for children in info["packed"].values() for child in children}
        if model_type in MOE_MODEL_TYPES:
            # vLLM packs only q/k/v in its MoE models (experts are FusedMoE, checked in tests/moe).
            assert children == {"q_proj", "k_proj", "v_proj"} <= set(arch.linear_modules), model_type
        else:
            # The linear modules: packed children plus the unpacked LinearBase layers (o_proj, down_proj).
            assert children | {"o_proj", "down_proj"} == set(arch.linear_modules), model_type
        assert set(info["embedding"]) == set(arch.embedding_modules), model_type
    assert vllm_rules.INITS_THAT_KEEP_THE_BASE
