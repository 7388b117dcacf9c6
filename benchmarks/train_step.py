"""LoRA training-step time and peak memory: INT4 bases (with and without the toolkit's training optimisations),
bitsandbytes NF4 QLoRA and a bf16 base with plain PEFT LoRA, in one process, on the same device and batch.

Every mode builds a Llama-shaped model with random weights directly on the device (INT4: random packed weights and
bf16 scales, no checkpoint; NF4: a bf16 model quantized by bitsandbytes), applies LoRA r=16 (alpha 32) to all seven
projections through plain ``get_peft_model``, prepares it with the toolkit's ``prepare_for_training`` (frozen base,
nothing upcast, gradient checkpointing), and times ``model(input_ids, labels).loss.backward()`` plus a fused AdamW
step on the adapters under bf16 autocast. Reported per mode: median step time, tokens/s, peak memory during the steps
(CUDA: peak allocated; CPU: peak RSS), the weights' memory and the last loss.

Modes are ``BASE[+OPTION...]``:

- bases: ``bf16`` (dense bf16, plain PEFT LoRA), ``nf4`` (bitsandbytes NF4 + double quantization, PEFT's bnb LoRA
  layer), ``int4`` (INT4 dequantized on the fly by the fused Triton kernel), ``int4-cache`` (dense copies from the
  unpacker's cache, ``--cache-gb`` budget);
- options: ``fused`` (one fused autograd node per INT4 LoRA projection), ``keep`` (keep the dense weight from the
  checkpoint recompute for backward), ``lean`` (the recompute skips the down projection's unread output),
  ``group`` (q/k/v and gate/up as one node each), ``chunked`` (chunked
  cross-entropy without full logits; any base), ``kernels`` (fused RMSNorm and SwiGLU kernels, always; any
  base), ``autokernels`` (the same where the input has >= ``AUTO_MIN_ELEMENTS`` elements, as the toolkit's default
  ``fused_kernels: auto``), ``reentrant`` (reentrant gradient checkpointing instead of non-reentrant; any base);
- ``int4-opt`` = ``int4+fused+keep+lean+group+chunked+kernels``; ``int4-default`` = the same with ``autokernels`` (what
  ``speed.apply`` sets up by default); a bare ``int4`` runs with all of them off.

::

    # the issue's table on a GPU (Llama-3.1-8B shape, seq 2048):
    python benchmarks/train_step.py --modes bf16,bf16+chunked,nf4,int4,int4-cache,int4-opt --bs 1 --json bs1.json
    # the Llama-3-70B shape, INT4 only:
    python benchmarks/train_step.py --shape 70b --modes int4-opt --json 70b.json
    # GPU correctness of the optimised path against the generic one (2 full-width layers, vocab 128256):
    python benchmarks/train_step.py --check
    # a quick CPU run:
    python benchmarks/train_step.py --layers 2 --hidden 256 --intermediate 512 --heads 4 --kv-heads 2 \\
        --vocab 1024 --seq 64 --steps 2 --warmup 1 --modes bf16,int4,int4-opt
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from common import (
    PROJECTIONS,
    add_memory_arguments,
    add_shape_arguments,
    apply_shape,
    device_name,
    make_optimizer,
    memory_now,
    memory_peak,
    memory_reset,
    parse_mode,
    prepare,
    random_int4_weight,
    sync,
)

from int4lora_train.kernels import triton_available
from int4lora_train.modeling import Int4Linear


def run_mode(args, mode: str, device: torch.device) -> dict:
    memory_reset(device)
    before = memory_now(device)
    build_start = time.perf_counter()
    model = prepare(args, mode, device)
    build_s = time.perf_counter() - build_start
    weights = memory_now(device) - before
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(args, params, lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.bs, args.seq), device=device, generator=gen)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.no_autocast):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    memory_reset(device)
    times, loss = [], float("nan")
    for i in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        loss = step()
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    loss = loss.item()
    peak = memory_peak(device)
    reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0
    profile = _profile(step, device, mode, args) if mode in args.profile_modes else None
    median = statistics.median(times)
    result = {
        "mode": mode,
        "median_step_s": median,
        "step_times_s": times,
        "tokens_per_s": args.bs * args.seq / median,
        "peak_memory_bytes": peak,
        "peak_reserved_bytes": reserved,
        "weights_bytes": weights,
        "trainable_params": sum(p.numel() for p in params),
        "int4_layers": sum(isinstance(m, Int4Linear) for m in model.modules()),
        "last_loss": loss,
        "memory": getattr(model, "memory_report", None),
        "build_s": build_s,
    }
    if profile:
        result["profile"] = profile
    if mode.startswith("int4-cache"):
        cache = next(m.cache for m in model.modules() if isinstance(m, Int4Linear))
        result["cache_stats"] = cache.get_cache_stats()
    return result  # the model goes with this frame; the next mode's _memory_reset returns its memory


def _profile(step, device: torch.device, mode: str, args) -> dict:
    """One step under torch.profiler: GPU busy time, CPU wall time, and the top kernels (written to a file)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        sync(device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    tables = [
        events.table(sort_by=key, row_limit=args.profile_rows, max_name_column_width=60)
        for key in (["self_device_time_total"] if device.type == "cuda" else []) + ["self_cpu_time_total"]
    ]
    table = "\n\n".join(tables)
    kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.self_device_time_total for e in kernels)
    if args.profile_dir:
        path = Path(args.profile_dir) / f"profile_{mode.replace('+', '_')}_bs{args.bs}_l{args.layers}.txt"
        path.write_text(table)
    return {"wall_s": wall, "gpu_busy_s": gpu_us / 1e6, "table": table}


