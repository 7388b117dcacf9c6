"""Runs a real vLLM on a model directory (and optionally a LoRA adapter) and writes logprobs and greedy tokens as JSON.

This file runs INSIDE the vLLM virtual environment (``.venv-vllm``, see ``scripts/setup_vllm_cpu.sh``) as a separate
process, started by :func:`int4lora_train.export.verify.verify_with_vllm` as ``<vllm python> <this file> --request
REQ.json --output OUT.json``. It is executed by path, never imported from the toolkit: it needs only the standard
library and vLLM, because the vLLM venv pins other versions of transformers and compressed-tensors than the
toolkit's own.

Request (JSON)::

    {"model": "/path/base", "adapters": {"name": "/path/adapter", ...}, "max_lora_rank": 16, "dtype": "float16",
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
import sys
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


def run(request: dict) -> dict:
    """Start one engine (LoRA enabled when an adapter is given) and run every prompt in every requested mode."""
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
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
    parser.add_argument("--request", required=True, help="JSON request file (see the module docstring)")
    parser.add_argument("--output", required=True, help="where to write the JSON result")
    args = parser.parse_args(argv)
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
