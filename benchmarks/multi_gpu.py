"""Multi-GPU LoRA training on INT4 bases: DDP scaling (Llama-3.1-8B shape) and FSDP sharding (Llama-3-70B shape).

Run under ``accelerate launch``; every process builds the same Llama-shaped model with random INT4 weights on its
GPU as ``train_step.py`` does for ``--mode`` (random packed nibbles, bf16 scales, group 128, no checkpoint; LoRA r=16,
alpha 32, on all seven projections with plain ``get_peft_model``; non-reentrant gradient checkpointing; the mode's
training optimisations) and prepares it exactly as the trainer does for ``train.strategy``:

- ``ddp``: ``Accelerator.prepare`` (DDP with ``broadcast_buffers=False``; one process: no wrapper);
- ``fsdp``: :func:`int4lora_train.train.distributed.prepare_fsdp` (INT4 tensors as frozen parameters, accelerate's
  FSDP2 plugin, one unit per decoder layer, autocast forward).

Then it times ``model(input_ids, labels).loss`` + backward + AdamW on the adapters under bf16 autocast, each process
with its own ``--bs`` x ``--seq`` batch (so the global batch grows with the process count, as DDP scaling is
measured). Reported: median step time, tokens/s of all processes together, and per process the peak memory during
the steps (CUDA peak allocated; the counters are reset after preparation, so building the whole model before
sharding is not counted) and the memory held after preparation (weights, LoRA; FSDP: the shards).

The runs of issue 7 (multi-GPU machine)::

    # DDP scaling on the Llama-3.1-8B shape: one GPU, then two (target: tokens/s ratio >= 1.85)
    accelerate launch --num_processes 1 benchmarks/multi_gpu.py --strategy ddp --shape 8b --json ddp_1gpu.json
    accelerate launch --multi_gpu --num_processes 2 benchmarks/multi_gpu.py --strategy ddp --shape 8b \\
        --json ddp_2gpu.json
    python benchmarks/multi_gpu.py --scaling ddp_1gpu.json ddp_2gpu.json
    # FSDP LoRA on the Llama-3-70B shape over two GPUs: per-GPU peak memory and tokens/s
    accelerate launch --multi_gpu --num_processes 2 benchmarks/multi_gpu.py --strategy fsdp --shape 70b \\
        --json fsdp_70b_2gpu.json
    # a quick CPU check of both paths (gloo; no GPU visible)
    CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes 2 benchmarks/multi_gpu.py --strategy fsdp \\
        --layers 2 --hidden 256 --intermediate 512 --heads 4 --kv-heads 2 --vocab 1024 --seq 64 --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from common import (
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
    sync,
)

from int4lora_train.train import distributed
from int4lora_train.train.config import FsdpConfig
from int4lora_train.train.strategy import FSDPStrategy, select_strategy

DEFAULT_MODES = {"ddp": "int4-opt", "fsdp": "int4-opt"}
"""``train_step.py`` modes: all of the toolkit's training optimisations under both strategies (the chunked loss runs
as the output head's forward, where FSDP has gathered the head)."""