# ------------------------------------------------------------------------------------------------ correctness


def check(args, device: torch.device) -> list[dict]:
    """The optimised paths against the generic ones on the same weights and batch (2 full-width layers).

    The weights are built in fp32 (INT4 scales bf16); the reference is the generic path (plain PEFT, transformers'
    loss) in fp32 without autocast. Each variant's loss and LoRA gradients are compared with it (relative L2 per
    gradient tensor, the largest over all tensors): the optimised path in fp32 must agree to fp32 rounding, and
    under bf16 autocast it must be no further from the reference than the generic path under bf16 autocast is.
    Also, with dropout: reentrant against non-reentrant checkpointing of the optimised path (same masks).
    """
    small = argparse.Namespace(**{**vars(args), "layers": 2})
    gen = torch.Generator(device=device).manual_seed(1)
    tokens = torch.randint(0, small.vocab, (small.bs, small.seq), device=device, generator=gen)
    labels = tokens.clone()
    labels[:, : small.seq // 4] = -100  # a prompt without loss

    def grads(mode, autocast, reentrant=False, dropout=0.0):
        small.reentrant = reentrant
        model = prepare(small, mode, device, dtype=torch.float32, dropout=dropout, init_b=True)
        torch.manual_seed(5)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=tokens, labels=labels).loss
        loss.backward()
        out = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
        del model
        memory_reset(device)
        return loss.detach().float().item(), out

    def compare(name, a, ref):
        (loss_a, ga), (loss_r, gr) = a, ref
        rel = [((ga[n] - gr[n]).norm() / gr[n].norm().clamp_min(1e-30)).item() for n in gr]
        row = {
            "check": name,
            "loss": loss_a,
            "loss_ref": loss_r,
            "loss_rel_diff": abs(loss_a - loss_r) / abs(loss_r),
            "grad_rel_l2_median": statistics.median(rel),
            "grad_rel_l2_max": max(rel),
            "grads": len(gr),
        }
        print(json.dumps(row), flush=True)
        return row

    rows = []
    for base, opt in (("int4", "int4-opt"), ("bf16", "bf16+chunked+kernels")):
        reference = grads(base, autocast=False)
        rows.append(compare(f"{opt} fp32 vs {base} fp32", grads(opt, autocast=False), reference))
        rows.append(compare(f"{base} bf16-autocast vs {base} fp32", grads(base, autocast=True), reference))
        rows.append(compare(f"{opt} bf16-autocast vs {base} fp32", grads(opt, autocast=True), reference))
    rows.append(
        compare(
            "int4-opt bf16-autocast dropout 0.1: reentrant vs non-reentrant",
            grads("int4-opt", True, reentrant=True, dropout=0.1),
            grads("int4-opt", True, reentrant=False, dropout=0.1),
        )
    )
    return rows


# ------------------------------------------------------------------------------------------------ host overhead


