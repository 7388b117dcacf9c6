"""Where the GPU waits for the host: the idle gaps of a profiler timeline, and what the host was doing meanwhile.

    python benchmarks/trace_gaps.py /tmp/train-run/trace-int4.json.gz          # from train_run.py --profile
    python benchmarks/trace_gaps.py trace.json --min-us 50 --top 30

The GPU is busy while any kernel, copy or memset runs (on any stream). Every idle stretch of at least ``--min-us``
is a gap; each is attributed to

* ``phase``: the trainer's ``int4lora/*`` range (data, forward, backward, loss-sync, clip, optimizer) enclosing the
  launch of the kernel that ends the gap: the work the GPU was waiting for;
* ``host``: the innermost host op running when the gap began (e.g. ``cudaStreamSynchronize``: the host was waiting
  for the GPU to drain, so the gap is the cost of that sync plus the host's work after it).

The report: total idle time per step, then per phase, then the longest gaps.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
import sys
from dataclasses import dataclass
from pathlib import Path

DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
LAUNCH_CATEGORIES = {"cuda_runtime", "cuda_driver"}
HOST_CATEGORIES = {"cpu_op", "user_annotation", "python_function"} | LAUNCH_CATEGORIES
PHASE_PREFIX = "int4lora/"


@dataclass(frozen=True)
class Gap:
    start: float  # us, trace clock
    end: float
    phase: str
    host: str

    @property
    def us(self) -> float:
        return self.end - self.start


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def busy_intervals(events: list[dict]) -> list[tuple[float, float, dict]]:
    """The device events ``(start, end, event)`` sorted by start."""
    spans = [
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e)
        for e in events
        if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES
    ]
    return sorted(spans, key=lambda s: s[0])


def idle_gaps(spans: list[tuple[float, float, dict]], min_us: float) -> list[tuple[float, float, dict]]:
    """``(start, end, event that ends the gap)`` of every idle stretch >= ``min_us`` between the first and last
    device event."""
    gaps, busy_until = [], None
    for start, end, event in spans:
        if busy_until is not None and start - busy_until >= min_us:
            gaps.append((busy_until, start, event))
        busy_until = end if busy_until is None else max(busy_until, end)
    return gaps


class HostTimeline:
    """The host's ranges per thread, to ask what enclosed a moment (innermost first)."""

    def __init__(self, events: list[dict]) -> None:
        self.ranges = sorted(
            (
                (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e["name"])
                for e in events
                if e.get("ph") == "X" and e.get("cat") in HOST_CATEGORIES
            ),
            key=lambda r: r[0],
        )
        self.starts = [r[0] for r in self.ranges]
        self.longest = max((r[1] - r[0] for r in self.ranges), default=0.0)

    def enclosing(self, moment: float) -> list[tuple[float, float, str]]:
        """Ranges that contain ``moment``, shortest (innermost) first."""
        first = bisect.bisect_left(self.starts, moment - self.longest)
        last = bisect.bisect_right(self.starts, moment)
        inside = [r for r in self.ranges[first:last] if r[0] <= moment <= r[1]]
        return sorted(inside, key=lambda r: r[1] - r[0])


def attribute(events: list[dict], min_us: float) -> tuple[list[Gap], float]:
    """The gaps with their phase and host op; and the device-busy time span (first start to last end)."""
    spans = busy_intervals(events)
    if not spans:
        return [], 0.0
    launches = {
        e["args"]["correlation"]: float(e["ts"])
        for e in events
        if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})
    }
    host = HostTimeline(events)
    gaps = []
    for start, end, event in idle_gaps(spans, min_us):
        launched = launches.get(event.get("args", {}).get("correlation"))
        phases = [name for *_, name in host.enclosing(launched)] if launched is not None else []
        phase = next((n for n in phases if n.startswith(PHASE_PREFIX)), "(outside the trainer's phases)")
        running = [n for *_, n in host.enclosing(start) if not n.startswith(("ProfilerStep", PHASE_PREFIX))]
        gaps.append(Gap(start, end, phase, running[0] if running else "(no host op)"))
    return gaps, spans[-1][1] - spans[0][0]


def report(gaps: list[Gap], span_us: float, steps: int, top: int) -> str:
    idle = sum(g.us for g in gaps)
    lines = [
        f"device timeline {span_us / 1e3:.1f} ms over {steps} step(s); idle in {len(gaps)} gaps: "
        f"{idle / 1e3:.1f} ms ({idle / 1e3 / steps:.1f} ms per step, {100 * idle / max(span_us, 1):.1f}%)",
        "",
        f"{'phase (whose launch ended the gap)':<40}{'gaps':>6}{'ms/step':>10}   host op at the gap's start (ms/step)",
    ]
    by_phase: dict[str, list[Gap]] = collections.defaultdict(list)
    for gap in gaps:
        by_phase[gap.phase].append(gap)
    for phase, members in sorted(by_phase.items(), key=lambda item: -sum(g.us for g in item[1])):
        hosts = collections.Counter()
        for gap in members:
            hosts[gap.host] += gap.us
        common = ", ".join(f"{name} {us / 1e3 / steps:.2f}" for name, us in hosts.most_common(3))
        total = sum(g.us for g in members) / 1e3 / steps
        lines.append(f"{phase:<40}{len(members):>6}{total:>10.2f}   {common}")
    lines += ["", f"longest {top} gaps:", f"{'us':>9}  {'phase':<28} host op at the start"]
    for gap in sorted(gaps, key=lambda g: -g.us)[:top]:
        lines.append(f"{gap.us:>9.0f}  {gap.phase:<28} {gap.host}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path, help="a Chrome trace (.json or .json.gz) from torch.profiler")
    parser.add_argument("--min-us", type=float, default=20.0, help="shortest idle stretch counted as a gap")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps in the trace (train_run.py: 3)")
    parser.add_argument("--top", type=int, default=20, help="longest gaps listed")
    args = parser.parse_args(argv)
    events = load_events(args.trace)
    gaps, span = attribute(events, args.min_us)
    if not span:
        print(f"{args.trace}: no device events (a CPU-only trace?)", file=sys.stderr)
        return 2
    print(report(gaps, span, args.steps, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
