"""GPU benchmark of the fused INT4 dequantization kernel against a device-to-device copy and the prototype.

    PYTHONPATH=. python3 benchmarks/dequant.py                      # the table (Llama-3-8B projection shapes)
    PYTHONPATH=. python3 benchmarks/dequant.py --sweep --variants   # + tile-shape sweep, + other weight kinds
    PYTHONPATH=. python3 benchmarks/dequant.py --check --no-table   # bit-exactness against the torch path, on the GPU

BENCHMARKS.md records the results and the exact commands.

Bandwidth counts bytes read plus bytes written, for every row of the table:

* copy: ``dst.copy_(src)`` of a bf16 ``[out, in]`` tensor: reads and writes ``out * in * 2`` bytes each;
* fill: ``dst.fill_(1.0)`` of the output: writes its bytes and reads nothing: a lower bound on the time of any kernel
  that writes the same output ("fill / fused" = fill time / kernel time);
* fused kernel: reads the packed bytes, the scales (and zero points), writes the ``[out, in]`` output;
* prototype: the same useful bytes as the fused kernel (its extra traffic is its own cost).

Two timings of every operation, both medians after warm-up:

* steady state (the table's main columns): the operation runs over K rotating sets of buffers (K * bytes >= 4x the
  L2 cache, so no input is still cached from its last use), captured in one CUDA graph and replayed back to back;
  time per call = replay time / K. No launch gaps, no cache flush; each call pays for writing back its own output,
  as a dequantization followed by other work in a training step does.
* single launch, cold L2: one call captured alone in a CUDA graph (host-side launch cost stays out), timed by
  ``triton.testing.do_bench``, which zeroes a 256 MB buffer before every repetition. The L2 then starts full of
  dirty lines that the timed call must write back, a fixed cost of a few us that weighs most on the shortest calls.

The prototype is the algorithm of the unmerged vLLM ``INT4Unpacker`` (../shared/PEFT_VLLM.md section 2.4),
re-implemented in :func:`prototype_dequant`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import re
import statistics
import sys
import time

import torch
import triton
import triton.testing

from int4lora_train.kernels.dequant import LaunchConfig, config_for, launch_dequant
from int4lora_train.quant.dequant import dequantize_torch
from int4lora_train.quant.layout import Int4Weight

LLAMA3_8B_SHAPES = {  # (out, in) of the projections; q/k/v and gate/up are fused as vLLM serves them
    "qkv_proj": (6144, 4096),
    "o_proj": (4096, 4096),
    "gate_up_proj": (28672, 4096),
    "down_proj": (4096, 14336),
}

SWEEP_BLOCKS = [  # (block_n, block_k, num_warps); the library picks 16x1024x8 or 4x2048x8 (config_for)
    (8, 512, 4),
    (4, 1024, 4),
    (4, 2048, 8),
    (2, 2048, 4),
    (64, 256, 8),
    (32, 256, 8),
    (16, 256, 4),
    (16, 512, 8),
    (32, 512, 8),
    (8, 1024, 8),
    (16, 1024, 8),
    (8, 2048, 8),
    (128, 128, 8),
]


def random_weight(
    out_features: int,
    in_features: int,
    group_size: int | None,
    scale_dtype: torch.dtype = torch.bfloat16,
    symmetric: bool = True,
    per_tensor: bool = False,
    activation_order: bool = False,
    word_padded: bool = True,
    seed: int = 0,
) -> Int4Weight:
    """A random weight on the GPU; rows padded to int32 words like compressed-tensors' unless ``word_padded`` is off."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    row_bytes = 4 * -(-in_features // 8) if word_padded else -(-in_features // 2)
    packed = torch.randint(0, 256, (out_features, row_bytes), dtype=torch.uint8, device="cuda", generator=gen)
    groups = 1 if group_size is None else -(-in_features // group_size)
    shape = (1,) if per_tensor else (out_features, groups)
    scales = (torch.rand(shape, device="cuda", generator=gen) * 0.02 + 1e-3).to(scale_dtype)
    zero_points = None
    if not symmetric:
        zero_points = torch.randint(-8, 9, shape, dtype=torch.int8, device="cuda", generator=gen)
    g_idx = None
    if activation_order:
        g_idx = (torch.randperm(in_features, device="cuda", generator=gen) % groups).to(torch.int32)
    return Int4Weight.create(packed, scales, in_features, group_size, zero_points, g_idx)


def prototype_dequant(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The prototype's algorithm, step by step: unpack into a zeroed uint8 [out, in], shift to int8, cast, then
    expand the zero points and scales to [out, in] with repeat() and apply them. Grouped weights only."""
    out_features, packed_cols = packed.shape
    unpacked = torch.zeros(out_features, packed_cols * 2, dtype=torch.uint8, device=packed.device)
    unpacked[:, 0::2] = packed & 0x0F
    unpacked[:, 1::2] = (packed >> 4) & 0x0F
    weight = (unpacked.to(torch.int8) - 8).to(dtype)
    if zero_points is not None:
        zp = zero_points.unsqueeze(2).repeat(1, 1, group_size).view(out_features, -1)
        weight = weight - zp[:, : packed_cols * 2].to(dtype)
    expanded_scales = scales.unsqueeze(2).repeat(1, 1, group_size).view(out_features, -1)
    return weight * expanded_scales[:, : packed_cols * 2].to(dtype)


def cold_us(fn, args: tuple) -> float:
    """Single launch, cold L2 (see the module docstring): ``fn(*args)`` captured alone in a CUDA graph (so host-side
    launch cost cannot leave the GPU idle inside the timed region), timed by ``do_bench``."""
    graph = capture(fn, [args])
    us = 1e3 * triton.testing.do_bench(graph.replay, warmup=25, rep=250, return_mode="median")
    del graph
    torch.cuda.synchronize()
    return us


def capture(fn, arg_sets: list[tuple]) -> torch.cuda.CUDAGraph:
    """One CUDA graph of ``fn(*args)`` for every args in ``arg_sets``, after a warm-up run outside the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, allocator) outside the capture
        for args in arg_sets:
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in arg_sets:
            fn(*args)
    return graph


def rotating_sets(bytes_per_call: int) -> int:
    """How many buffer sets make one pass over them move at least 4x the L2 cache (and never fewer than 2)."""
    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, math.ceil(4 * l2_bytes / bytes_per_call))


