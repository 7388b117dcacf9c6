"""The longest sequence each training mode fits in a memory limit: one ``train_step.py`` step per try, bisected.

For every mode of ``--modes`` it runs ``train_step.py`` (bs 1, one timed step, no warm-up step) in a fresh process per
sequence length, so an out-of-memory try leaves nothing behind, and keeps a length when the step ran and its peak
(CUDA peak allocated) stayed within ``--limit-gib``. Lengths double from ``--start`` until a try fails or ``--max`` is
reached, then bisect between the longest success and the shortest failure down to ``--granularity`` tokens. Every
try is printed and written to ``--json`` as it ends (a call that runs out of time keeps what it measured).

    # issue 16: the 8B shape within 80 GB: INT4 with the memory features, then bf16 + PEFT as it comes
    python3 benchmarks/longest_seq.py --modes int4-opt --start 65536 --max 1048576 --granularity 16384 \\
        --json longest_int4.json -- --offload-activations on --mlp-chunk-tokens auto
    python3 benchmarks/longest_seq.py --modes bf16 --start 8192 --max 262144 --json longest_bf16.json

Arguments after ``--`` go to ``train_step.py`` unchanged (shape, memory features, ...), for every mode of the call:
run a baseline without memory features in its own call, as above. A try that takes longer than
``--try-timeout`` seconds counts as a failure of that length (said in its row).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def try_length(mode: str, seq: int, extra: list[str], timeout: float, limit_bytes: float) -> dict:
    """One ``train_step.py`` step of ``mode`` at ``seq`` tokens: ``{"seq", "ok", "peak_gib", "step_s", "why"}``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "step.json"
        command = [
            sys.executable,
            str(HERE / "train_step.py"),
            "--modes",
            mode,
            "--seq",
            str(seq),
            "--bs",
            "1",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--json",
            str(out),
            *extra,
        ]
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"seq": seq, "ok": False, "why": f"no step within {timeout:.0f} s"}
        row = {"seq": seq, "wall_s": round(time.perf_counter() - started, 1)}
        results = json.loads(out.read_text()).get("results", []) if out.exists() else []
        if not results:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return {**row, "ok": False, "why": f"exit {done.returncode}: {last}"}
    result = results[0]
    if "error" in result:
        return {**row, "ok": False, "why": result["error"]}
    peak = result.get("peak_memory_bytes") or 0
    row.update(peak_gib=round(peak / 2**30, 2), step_s=round(result["median_step_s"], 3))
    row["tokens_per_s"] = round(seq / result["median_step_s"])
    if peak > limit_bytes:
        return {**row, "ok": False, "why": f"peak {peak / 2**30:.2f} GiB over the limit"}
    return {**row, "ok": True}


def lengths_to_try(start: int, maximum: int, granularity: int, outcome) -> int | None:
    """Double from ``start`` while ``outcome(seq)`` is True (up to ``maximum``), then bisect between the longest
    success and the shortest failure to ``granularity``; returns the longest success (None: ``start`` failed)."""
    good, bad, seq = None, None, start
    while seq <= maximum:
        if not outcome(seq):
            bad = seq
            break
        good, seq = seq, seq * 2
    if good is None or bad is None:
        return good
    while bad - good > granularity:
        middle = (good + bad) // 2 // granularity * granularity
        if middle <= good:
            break
        if outcome(middle):
            good = middle
        else:
            bad = middle
    return good


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="int4-opt,bf16", help="train_step.py modes, comma-separated")
    parser.add_argument("--limit-gib", type=float, default=74.5, help="peak allocated allowed (80 GB = 74.5 GiB)")
    parser.add_argument("--start", type=int, default=8192)
    parser.add_argument("--max", type=int, default=1 << 20)
    parser.add_argument("--granularity", type=int, default=8192)
    parser.add_argument("--try-timeout", type=float, default=300.0, help="seconds one try may take")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.start < 1 or args.granularity < 1 or args.max < args.start:
        parser.error("--start and --granularity must be positive and --max at least --start")
    report = {"limit_gib": args.limit_gib, "train_step_args": extra, "modes": {}}
    for mode in (m.strip() for m in args.modes.split(",") if m.strip()):
        tries: list[dict] = []
        report["modes"][mode] = {"tries": tries, "longest": None}

        def outcome(seq: int, mode=mode, tries=tries) -> bool:
            row = try_length(mode, seq, extra, args.try_timeout, args.limit_gib * 2**30)
            tries.append(row)
            print(f"{mode} seq {seq}: " + json.dumps({k: v for k, v in row.items() if k != "seq"}), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
            return row["ok"]

        longest = lengths_to_try(args.start, args.max, args.granularity, outcome)
        report["modes"][mode]["longest"] = longest
        best = next((t for t in tries if t["seq"] == longest), None)
        print(f"{mode}: longest {longest} tokens" + (f" ({best['peak_gib']} GiB, {best['step_s']} s)" if best else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