def run(args) -> dict | None:
    cpu = args.device == "cpu" or not torch.cuda.is_available()
    ddp_options = {}
    if args.comm_hook != "no":
        from accelerate.utils import DDPCommunicationHookType

        ddp_options["comm_hook"] = DDPCommunicationHookType(args.comm_hook)
    if args.bucket_cap_mb:
        ddp_options["bucket_cap_mb"] = args.bucket_cap_mb
    if args.static_graph:
        ddp_options.update(static_graph=True, gradient_as_bucket_view=True)
    # the trainer's strategy, with bf16 autocast (and the DDP options compared here)
    fsdp = FsdpConfig(all_gather_stream=args.all_gather_stream)
    strategy = select_strategy(args.strategy, cpu=cpu, mixed_precision="bf16", fsdp=fsdp, ddp_options=ddp_options)
    accelerator, sharded = strategy.accelerator, isinstance(strategy, FSDPStrategy)
    device = accelerator.device
    if args.strategy == "fsdp" and not sharded:
        raise SystemExit("--strategy fsdp needs several processes: accelerate launch --multi_gpu --num_processes N")
    memory_reset(device)
    started = time.perf_counter()
    model = prepare(args, args.mode, device)  # seeded: the same base and adapters in every process
    memory_report = getattr(model, "memory_report", None) or {}  # before DDP wraps the model (a wrapper hides it)
    optimizer = make_optimizer(args, [p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model, optimizer = strategy.prepare(model, optimizer)
    shards = distributed.sharding_report(model, accelerator.process_index) if sharded else None
    build_s = time.perf_counter() - started
    memory_reset(device)
    held = memory_now(device)

    gen = torch.Generator(device=device).manual_seed(1 + accelerator.process_index)  # each process its own batch
    tokens = torch.randint(0, args.vocab, (args.bs, args.seq), device=device, generator=gen)
    times, loss = [], torch.zeros(())

    def step() -> torch.Tensor:
        loss = model(input_ids=tokens, labels=tokens).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for i in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        loss = step()
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    if args.profile:
        profile_steps(step, device, Path(f"{args.profile}.rank{accelerator.process_index}.txt"))
    mine = {
        "rank": accelerator.process_index,
        "median_step_s": statistics.median(times),
        "peak_memory_bytes": memory_peak(device),
        "held_after_prepare_bytes": held,
        "last_loss": float(loss.detach()),
        "memory": memory_report.get("summary"),
        "build_s": build_s,
        "sharding": shards,
    }
    from accelerate.utils import gather_object

    processes = gather_object([mine])
    if not accelerator.is_main_process:
        return None
    world = accelerator.num_processes
    step = max(p["median_step_s"] for p in processes)  # the slowest process sets the pace
    return {
        "strategy": args.strategy if world > 1 else f"{args.strategy} (1 process)",
        "processes": world,
        "shape": {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab")},
        "seq": args.seq,
        "bs_per_process": args.bs,
        "rank": args.rank,
        "mode": args.mode,
        "gradient_checkpointing": not args.no_checkpointing,
        "ddp_options": {
            "comm_hook": args.comm_hook,
            "bucket_cap_mb": args.bucket_cap_mb,
            "static_graph": args.static_graph,
        },
        "all_gather_stream": args.all_gather_stream if args.strategy == "fsdp" else None,
        "median_step_s": step,
        "tokens_per_s": world * args.bs * args.seq / step,
        "max_peak_memory_bytes": max(p["peak_memory_bytes"] for p in processes),
        "per_process": processes,
        "env": {
            "device": device_name(device),
            "torch": torch.__version__,
        },
    }


def profile_steps(step, device: torch.device, out: Path, steps: int = 2) -> None:
    """Profile ``steps`` more steps; write the operators by device time (collectives included) to ``out``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    out.write_text(f"{steps} steps\n" + prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60))


def scaling(paths: list[str]) -> str:
    """``tokens/s`` of each result file relative to the first (e.g. 1 GPU, then 2 GPUs)."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    base = results[0]["tokens_per_s"]
    lines = []
    for path, r in zip(paths, results):
        lines.append(
            f"{path}: {r['strategy']}, {r['processes']} process(es), {r['tokens_per_s']:.0f} tokens/s "
            f"({r['tokens_per_s'] / base:.2f}x), step {r['median_step_s']:.3f} s, "
            f"peak {r['max_peak_memory_bytes'] / 2**30:.2f} GiB per GPU"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument(
        "--all-gather-stream",
        choices=("compute", "separate"),
        default="compute",
        help="fsdp: train.fsdp.all_gather_stream (compute: the default; separate: FSDP2's side streams)",
    )
    parser.add_argument(
        "--mode",
        default=None,
        help="train_step.py's INT4 mode (default: int4-opt)",
    )
    add_shape_arguments(parser)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--bs", type=int, default=1, help="rows per process and step")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--comm-hook", default="no", choices=("no", "fp16", "bf16"), help="DDP gradient comm hook")
    parser.add_argument("--bucket-cap-mb", type=int, default=None, help="DDP bucket size (default: torch's 25)")
    parser.add_argument("--static-graph", action="store_true", help="DDP static_graph + gradient_as_bucket_view")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write the result here (main process)")
    parser.add_argument("--profile", default=None, metavar="PREFIX", help="profile 2 more steps: PREFIX.rankN.txt")
    add_memory_arguments(parser)
    parser.add_argument("--scaling", nargs="+", metavar="RESULT_JSON", help="compare result files; no run")
    args = parser.parse_args(argv)
    if args.scaling:
        print(scaling(args.scaling))
        return None
    apply_shape(args)
    args.mode = args.mode or DEFAULT_MODES[args.strategy]
    try:
        if not parse_mode(args.mode)[0] == "int4":
            parser.error(f"--mode {args.mode}: multi-GPU runs use the int4 base (on the fly)")
    except ValueError as exc:
        parser.error(str(exc))
    args.cache_gb, args.reentrant, args.profile_modes = None, False, set()  # what common.prepare reads
    result = run(args)
    if result is not None:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "per_process"}, indent=2))
        for p in result["per_process"]:
            print(
                f"process {p['rank']}: step {p['median_step_s']:.3f} s, peak {p['peak_memory_bytes'] / 2**30:.2f} GiB,"
                f" held after prepare {p['held_after_prepare_bytes'] / 2**30:.2f} GiB"
                + (
                    f", INT4 {p['sharding']['int4_local_bytes'] / 2**20:.1f} of "
                    f"{p['sharding']['int4_bytes'] / 2**20:.1f} MiB"
                    if p["sharding"]
                    else ""
                )
            )
    return result


if __name__ == "__main__":
    main()
