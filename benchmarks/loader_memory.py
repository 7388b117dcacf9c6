"""Peak host memory of loading a multi-shard W4A16 checkpoint, against the checkpoint's size.

Writes (streaming, one layer at a time, random INT4 weights) a compressed-tensors pack-quantized checkpoint of a
Llama-shaped model with the toolkit's packer, then loads it with ``load_int4_model`` in a fresh process and reads
that process's peak resident set size (``VmHWM``). Defaults are the Llama-3.1-8B shape (32 layers, hidden 4096,
intermediate 14336, 32/8 heads, vocab 128256; ~5.7 GB); target: peak RSS <= 1.3x the checkpoint size.

    .venv/bin/python benchmarks/loader_memory.py                          # full 8B shape (~5.7 GB on disk)
    .venv/bin/python benchmarks/loader_memory.py --layers 4 --vocab 32000 # a reduced size
    .venv/bin/python benchmarks/loader_memory.py --json result.json

Each phase runs in its own process so that one phase's peak does not count against the other.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import llama_config, proc_status, random_int4_weight


def _status() -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon / RssFile of this process, in bytes (Linux)."""
    return proc_status("VmRSS", "VmHWM", "RssAnon", "RssFile")


def _stream(args):
    """``(name, tensor | Int4Weight)`` for the whole model, generated one tensor at a time."""
    import torch

    gen = torch.Generator().manual_seed(0)
    h, i, hd = args.hidden, args.intermediate, args.hidden // args.heads
    yield "model.embed_tokens.weight", (torch.randn(args.vocab, h, generator=gen) * 0.02).to(torch.bfloat16)
    shapes = {
        "self_attn.q_proj": (args.heads * hd, h),
        "self_attn.k_proj": (args.kv_heads * hd, h),
        "self_attn.v_proj": (args.kv_heads * hd, h),
        "self_attn.o_proj": (h, args.heads * hd),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }
    for layer in range(args.layers):
        prefix = f"model.layers.{layer}"
        yield f"{prefix}.input_layernorm.weight", torch.ones(h, dtype=torch.bfloat16)
        yield f"{prefix}.post_attention_layernorm.weight", torch.ones(h, dtype=torch.bfloat16)
        for name, (out_features, in_features) in shapes.items():
            # scales like a trained layer's ~ 1e-2
            yield (
                f"{prefix}.{name}",
                random_int4_weight(out_features, in_features, args.group_size, generator=gen, scale_spread=0.02),
            )
    yield "model.norm.weight", torch.ones(h, dtype=torch.bfloat16)
    yield "lm_head.weight", (torch.randn(args.vocab, h, generator=gen) * 0.02).to(torch.bfloat16)


def phase_write(args) -> dict:
    import torch

    from int4lora_train.quant.packer import write_int4_checkpoint

    start = time.perf_counter()
    write_int4_checkpoint(
        llama_config(args, max_position_embeddings=131072),
        _stream(args),
        args.out,
        format="compressed-tensors",
        group_size=args.group_size,
        symmetric=True,
        max_shard_bytes=int(args.max_shard_gb * 2**30),
        overwrite=True,
        dtype=torch.bfloat16,
    )
    files = sorted(Path(args.out).glob("*.safetensors"))
    return {
        "seconds": time.perf_counter() - start,
        "checkpoint_bytes": sum(f.stat().st_size for f in files),
        "shards": len(files),
        "peak_rss_bytes": _status()["VmHWM"],
    }


def phase_load(args) -> dict:
    import torch

    from int4lora_train.modeling import Int4Linear, load_int4_model

    baseline = _status()  # interpreter + torch + transformers, before any weight is read
    start = time.perf_counter()
    model = load_int4_model(args.out, device="cpu", dtype=torch.bfloat16)
    seconds = time.perf_counter() - start
    loaded = _status()
    # Tensors that needed no conversion stay memory-mapped from the shards and only become resident when used;
    # touch every page of every tensor so the figure is the model fully in memory, not just what loading touched.
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.reshape(-1)[::1024].sum()
    after = _status()
    result = {
        "seconds": seconds,
        "baseline_rss_bytes": baseline["VmRSS"],
        "peak_rss_during_load_bytes": loaded["VmHWM"],
        "peak_rss_bytes": after["VmHWM"],
        "rss_after_bytes": after["VmRSS"],
        "rss_anon_after_bytes": after["RssAnon"],
        "rss_file_after_bytes": after["RssFile"],
        "int4_layers": sum(isinstance(m, Int4Linear) for m in model.modules()),
        "model_bytes": sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]),
    }
    if args.forward:
        with torch.no_grad():
            logits = model(torch.tensor([[1, 2, 3, 4]])).logits
        result["forward_ok"] = bool(torch.isfinite(logits).all())
        result["peak_rss_after_forward_bytes"] = _status()["VmHWM"]
    return result


def _run_phase(phase: str, argv: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--phase", phase, *argv], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--max-shard-gb", type=float, default=2.0, help="shard size limit of the written checkpoint")
    parser.add_argument("--out", default=None, help="checkpoint directory (default: a temporary one, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    parser.add_argument("--forward", action="store_true", help="also run one short forward after loading (slow)")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    parser.add_argument("--phase", choices=["write", "load"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:
        result = phase_write(args) if args.phase == "write" else phase_load(args)
        print(json.dumps(result))
        return

    tmp = None
    if args.out is None:
        tmp = tempfile.mkdtemp(prefix="int4-loader-bench-")
        args.out = os.path.join(tmp, "checkpoint")
    argv = [a for a in sys.argv[1:] if a not in ("--keep", "--json") and a != args.json]
    if "--out" not in argv:
        argv += ["--out", args.out]
    try:
        written = _run_phase("write", argv)
        loaded = _run_phase("load", argv)
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    size = written["checkpoint_bytes"]
    shape = f"{args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, vocab {args.vocab}"
    rows = [
        ("model shape", shape),
        ("checkpoint", f"{size / 2**30:.2f} GiB in {written['shards']} shard(s) (written in {written['seconds']:.0f} s)"),
        ("load time", f"{loaded['seconds']:.1f} s ({loaded['int4_layers']} Int4Linear layers)"),
        ("RSS before loading", f"{loaded['baseline_rss_bytes'] / 2**30:.2f} GiB (python + torch + transformers)"),
        ("peak RSS during load_int4_model", f"{loaded['peak_rss_during_load_bytes'] / 2**30:.2f} GiB"),
        ("peak RSS, every weight resident", f"{loaded['peak_rss_bytes'] / 2**30:.2f} GiB"),
        ("peak RSS / checkpoint", f"{loaded['peak_rss_bytes'] / size:.3f}x (target <= 1.3x)"),
        ("(peak - before) / checkpoint", f"{(loaded['peak_rss_bytes'] - loaded['baseline_rss_bytes']) / size:.3f}x"),
        ("RSS after loading", f"{loaded['rss_after_bytes'] / 2**30:.2f} GiB "
                              f"(anon {loaded['rss_anon_after_bytes'] / 2**30:.2f}, "
                              f"file-backed {loaded['rss_file_after_bytes'] / 2**30:.2f})"),
    ]  # fmt: skip
    if args.forward:
        rows.append(
            (
                "forward after loading",
                f"finite logits: {loaded['forward_ok']}, peak RSS "
                f"{loaded['peak_rss_after_forward_bytes'] / 2**30:.2f} GiB",
            )
        )
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    result = {"args": {k: v for k, v in vars(args).items() if k != "phase"}, "write": written, "load": loaded}
    result["peak_rss_over_checkpoint"] = loaded["peak_rss_bytes"] / size
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