def steady_state_us(fn, arg_sets: list[tuple], replays: int = 50, trials: int = 7) -> float:
    """Median microseconds per call of ``fn(*args)`` over the rotating ``arg_sets``, captured in one CUDA graph
    and replayed back to back (see the module docstring)."""
    graph = capture(fn, arg_sets)
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end) / (replays * len(arg_sets)))
    del graph
    torch.cuda.synchronize()
    return statistics.median(times)


def host_overhead_us(calls: int = 2000) -> float:
    """Host time of one ``launch_dequant`` call (argument checks + Triton launch), on a small weight."""
    weight = random_weight(256, 256, 128)
    out = torch.empty(weight.shape, dtype=torch.bfloat16, device="cuda")
    for _ in range(50):
        launch_dequant(weight, torch.bfloat16, out)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        launch_dequant(weight, torch.bfloat16, out)
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * elapsed / calls


def peak_bytes(fn) -> int:
    """Peak device memory allocated while ``fn`` runs, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak


def bytes_moved(weight: Int4Weight, dtype: torch.dtype) -> int:
    """Bytes the fused kernel must read (the packed bytes that hold columns, scales, zero points, g_idx) plus write
    (the output)."""
    out_features, in_features = weight.shape
    read = out_features * -(-in_features // 2) + weight.nbytes - weight.packed.numel()
    return read + out_features * in_features * dtype.itemsize


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def check_bit_exact(random_cases: int, seed: int = 0) -> list[str]:
    """dequantize via the kernel == dequantize_torch, bit for bit, on the GPU; the output is poisoned first so an
    unwritten element fails. Returns the failures."""
    rng = random.Random(seed)
    floats = [torch.float16, torch.bfloat16, torch.float32]
    configs = [None, LaunchConfig(8, 128, 4, word_loads=False), LaunchConfig(4, 2048, 8), LaunchConfig(16, 1024, 8)]
    configs += [LaunchConfig(16, 1024, 8, store_hint=".cs"), LaunchConfig(4, 2048, 8, store_hint="evict_first")]
    cases = []
    for (out_features, in_features), symmetric in itertools.product(LLAMA3_8B_SHAPES.values(), (True, False)):
        cases.append(dict(out_features=out_features, in_features=in_features, group_size=128, symmetric=symmetric))
    for i in range(random_cases):
        kind = rng.choice(["group", "group", "odd_group", "channel", "tensor", "g_idx"])
        in_features = rng.choice([rng.randint(1, 64), rng.randint(65, 3000), 8 * rng.randint(1, 512)])
        group_size = {"group": rng.choice([32, 64, 128]), "odd_group": rng.choice([9, 48, 100])}.get(kind)
        if kind == "g_idx":
            group_size = rng.choice([32, 64, 128])
        cases.append(
            dict(
                out_features=rng.choice([1, rng.randint(1, 64), rng.randint(65, 2000)]),
                in_features=in_features,
                group_size=group_size,
                scale_dtype=rng.choice(floats),
                symmetric=rng.random() < 0.5,
                per_tensor=kind == "tensor",
                activation_order=kind == "g_idx",
                word_padded=rng.random() < 0.7,
                seed=i,
            )
        )
    failures = []
    for case in cases:
        weight = random_weight(**case)
        for dtype in floats:
            config = rng.choice(configs)
            want = dequantize_torch(weight, dtype)
            got = torch.full(weight.shape, float("nan"), dtype=dtype, device="cuda")
            launch_dequant(weight, dtype, got, config)
            differ = int((bits(got) != bits(want)).sum())
            if differ:
                failures.append(f"{case} -> {dtype} with {config}: {differ} elements differ")
    print(f"bit-exactness on the GPU: {len(cases)} weights x 3 output dtypes, {len(failures)} failures")
    for failure in failures[:20]:
        print("  FAIL", failure)
    return failures


def sweep(group_size: int, dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """Steady-state time (us) of every tile shape / load mode on every shape."""
    configs = [LaunchConfig(bn, bk, w) for bn, bk, w in SWEEP_BLOCKS]
    configs += [LaunchConfig(bn, bk, w, word_loads=False) for bn, bk, w in SWEEP_BLOCKS[:3]]
    # The library's two tiles with each store hint (the kernel writes 4x the bytes it reads).
    configs += [
        LaunchConfig(bn, bk, w, store_hint=hint)
        for bn, bk, w in ((16, 1024, 8), (4, 2048, 8))
        for hint in (".cs", ".cg", ".wt", "evict_first")
    ]
    results: dict[str, dict[str, float]] = {}
    for name, (out_features, in_features) in LLAMA3_8B_SHAPES.items():
        first = random_weight(out_features, in_features, group_size)
        count = rotating_sets(bytes_moved(first, dtype))
        weights = [first] + [random_weight(out_features, in_features, group_size, seed=i) for i in range(1, count)]
        arg_sets = [(w, torch.empty(w.shape, dtype=dtype, device="cuda")) for w in weights]
        for config in configs:
            us = steady_state_us(lambda w, o, c=config: launch_dequant(w, dtype, o, c), arg_sets)
            results.setdefault(config_name(config), {})[name] = us
        del weights, arg_sets, first
        torch.cuda.empty_cache()
    names = list(LLAMA3_8B_SHAPES)
    print(f"\nsweep: steady-state us per call (bf16 out, group {group_size}); total = sum over the four shapes")
    print(f"{'config':<28}" + "".join(f"{n:>14}" for n in names) + f"{'total':>10}")
    for config, row in sorted(results.items(), key=lambda item: sum(item[1].values())):
        print(f"{config:<28}" + "".join(f"{row[n]:>14.1f}" for n in names) + f"{sum(row.values()):>10.1f}")
    return results


def parse_config(text: str) -> LaunchConfig:
    """``"8x512x4"`` (block_n x block_k x num_warps), optionally ``/<store hint>`` (``4x2048x8/.cs``) -> LaunchConfig."""
    tile, _, hint = text.partition("/")
    block_n, block_k, num_warps = (int(part) for part in tile.split("x"))
    return LaunchConfig(block_n, block_k, num_warps, store_hint=hint)


def config_name(config: LaunchConfig | None) -> str:
    """``16x1024/w8/words``; ``auto`` for the library's own choice (:func:`config_for`)."""
    if config is None:
        return "auto"
    name = f"{config.block_n}x{config.block_k}/w{config.num_warps}/{'words' if config.word_loads else 'bytes'}"
    return name + (f"/{config.store_hint}" if config.store_hint else "")


