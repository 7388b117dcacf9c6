"""The parity comparison itself, without vLLM: logprob differences, greedy checks, the adapter's effect, and
``verify_with_vllm`` / its CLI entry end to end against a stand-in for the vLLM worker."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from int4lora_train import cli
from int4lora_train.errors import ExportError
from int4lora_train.export import export_adapter, verify
from int4lora_train.export.verify import adapter_effect, compare_logprobs, find_vllm_python


def _vllm_like(reference: torch.Tensor, prompt_len: int, generated: list[int], top: int = -1) -> dict:
    """What the worker reports, computed from ``reference`` [len, vocab] log-softmax rows."""

    def entry(row: int) -> dict[str, float]:
        values = reference[row]
        ids = range(values.numel()) if top < 0 else values.topk(top).indices.tolist()
        return {str(i): float(values[i]) for i in ids}

    return {
        "prompt_token_ids": list(range(prompt_len)),
        "token_ids": generated,
        "prompt_logprobs": [None] + [entry(i - 1) for i in range(1, prompt_len)],
        "logprobs": [entry(prompt_len - 1 + j) for j in range(len(generated))],
    }


def _reference(length: int = 7, vocab: int = 11, seed: int = 0) -> torch.Tensor:
    return (torch.randn(length, vocab, generator=torch.Generator().manual_seed(seed)) * 3).log_softmax(-1)


def test_identical_logprobs_and_greedy_tokens_pass():
    reference = _reference()
    greedy = reference[3:].argmax(-1).tolist()
    row = compare_logprobs(reference, 4, _vllm_like(reference, 4, greedy), "base", 0)
    assert (row.max_abs_diff, row.greedy_match, row.compared) == (0.0, True, 11 * (3 + 4))
    assert row.min_margin > 0


def test_a_moved_logprob_and_a_different_token_are_caught():
    reference = _reference()
    greedy = reference[3:].argmax(-1).tolist()
    result = _vllm_like(reference, 4, greedy)
    token = next(iter(result["logprobs"][1]))
    result["logprobs"][1][token] += 0.25
    result["token_ids"] = greedy[:2] + [(greedy[2] + 1) % 11]
    row = compare_logprobs(reference, 4, result, "adapter", 0)
    assert row.max_abs_diff == pytest.approx(0.25, abs=1e-6)
    assert not row.greedy_match


def test_a_different_token_within_twice_the_tolerance_is_a_near_tie_not_a_failure():
    reference = _reference()
    runner_up = int(reference[4].topk(2).indices[1])
    best = float(reference[4].max())
    reference[4, runner_up] = best - 0.015  # 1.5x the tolerance below the argmax: rounding may flip it
    reference[4] = reference[4].log_softmax(-1)
    generated = reference[3:].argmax(-1).tolist()
    generated[1] = runner_up
    row = compare_logprobs(reference, 4, _vllm_like(reference, 4, generated), "base", 0, tolerance=1e-2)
    assert (row.greedy_match, row.near_ties, row.greedy_status) == (False, 1, "tie")
    strict = compare_logprobs(reference, 4, _vllm_like(reference, 4, generated), "base", 0, tolerance=1e-3)
    assert strict.greedy_status == "DIFF"
    report = verify.ParityReport("m", {}, "float16", "float32", 1e-2, [row])
    assert report.passed and not report.greedy_identical and "near-tie" in report.format_table()


def test_top_k_results_and_impossible_tokens_are_compared_where_reported():
    reference = _reference()
    result = _vllm_like(reference, 4, reference[3:].argmax(-1).tolist(), top=3)
    result["prompt_logprobs"][2]["5"] = -math.inf  # vLLM's -inf for a token it rules out: not a number to compare
    row = compare_logprobs(reference, 4, result, "base", 0)
    assert row.max_abs_diff < 1e-6 and row.compared >= 3 * 6


def test_adapter_effect_is_the_largest_prompt_logprob_change():
    reference, other = _reference(seed=0), _reference(seed=1)
    base, adapted = _vllm_like(reference, 5, []), _vllm_like(other, 5, [])
    expected = float((reference[:4] - other[:4]).abs().max())
    assert adapter_effect(base, adapted) == pytest.approx(expected, rel=1e-6)
    assert adapter_effect(base, base) == 0.0


def test_missing_vllm_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(verify, "VLLM_VENV", "no-such-venv")
    monkeypatch.delenv("INT4LORA_VLLM_PYTHON", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(verify.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ExportError, match="setup_vllm_cpu.sh"):
        find_vllm_python()
    with pytest.raises(ExportError, match="missing-python does not exist"):
        find_vllm_python(tmp_path / "missing-python")


@pytest.fixture(autouse=True)
def _fresh_probe_cache():
    """Probes are cached per interpreter; a stand-in's answer must neither see nor leave a real one."""
    verify._probe.cache_clear()
    yield
    verify._probe.cache_clear()


AVX512 = {
    "vllm_version": "0.32.0",
    "device_type": "cpu",
    "cpu_flags": {"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_bf16": False},
    "kernel_library": "_C",
    "w4a16_kernel": True,
    "compressed_tensors_version": "0.17.0",
}
AVX2 = {**AVX512, "cpu_flags": {"avx2": True, "avx512f": False}, "kernel_library": "_C_AVX2", "w4a16_kernel": False}


