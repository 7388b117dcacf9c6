"""LoRA training-step time and peak memory: INT4 base (on the fly / cached) against a bf16 base with plain PEFT LoRA.

All modes run in one process, one after the other, on the same device, with the same settings: a Llama-shaped model
with random weights built directly on the device (INT4 modes: random packed weights and scales, no checkpoint),
LoRA r=16 (alpha 32) on all seven projections through plain ``get_peft_model``, gradient checkpointing, AdamW on the
adapters, bf16 autocast. Reported per mode: median step time, tokens/s, peak memory during the steps (CUDA: peak
allocated; CPU: peak RSS), weight memory, and the last loss.

    # the issue's setting on a GPU (Llama-3.1-8B shape, seq 2048, bs 1):
    .venv/bin/python benchmarks/train_step.py --json train_step.json
    # a quick CPU check:
    .venv/bin/python benchmarks/train_step.py --layers 2 --hidden 256 --intermediate 512 --heads 4 --kv-heads 2 \\
        --vocab 1024 --seq 64 --steps 2 --warmup 1

Modes: ``int4`` (dequantize on the fly), ``int4-cache`` (dense weights from the unpacker's LRU cache,
``--cache-gb`` budget, unbounded by default), ``bf16`` (dense bf16 base, plain PEFT LoRA).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model

from int4lora_train.modeling import Int4Linear, prepare_for_training
from int4lora_train.quant.dequant import triton_available
from int4lora_train.quant.layout import Int4Weight

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODES = ("int4", "int4-cache", "bf16")


def llama_config(args) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 2048),
        rope_theta=500000.0,
        tie_word_embeddings=False,
        use_cache=False,
    )


def random_int4_weight(out_features: int, in_features: int, group_size: int, device) -> Int4Weight:
    """Uniform random nibbles and trained-looking bf16 scales (~1e-2), made on ``device``."""
    packed = torch.randint(0, 256, (out_features, in_features // 2), dtype=torch.uint8, device=device)
    scales = torch.rand(out_features, in_features // group_size, device=device) * 0.02 + 0.002
    return Int4Weight.create(packed, scales.to(torch.bfloat16), in_features, group_size)


def build_model(args, mode: str, device: torch.device) -> torch.nn.Module:
    """A model with random weights on ``device``: dense bf16, or with every projection an Int4Linear."""
    config = llama_config(args)
    if mode == "bf16":
        with torch.device(device):
            return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)

    from accelerate import init_empty_weights

    from int4lora_train.modeling.surgery import make_cache

    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    cache_bytes = None if args.cache_gb is None else int(args.cache_gb * 2**30)
    cache = make_cache("cache" if mode == "int4-cache" else "on_the_fly", cache_bytes if mode == "int4-cache" else None)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS:
            weight = random_int4_weight(module.out_features, module.in_features, args.group_size, device)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Int4Linear(weight, cache=cache, cache_key=name))
    gen = torch.Generator(device=device).manual_seed(0)
    for name, param in list(model.named_parameters()):  # embeddings, norms, lm_head: still on the meta device
        module_name, _, local = name.rpartition(".")
        if "norm" in module_name:
            value = torch.ones(param.shape, dtype=torch.bfloat16, device=device)
        else:
            value = (torch.randn(param.shape, generator=gen, device=device) * 0.02).to(torch.bfloat16)
        model.get_submodule(module_name)._parameters[local] = torch.nn.Parameter(value)
    return model.to(device)  # the rotary buffers


def _memory_reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # "5" resets the peak RSS (VmHWM) of this process (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def _memory_now(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status("VmRSS")


def _memory_peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status("VmHWM")


def _proc_status(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(args, mode: str, device: torch.device) -> dict:
    _memory_reset(device)
    before = _memory_now(device)
    model = build_model(args, mode, device)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=list(PROJECTIONS)))
    prepare_for_training(model, gradient_checkpointing=not args.no_checkpointing, use_reentrant=args.reentrant)
    model.train()
    weights = _memory_now(device) - before
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.bs, args.seq), device=device, generator=gen)

    _memory_reset(device)
    times, loss = [], float("nan")
    for step in range(args.warmup + args.steps):
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.no_autocast):
            out = model(input_ids=tokens, labels=tokens)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        loss = out.loss.detach().item()
        del out
    peak = _memory_peak(device)
    median = statistics.median(times)
    result = {
        "mode": mode,
        "median_step_s": median,
        "step_times_s": times,
        "tokens_per_s": args.bs * args.seq / median,
        "peak_memory_bytes": peak,
        "weights_bytes": weights,
        "trainable_params": sum(p.numel() for p in params),
        "int4_layers": sum(isinstance(m, Int4Linear) for m in model.modules()),
        "last_loss": loss,
    }
    if mode == "int4-cache":
        cache = next(m.cache for m in model.modules() if isinstance(m, Int4Linear))
        result["cache_stats"] = cache.get_cache_stats()
    del model, optimizer, params
    _memory_reset(device)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {list(MODES)}")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--bs", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cache-gb", type=float, default=None, help="int4-cache budget (default: unbounded)")
    parser.add_argument("--reentrant", action="store_true", help="reentrant gradient checkpointing")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--no-autocast", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    device = torch.device(args.device)

    results = []
    for mode in modes:
        print(f"running {mode} ...", file=sys.stderr, flush=True)
        results.append(run_mode(args, mode, device))

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dequant_backend": "triton" if device.type == "cuda" and triton_available() else "torch",
    }
    print(_table(args, results, env))
    report = {"args": vars(args), "env": env, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _table(args, results: list[dict], env: dict) -> str:
    memory = "peak allocated" if args.device.startswith("cuda") else "peak RSS"
    head = (
        f"LoRA r={args.rank} on {len(PROJECTIONS)} projections, {args.layers} layers (hidden {args.hidden}, "
        f"intermediate {args.intermediate}), seq {args.seq}, bs {args.bs}, "
        f"{'no ' if args.no_checkpointing else ''}gradient checkpointing, {env['device']}, dequant {env['dequant_backend']}"
    )
    baseline = next((r for r in results if r["mode"] == "bf16"), None)
    rows = [
        ("mode", "median step s", "tokens/s", f"{memory} GiB", "weights GiB", "vs bf16 time", "vs bf16 mem", "loss")
    ]
    for r in results:
        rel_time = f"{r['median_step_s'] / baseline['median_step_s']:.2f}x" if baseline else "-"
        rel_mem = f"{r['peak_memory_bytes'] / baseline['peak_memory_bytes']:.2f}x" if baseline else "-"
        rows.append(
            (
                r["mode"],
                f"{r['median_step_s']:.4f}",
                f"{r['tokens_per_s']:.0f}",
                f"{r['peak_memory_bytes'] / 2**30:.2f}",
                f"{r['weights_bytes'] / 2**30:.2f}",
                rel_time,
                rel_mem,
                f"{r['last_loss']:.3f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [head, ""] + [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(3, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
