"""The speed users get: the product's own ``train`` command on an INT4 checkpoint directory, against bf16 + PEFT and
bitsandbytes NF4 QLoRA on the same data, batch and trainer loop, in one call.

::

    python benchmarks/train_run.py --work /tmp/train-run --bs 4 --steps 24 --json run_bs4.json
    python benchmarks/train_run.py --work /tmp/train-run --bs 1 --steps 40 --bases int4,bf16 --json run_bs1.json
    python benchmarks/train_run.py --work /tmp/t70 --layers 80 --hidden 8192 --intermediate 28672 --heads 64 \\
        --kv-heads 8 --bs 1 --steps 4 --warmup 2 --bases int4 --set train.memory.offload_activations=on \\
        --set train.memory.embeddings_on_cpu=on --set train.memory.optimizer_on_cpu=on   # issue 16: 70B in 41 GB
    python benchmarks/train_run.py --work /tmp/tiny --layers 2 --hidden 256 --intermediate 512 --heads 4 \\
        --kv-heads 2 --vocab 1024 --seq 128 --steps 4 --device cpu --bases int4     # a CPU smoke test

What it does:

1. writes (once, kept in ``--work``) a Llama-shaped compressed-tensors W4A16 checkpoint with random INT4 weights
   (default: the Llama-3.1-8B shape, group 128, bf16 scales; ``loader_memory.py``'s streaming writer), the toolkit's
   byte-level tokenizer with a chat template, and a chat data set of random text (``data.format: chat``);
2. runs, each in its own process, the same YAML config (packing on, ``--seq`` tokens per row, micro batch ``--bs``,
   LoRA r 16 / alpha 32 / dropout ``--dropout`` on all seven projections, bf16, non-reentrant gradient checkpointing,
   no evaluation):

   - ``int4``: ``int4lora-train train --config <yaml>`` exactly as a user runs it (``train.speed`` defaults);
   - ``bf16``: the same :func:`int4lora_train.train.job.run_training` with ``job.load_model`` swapped for the dense
     bf16 model of the INT4 checkpoint's dequantized weights (``--baseline-weights dequantized``, the default: the
     same function, so the loss curves compare) and plain PEFT LoRA (``train.speed`` off: the model's own loss, no
     fused kernels);
   - ``nf4``: likewise, those weights re-quantized by bitsandbytes to NF4 + double quantization (PEFT's bnb LoRA
     layer), ``train.speed`` off;

3. reports per base the steady-state tokens/s (real tokens, padding excluded: the trainer's ``train/tokens_per_s``
   windows after ``--warmup`` steps, median), the step time, CUDA peak allocated memory, and the loss curve; and the
   ratios against bf16 and nf4. ``--set KEY=VALUE`` passes config overrides to the int4 run's ``train`` command
   (e.g. the memory features for the 70B shape or long rows; the baselines keep the config as users run it).
   ``--profile`` adds, for the int4 run, a torch profiler table of three steady-state
   steps (``<work>/profile-<base>.txt``) whose rows include the trainer's ``int4lora/*`` phases, and their timeline
   (``<work>/trace-<base>.json.gz``, Chrome trace format: ``benchmarks/trace_gaps.py`` lists where the GPU waits).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # common.py / loader_memory.py: the model builders and the checkpoint writer

from common import SHAPES  # noqa: E402

SHAPE_8B = SHAPES["8b"]
BASES = ("int4", "bf16", "nf4")
WORDS = "the of and to in is was for on are with as by at from this that which model weight train adapter".split()


# ------------------------------------------------------------------------------------------------------ set-up


def write_checkpoint(args, model_dir: Path) -> None:
    """The W4A16 checkpoint and tokenizer (skipped when ``model_dir`` already holds them)."""
    if (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors")):
        return
    import torch
    from common import llama_config
    from loader_memory import _stream

    from int4lora_train.modeling.tiny_models import build_tokenizer
    from int4lora_train.quant.packer import write_int4_checkpoint

    started = time.perf_counter()
    shape = SimpleNamespace(**{k: getattr(args, k) for k in SHAPE_8B}, group_size=args.group_size)
    write_int4_checkpoint(
        llama_config(shape, max_position_embeddings=max(131072, args.seq)),
        _stream(shape),
        model_dir,
        format="compressed-tensors",
        group_size=args.group_size,
        symmetric=True,
        max_shard_bytes=4 * 2**30,
        overwrite=True,
        dtype=torch.bfloat16,
    )
    build_tokenizer(model_max_length=args.seq).save_pretrained(model_dir)
    print(f"[train_run] wrote {model_dir} in {time.perf_counter() - started:.0f} s", flush=True)


def write_chat_data(path: Path, rows: int, seq: int, whole_rows: bool = False) -> None:
    """``rows`` chat records of random words, each about a third of a packed row (the byte tokenizer: 1 token per
    byte), so packing fills rows with several conversations; ``whole_rows``: each record nearly fills a row alone
    (no sample boundary inside a row, so attention needs no packed-sequence mask)."""
    if path.is_file():
        return
    rng = random.Random(0)

    def text(chars: int) -> str:
        out: list[str] = []
        while sum(len(w) + 1 for w in out) < chars:
            out.append(rng.choice(WORDS))
        return " ".join(out)

    with path.open("w") as f:
        for _ in range(rows):
            user, answer = rng.randint(seq // 20, seq // 8), rng.randint(seq // 8, seq // 4)
            if whole_rows:
                user, answer = seq // 4, seq - seq // 4 - 64
            record = {
                "messages": [{"role": "user", "content": text(user)}, {"role": "assistant", "content": text(answer)}]
            }
            f.write(json.dumps(record) + "\n")


def run_config(args, base: str, model_dir: Path, data: Path, out_dir: Path) -> dict:
    baseline = base != "int4"
    return {
        "model": {"path": str(model_dir), "dtype": "bfloat16", "device": args.device},
        "lora": {"r": 16, "alpha": 32, "dropout": args.dropout, "target_modules": "all-linear"},
        "data": {"train_files": [str(data)], "format": "chat", "max_length": args.seq, "packing": True},
        "train": {
            "seed": 42,
            "max_steps": args.steps,
            "micro_batch_size": args.bs,
            "gradient_accumulation_steps": 1,
            "lr": 2e-4,
            "scheduler": "cosine",
            "warmup_ratio": 0.03,
            "max_grad_norm": 1.0,
            "mixed_precision": "bf16" if args.device != "cpu" else "no",
            "gradient_checkpointing": True,
            "log_every": 1,
            "save_every": None,
            "eval_every": None,
            "eval_at_start": False,
            # bf16 + PEFT and NF4 as users run them with HF: the model's own loss, no toolkit kernels or graphs,
            # transformers' attention over packed rows (a block-causal mask built from the position ids).
            **(
                {
                    "speed": {
                        "chunked_loss": False,
                        "fused_kernels": "off",
                        "fused_rope": False,
                        "packed_attention": "mask",
                        "cuda_graphs": "off",
                    }
                }
                if baseline
                else {}
            ),
        },
        # No export: the adapter is not what is timed (and a dense baseline has no INT4 base to record).
        "output": {
            "dir": str(out_dir),
            "tensorboard": False,
            "plot": False,
            "if_exists": "overwrite",
            "export": {"enabled": False},
        },
    }


# ------------------------------------------------------------------------------------------------- one base


def child(args) -> None:
    """Train one base in this process (``--child BASE``); writes ``<work>/result-<base>.json``."""
    import torch
    import yaml

    from int4lora_train.train import job

    work = Path(args.work)
    config_path = work / f"{args.child}.yaml"
    device = torch.device(args.device if args.device != "auto" else "cuda")
    if args.child != "int4":
        from common import _quantize_nf4, build_model

        from int4lora_train.modeling.surgery import dequantized_copy

        shape = SimpleNamespace(**vars(args), cache_gb=None)  # what build_model reads
        load_int4 = job.load_model

        def load_baseline(config, load_device):
            if args.baseline_weights == "random":
                torch.manual_seed(0)
                return build_model(shape, args.child, load_device, torch.bfloat16)
            # The same weights as the INT4 run: the checkpoint dequantized (bf16), NF4 re-quantizes those.
            int4 = load_int4(config, load_device)
            model = dequantized_copy(int4, torch.bfloat16)
            del int4
            if args.child == "nf4":
                _quantize_nf4(model, load_device)
            return model

        job.load_model = load_baseline  # the same run_training; only the base model differs

    profiler = _start_profiler(args, work) if args.profile else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    from int4lora_train import cli

    overrides = args.set if args.child == "int4" else []  # the baselines run as users get them
    status = cli.main(["train", "--config", str(config_path), "-q", *overrides])
    wall = time.perf_counter() - started
    if profiler is not None:
        profiler.stop()
        averages = profiler.key_averages()
        tables = [averages.table(sort_by="self_cpu_time_total", row_limit=30)]
        if device.type == "cuda":  # where the GPU's time goes, then (above) where the host's goes
            # kernels (and copies) only: the trainer's int4lora/* ranges and ProfilerStep also have device rows
            kernels = [
                event
                for event in averages
                if event.device_type == torch.autograd.DeviceType.CUDA
                and not event.key.startswith(("int4lora/", "ProfilerStep"))
            ]
            busy_ms = sum(event.self_device_time_total for event in kernels) / 1e3 / 3
            tables.insert(0, averages.table(sort_by="self_cuda_time_total", row_limit=40))
            tables.insert(0, f"GPU busy (sum of self device time) per profiled step: {busy_ms:.1f} ms\n")
        (work / f"profile-{args.child}.txt").write_text("\n".join(tables))
        trace = work / f"trace-{args.child}.json"
        profiler.export_chrome_trace(str(trace))  # the timeline: where the GPU waits for the host
        with trace.open("rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()
    run_dir = Path(yaml.safe_load(config_path.read_text())["output"]["dir"])
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [m for m in metrics if "train/tokens_per_s" in m]
    steady = [m for m in steps if m.get("step", 0) > args.warmup] or steps
    rates = [m["train/tokens_per_s"] for m in steady]
    # tokens of each steady step: its running total minus the previous logged step's (one steady step is enough)
    per_step = [b["train/tokens"] - a["train/tokens"] for a, b in zip(steps, steps[1:]) if b in steady]
    tokens_per_step = statistics.median(per_step) if per_step else None
    result = {
        "base": args.child,
        "status": status,
        "wall_s": wall,
        "steps": len(steps),
        "tokens_per_s": statistics.median(rates) if rates else None,
        "tokens_per_step": tokens_per_step,
        "step_s": tokens_per_step / statistics.median(rates) if rates and tokens_per_step else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "loss": [(m["step"], m["train/loss"]) for m in steps],
    }
    (work / f"result-{args.child}.json").write_text(json.dumps(result, indent=2))


def _start_profiler(args, work: Path):
    """A profiler over three steady-state steps, stepped by the trainer's per-step hook."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from int4lora_train.train.module import LoraModule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities, schedule=schedule(wait=max(args.warmup - 1, 0), warmup=1, active=3, repeat=1))
    prof.start()
    original = LoraModule.on_train_step_end

    def on_train_step_end(self, step, metrics):
        prof.step()
        return original(self, step, metrics)

    LoraModule.on_train_step_end = on_train_step_end
    return prof