def test_auto_path_serves_the_int4_checkpoint_where_vllm_has_a_w4a16_kernel():
    path = verify.choose_vllm_path(verify.VllmCapabilities.from_probe(AVX512))
    assert (path.name, path.dtype, path.tolerance) == ("int4", "float16", 1e-2)
    assert "avx512f" in path.reason and "W4A16 kernel" in path.reason
    dense = verify.choose_vllm_path(verify.VllmCapabilities.from_probe(AVX512), "dense")
    assert (dense.name, dense.dtype, dense.tolerance) == ("dense", "float32", 1e-4) and "asked for" in dense.reason


def test_auto_path_on_an_avx2_cpu_is_the_dense_copy_and_says_why():
    caps = verify.VllmCapabilities.from_probe(AVX2)
    path = verify.choose_vllm_path(caps)
    assert path.name == "dense" and path.dtype == "float32"
    assert "_C_AVX2" in path.reason and "lacks avx512f" in path.reason and "compressed-tensors 0.17.0" in path.reason
    with pytest.raises(ExportError, match=r"int4 vLLM path cannot run here.*lacks avx512f.*--path dense"):
        verify.choose_vllm_path(caps, "int4")


def test_no_vllm_path_is_one_clear_error():
    caps = verify.VllmCapabilities.from_probe(AVX2)
    with pytest.raises(ExportError, match=r"no W4A16 kernel.*compressed-tensors checkpoints only.*'gptq'.*AVX-512"):
        verify.choose_vllm_path(caps, "auto", quant_method="gptq")
    bare = verify.VllmCapabilities.from_probe({**AVX2, "compressed_tensors_version": None})
    with pytest.raises(ExportError, match="no compressed-tensors library"):
        verify.choose_vllm_path(bare, "dense")
    with pytest.raises(ExportError, match="unknown vLLM path 'fp8'"):
        verify.choose_vllm_path(bare, "fp8")


def test_a_crashing_vllm_is_one_paragraph_naming_the_log(monkeypatch, tmp_path):
    script = tmp_path / "python"
    script.write_text(
        "#!/bin/sh\necho 'Traceback (most recent call last):' >&2\n"
        "echo \"AttributeError: '_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'\" >&2\n"
        "exit 1\n"
    )
    script.chmod(0o755)
    with pytest.raises(ExportError) as caught:
        verify.run_vllm_worker({"model": "m"}, script)
    message = str(caught.value)
    assert "\n" not in message and "failed while serving" in message and "cpu_gemm_wna16" in message
    log = message.split("Full output: ")[1].split(". To fix")[0]
    assert "Traceback" in Path(log).read_text()
    with pytest.raises(ExportError, match=r"could not even be probed.*setup_vllm_cpu.sh"):
        verify.run_vllm_worker(None, script)


class _ToolkitAsVllm:
    """Stands in for the vLLM worker: answers each request with the toolkit's own greedy logprobs (top 5)."""

    def __init__(self, model_dir):
        from int4lora_train.modeling import load_int4_model
        from int4lora_train.modeling.peft_integration import load_adapter

        self.model_dir = model_dir
        self.load_int4_model, self.load_adapter = load_int4_model, load_adapter
        self.requests = []

    @torch.no_grad()
    def __call__(self, request, vllm_python=None, timeout=900):
        if request is None:  # the probe: an AVX-512 CPU where vLLM has its W4A16 kernel
            return {**AVX512, "vllm_version": "stand-in"}
        self.requests.append(request)
        model = self.load_int4_model(self.model_dir, dtype=torch.float32)
        for name, path in request["adapters"].items():
            model = self.load_adapter(model, path, adapter_name=name)
        results = {}
        for mode in request["modes"]:
            outputs = []
            for prompt in request["prompts"]:
                ids = list(prompt)
                for _ in range(request["max_tokens"]):
                    ids.append(
                        int(verify.reference_logprobs(model, ids, None if mode == "base" else mode)[-1].argmax())
                    )
                reference = verify.reference_logprobs(model, ids, None if mode == "base" else mode)
                outputs.append(_vllm_like(reference, len(prompt), ids[len(prompt) :], top=5))
                outputs[-1]["prompt_token_ids"] = list(prompt)
            results[mode] = outputs
        return {"vllm_version": "stand-in", "results": results}


def test_verify_with_vllm_runs_the_whole_check(lora_model, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    export_adapter(lora_model, tmp_path / "adapter", base_model_dir=tiny_checkpoint)
    fake = _ToolkitAsVllm(tiny_checkpoint)
    monkeypatch.setattr(verify, "run_vllm_worker", fake)
    monkeypatch.setenv("INT4LORA_VLLM_PYTHON", sys.executable)  # the stand-in needs no vLLM venv on this machine
    status = cli.main(
        ["verify", str(tiny_checkpoint), str(tmp_path / "adapter"), "--prompt", "Hello", "--max-tokens", "3"]
    )
    table = capsys.readouterr().out
    assert status == 0 and "PASS" in table and "stand-in" in table
    (request,) = fake.requests
    assert request["prompts"] == [list(b"Hello")] and request["modes"] == ["base", "adapter"]
    assert request["max_lora_rank"] == 8 and request["dtype"] == "float16" and request["path"] == "int4"
    assert "vLLM path: int4" in table and "PASS [int4 path]" in table
    report = verify.verify_with_vllm(tiny_checkpoint, tmp_path / "adapter", [[257, 65, 66]], max_tokens=2)
    assert report.passed and report.max_abs_diff() < 1e-5 and len(report.rows) == 2
    assert report.adapter_effect["adapter"] > 1e-2  # measured inside the stand-in, on two prompt positions