def host_overhead(args, device: torch.device, calls: int = 300) -> list[dict]:
    """Microseconds per call of the step's small operations, timed back to back (their GPU work is shorter than
    their launch on the H100, so this is the host cost): transformers' RMSNorm against the fused one, the plain and
    the prepared dequantization of a 4096 x 4096 weight, one fused LoRA projection."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from int4lora_train.quant.dequant import dequantize
    from int4lora_train.speed.fused_ops import RMSNormFunction

    x = torch.randn(args.bs * args.seq, args.hidden, device=device, dtype=torch.bfloat16)
    norm = LlamaRMSNorm(args.hidden).to(device, torch.bfloat16)
    layer = Int4Linear(random_int4_weight(args.hidden, args.hidden, args.group_size, device))
    weight = layer.int4_weight()
    buffers = (layer.packed, layer.scales, layer.zero_points, layer.g_idx)
    cases = {
        "transformers LlamaRMSNorm forward": lambda: norm(x),
        "fused RMSNorm forward (Triton)": lambda: RMSNormFunction.apply(x, norm.weight, 1e-6),
        "dequantize() 4096x4096": lambda: dequantize(weight, torch.bfloat16),
        "prepared dequantization 4096x4096": lambda: layer.dequantizer(buffers, torch.bfloat16),
        "Int4Linear forward (no grad)": lambda: layer(x),
    }
    rows = []
    with torch.no_grad():
        for name, fn in cases.items():
            for _ in range(5):
                fn()
            sync(device)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            host = time.perf_counter() - start
            sync(device)
            total = time.perf_counter() - start
            rows.append(
                {"case": name, "host_us_per_call": host / calls * 1e6, "total_us_per_call": total / calls * 1e6}
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="bf16,int4,int4-opt", help="comma-separated BASE[+OPTION...] (see above)")
    add_shape_arguments(parser)
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
    parser.add_argument("--check", action="store_true", help="run the correctness comparison instead of timing")
    parser.add_argument("--host-overhead", action="store_true", help="time the host cost of small operations")
    parser.add_argument("--profile-modes", default="", help="comma-separated modes to profile for one extra step")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--profile-dir", default=None, help="write each profile's kernel table here")
    parser.add_argument("--json", default=None, help="write the results here as JSON (rewritten after each mode)")
    add_memory_arguments(parser)
    args = parser.parse_args(argv)
    apply_shape(args)
    args.profile_modes = {m.strip() for m in args.profile_modes.split(",") if m.strip()}
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        try:
            parse_mode(mode)
        except ValueError as exc:
            parser.error(str(exc))
    device = torch.device(args.device)
    env = {
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dequant_backend": "triton" if device.type == "cuda" and triton_available() else "torch",
    }
    report = {"args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()}, "env": env}

    if args.check:
        report["check"] = check(args, device)
        _write(args.json, report)
        return report
    if args.host_overhead:
        report["host_overhead"] = host_overhead(args, device)
        _write(args.json, report)
        return report

    results = []
    report["results"] = results
    for mode in modes:
        print(f"running {mode} ...", file=sys.stderr, flush=True)
        try:
            results.append(run_mode(args, mode, device))
        except torch.cuda.OutOfMemoryError as exc:  # a baseline that does not fit is a result too
            results.append({"mode": mode, "error": f"out of memory: {str(exc).splitlines()[0]}"})
            memory_reset(device)
        _write(args.json, report)
        print(_row_line(results[-1]), file=sys.stderr, flush=True)
    print(_table(args, results, env))
    for r in results:
        if "profile" in r:
            p = r["profile"]
            print(f"\nprofile {r['mode']}: wall {p['wall_s']:.3f} s, GPU busy {p['gpu_busy_s']:.3f} s")
    return report


def _write(path: str | None, report: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(report, indent=2) + "\n")


def _row_line(r: dict) -> str:
    if "error" in r:
        return f"{r['mode']}: {r['error']}"
    return (
        f"{r['mode']}: {r['median_step_s']:.4f} s/step, {r['tokens_per_s']:.0f} tok/s, peak "
        f"{r['peak_memory_bytes'] / 2**30:.2f} GiB, built in {r['build_s']:.1f} s"
    )


def _table(args, results: list[dict], env: dict) -> str:
    memory = "peak alloc" if args.device.startswith("cuda") else "peak RSS"
    head = (
        f"LoRA r={args.rank} on {len(PROJECTIONS)} projections, {args.layers} layers (hidden {args.hidden}, "
        f"intermediate {args.intermediate}), seq {args.seq}, bs {args.bs}, "
        f"{'no ' if args.no_checkpointing else ''}gradient checkpointing "
        f"({'reentrant' if args.reentrant else 'non-reentrant'}), {env['device']}, dequant {env['dequant_backend']}"
    )
    baseline = next((r for r in results if r["mode"] == "bf16" and "error" not in r), None)
    rows = [("mode", "median s", "tokens/s", f"{memory} GiB", "weights GiB", "speed vs bf16", "mem vs bf16", "loss")]
    for r in results:
        if "error" in r:
            rows.append((r["mode"], "-", "-", "-", "-", "-", "-", r["error"][:40]))
            continue
        speed = f"{baseline['median_step_s'] / r['median_step_s']:.3f}x" if baseline else "-"
        rel_mem = f"{r['peak_memory_bytes'] / baseline['peak_memory_bytes']:.3f}x" if baseline else "-"
        rows.append(
            (
                r["mode"],
                f"{r['median_step_s']:.4f}",
                f"{r['tokens_per_s']:.0f}",
                f"{r['peak_memory_bytes'] / 2**30:.2f}",
                f"{r['weights_bytes'] / 2**30:.2f}",
                speed,
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