# ------------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="working directory (the checkpoint is kept there)")
    parser.add_argument("--bases", default="int4,bf16,nf4", help="comma-separated, from int4, bf16, nf4")
    for key, value in SHAPE_8B.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=value, help=f"default {value}")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--seq", type=int, default=2048, help="tokens per packed row")
    parser.add_argument("--bs", type=int, default=4, help="micro batch (rows per step)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=6, help="steps left out of the steady state")
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (the shipped 8B config: 0.05)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--profile", action="store_true", help="profile three steady-state steps of each base")
    parser.add_argument("--whole-rows", action="store_true", help="one conversation per row (no packing mask)")
    parser.add_argument(
        "--baseline-weights",
        choices=("dequantized", "random"),
        default="dequantized",
        help="bf16 / nf4 bases: the INT4 checkpoint dequantized (the same function: loss curves comparable), or "
        "random bf16 weights of the same shape (no INT4 load)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for the int4 run, as `int4lora-train train` takes it (repeatable), e.g. "
        "train.memory.offload_activations=on",
    )
    parser.add_argument(
        "--reuse-model", action="store_true", help="keep a checkpoint an earlier run of the same shape wrote in --work"
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", choices=BASES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return None

    import yaml

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir, data = work / "model", work / ("chat-whole-rows.jsonl" if args.whole_rows else "chat.jsonl")
    if args.reuse_model and (model_dir / "config.json").is_file():
        print(f"[train_run] reusing {model_dir} (--reuse-model)", flush=True)
    else:
        write_checkpoint(args, model_dir)
    write_chat_data(data, rows=max(64, 4 * args.steps * args.bs), seq=args.seq, whole_rows=args.whole_rows)
    results = {}
    for base in args.bases.split(","):
        (work / f"{base}.yaml").write_text(
            yaml.safe_dump(run_config(args, base, model_dir, data, work / f"run-{base}"))
        )
        command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--child", base]
        print(f"[train_run] {base}: {' '.join(command)}", flush=True)
        done = subprocess.run(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        path = work / f"result-{base}.json"
        results[base] = json.loads(path.read_text()) if done.returncode == 0 and path.is_file() else {"failed": True}
        print(f"[train_run] {base}: {json.dumps({k: v for k, v in results[base].items() if k != 'loss'})}", flush=True)
    report = {"args": {k: v for k, v in vars(args).items() if k != "child"}, "results": results}
    int4 = results.get("int4", {})
    for other in ("bf16", "nf4"):
        theirs = results.get(other, {})
        if int4.get("tokens_per_s") and theirs.get("tokens_per_s"):
            report[f"int4_vs_{other}_speed"] = int4["tokens_per_s"] / theirs["tokens_per_s"]
        if int4.get("peak_memory_bytes") and theirs.get("peak_memory_bytes"):
            report[f"int4_vs_{other}_memory"] = int4["peak_memory_bytes"] / theirs["peak_memory_bytes"]
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=2))
    print(f"{'base':<6} {'tokens/s':>10} {'step s':>8} {'peak GiB':>9}")
    for base, r in results.items():
        if r.get("tokens_per_s"):
            peak = (r.get("peak_memory_bytes") or 0) / 2**30
            step = f"{r['step_s']:>8.3f}" if r.get("step_s") else f"{'-':>8}"
            print(f"{base:<6} {r['tokens_per_s']:>10.0f} {step} {peak:>9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