def measure_shape(
    out_features: int, in_features: int, group_size: int, dtype: torch.dtype, configs: list[LaunchConfig]
) -> dict:
    """One shape: copy and prototype, and the fused kernel with each config; steady state and single launch."""
    first = random_weight(out_features, in_features, group_size)
    moved = bytes_moved(first, dtype)
    weights = [first] + [
        random_weight(out_features, in_features, group_size, seed=i) for i in range(1, rotating_sets(moved))
    ]
    outs = [torch.empty(first.shape, dtype=dtype, device="cuda") for _ in weights]
    copy_sets = [(o, torch.randn(first.shape, device="cuda").to(dtype)) for o in outs]
    out_bytes = outs[0].numel() * dtype.itemsize

    def prototype(weight):
        packed = weight.packed[:, : -(-in_features // 2)]
        return prototype_dequant(packed, weight.scales, weight.zero_points, group_size, dtype)

    def copy(dst, src):
        return dst.copy_(src)

    def fill(dst):  # the output's writes alone: a lower bound for any kernel writing it
        return dst.fill_(1.0)

    row = dict(out=out_features, inp=in_features, bytes_moved=moved, rotating_sets=len(weights), fused={})
    row["auto_config"] = config_name(config_for(first))
    for label, fn, arg_sets in [("copy", copy, copy_sets), ("prototype", prototype, [(w,) for w in weights])]:
        row[f"{label}_us"] = steady_state_us(fn, arg_sets)
        row[f"{label}_cold_us"] = cold_us(fn, arg_sets[0])
    row["copy_gbs"] = 2 * out_bytes / row["copy_us"] / 1e3
    row["fill_us"] = steady_state_us(fill, [(o,) for o in outs])
    row["prototype_peak_x_out"] = peak_bytes(lambda: prototype(first)) / out_bytes
    row["prototype_bit_exact"] = torch.equal(bits(prototype(first)), bits(dequantize_torch(first, dtype)))
    for config in configs:

        def fused(weight, out=None, config=config):
            return launch_dequant(weight, dtype, out, config)

        us = steady_state_us(fused, list(zip(weights, outs)))
        fused_cold_us = cold_us(fused, (first, outs[0]))
        row["fused"][config_name(config)] = dict(
            us=us,
            again_us=steady_state_us(fused, list(zip(weights, outs))),
            gbs=moved / us / 1e3,
            pct_of_copy=100 * (moved / us) / (2 * out_bytes / row["copy_us"]),
            pct_of_fill=100 * row["fill_us"] / us,
            speedup=row["prototype_us"] / us,
            cold_us=fused_cold_us,
            cold_pct_of_copy=100 * (moved / fused_cold_us) / (2 * out_bytes / row["copy_cold_us"]),
            cold_speedup=row["prototype_cold_us"] / fused_cold_us,
            peak_x_out=peak_bytes(lambda fused=fused: fused(first)) / out_bytes,
        )
    return row


def table(group_size: int, dtype: torch.dtype, configs: list[LaunchConfig]) -> list[dict]:
    """The Llama-3-8B table for each config (the first is the library's default)."""
    rows = []
    for name, (out_features, in_features) in LLAMA3_8B_SHAPES.items():
        rows.append(dict(shape=name, **measure_shape(out_features, in_features, group_size, dtype, configs)))
        torch.cuda.empty_cache()
    for config in configs:
        key = config_name(config)
        print(f"\nconfig {key}; group {group_size}; {dtype} out; symmetric bf16 scales")
        print("steady state (rotating buffers, CUDA graph):")
        print(
            "| shape (out x in) | copy us | copy GB/s | fused us | fused GB/s | % of copy | fill us | fill / fused "
            "| prototype us | speedup | prototype peak / out |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            f = r["fused"][key]
            print(
                f"| {r['shape']} {r['out']}x{r['inp']} | {r['copy_us']:.1f} | {r['copy_gbs']:.0f} | {f['us']:.1f} "
                f"| {f['gbs']:.0f} | {f['pct_of_copy']:.1f}% | {r['fill_us']:.1f} | {f['pct_of_fill']:.1f}% "
                f"| {r['prototype_us']:.1f} | {f['speedup']:.1f}x "
                f"| {r['prototype_peak_x_out']:.2f}x |"
            )
        print("single launch, cold L2 (do_bench):")
        print("| shape | copy us | fused us | % of copy | prototype us | speedup |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            f = r["fused"][key]
            print(
                f"| {r['shape']} | {r['copy_cold_us']:.1f} | {f['cold_us']:.1f} | {f['cold_pct_of_copy']:.1f}% "
                f"| {r['prototype_cold_us']:.1f} | {f['cold_speedup']:.1f}x |"
            )
        print(
            "repeat of the steady-state fused timing (us): "
            + ", ".join(f"{r['fused'][key]['again_us']:.1f}" for r in rows)
        )
        print("fused peak / out: " + ", ".join(f"{r['fused'][key]['peak_x_out']:.2f}" for r in rows))
    print("\nauto config per shape: " + ", ".join(f"{r['shape']} {r['auto_config']}" for r in rows))
    print("rotating buffer sets: " + ", ".join(str(r["rotating_sets"]) for r in rows))
    print("prototype bit-exact with dequantize_torch: " + ", ".join(str(r["prototype_bit_exact"]) for r in rows))
    print(f"host time of one launch_dequant call: {host_overhead_us():.1f} us")
    return rows


def variants(config: LaunchConfig) -> list[dict]:
    """Other weight kinds on the down_proj shape (4096 x 14336), as % of the copy of the same output."""
    out_features, in_features = LLAMA3_8B_SHAPES["down_proj"]
    cases = {
        "group 128, sym": (dict(group_size=128), torch.bfloat16),
        "group 128, asym": (dict(group_size=128, symmetric=False), torch.bfloat16),
        "group 128, fp16 scales": (dict(group_size=128, scale_dtype=torch.float16), torch.float16),
        "group 128": (dict(group_size=128), torch.float32),
        "group 64": (dict(group_size=64), torch.bfloat16),
        "group 32, asym": (dict(group_size=32, symmetric=False), torch.bfloat16),
        "channel": (dict(group_size=None), torch.bfloat16),
        "tensor": (dict(group_size=None, per_tensor=True), torch.bfloat16),
        "g_idx (act order), group 128": (dict(group_size=128, activation_order=True), torch.bfloat16),
        "group 128, tight rows (byte loads)": (dict(group_size=128, word_padded=False), torch.bfloat16),
    }
    rows = []
    print(f"\nweight kinds on down_proj {out_features}x{in_features}, config {config_name(config)}")
    print("| weight | out dtype | fused us | fused GB/s | copy GB/s (same output) | % of copy |")
    print("|---|---|---:|---:|---:|---:|")
    for label, (kwargs, dtype) in cases.items():
        row = dict(weight=label, dtype=str(dtype).removeprefix("torch."))
        row.update(measure_variant(random_weight(out_features, in_features, **kwargs), dtype, config))
        rows.append(row)
        print(
            f"| {label} | {row['dtype']} | {row['fused_us']:.1f} | {row['fused_gbs']:.0f} | {row['copy_gbs']:.0f} "
            f"| {100 * row['fused_gbs'] / row['copy_gbs']:.1f}% |"
        )
    return rows


def measure_variant(weight: Int4Weight, dtype: torch.dtype, config: LaunchConfig) -> dict:
    """Steady-state fused time and copy bandwidth of the same output (the weight rotates with copies of itself)."""
    count = rotating_sets(bytes_moved(weight, dtype))
    weights = [weight] + [Int4Weight(**{**weight.__dict__, "packed": weight.packed.clone()}) for _ in range(count - 1)]
    outs = [torch.empty(weight.shape, dtype=dtype, device="cuda") for _ in weights]
    copy_sets = [(o, torch.empty_like(o).uniform_()) for o in outs]
    copy_us = steady_state_us(lambda dst, src: dst.copy_(src), copy_sets)
    fused_us = steady_state_us(lambda w, o: launch_dequant(w, dtype, o, config), list(zip(weights, outs)))
    return dict(
        fused_us=fused_us,
        fused_gbs=bytes_moved(weight, dtype) / fused_us / 1e3,
        copy_gbs=2 * outs[0].numel() * dtype.itemsize / copy_us / 1e3,
    )


def compiled_resources() -> list[str]:
    """Tile shape, output dtype, warps, registers per thread and spills of every compiled kernel variant (registers
    bound how many programs share a multiprocessor, hence whether a small weight fits in one wave)."""
    from int4lora_train.kernels.dequant import _dequant_kernel

    lines = []
    for caches in getattr(_dequant_kernel, "device_caches", {}).values():
        for kernel in caches[0].values():
            shapes = re.findall(r"tt.store .*?tensor<(\d+x\d+)x!tt.ptr<(\w+)>", kernel.asm.get("ttgir", ""))
            tile = "x".join(shapes[0]) if shapes else "?"
            lines.append(
                f"{tile}/w{kernel.metadata.num_warps}: {getattr(kernel, 'n_regs', '?')} registers, "
                f"{getattr(kernel, 'n_spills', '?')} spills, "
                f"{kernel.metadata.shared} B shared"
            )
    return sorted(set(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="bit-exactness against dequantize_torch on the GPU")
    parser.add_argument("--check-cases", type=int, default=120, help="random weights for --check")
    parser.add_argument("--sweep", action="store_true", help="time every tile shape / load mode")
    parser.add_argument("--variants", action="store_true", help="time other weight kinds on the down_proj shape")
    parser.add_argument("--no-table", action="store_true", help="skip the main table")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument(
        "--configs",
        default="",
        help="extra configs for the table besides the library's choice, comma-separated, e.g. 8x512x4,4x2048x8",
    )
    parser.add_argument("--json", help="write every measurement to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/dequant.py needs a CUDA GPU", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    print(
        f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}"
    )
    report: dict = {"device": props.name, "torch": torch.__version__, "triton": triton.__version__}
    if args.check:
        report["check_failures"] = check_bit_exact(args.check_cases)
    if args.sweep:
        report["sweep"] = sweep(args.group_size, torch.bfloat16)
    if args.variants:
        report["variants"] = variants(None)
    if not args.no_table:
        extra = [parse_config(text) for text in args.configs.split(",") if text]
        report["table"] = table(args.group_size, torch.bfloat16, [None, *extra])
    report["kernels"] = compiled_resources()
    print("\ncompiled variants: " + "; ".join(report["kernels"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 1 if report.get("check_failures") else 0


if __name__ == "__main__":
    sys.exit(main())
