"""GPU benchmark of the fused INT4 dequantization kernel against a device-to-device copy and the prototype.

    PYTHONPATH=. python benchmarks/dequant.py                   # the table (Llama-3-8B projection shapes)
    PYTHONPATH=. python benchmarks/dequant.py --check --sweep   # + bit-exactness on the GPU, + tile-shape sweep

Bandwidth counts bytes read plus bytes written, for every row of the table:

* copy: ``dst.copy_(src)`` of a bf16 ``[out, in]`` tensor: reads and writes ``out * in * 2`` bytes each;
* fused kernel: reads the packed bytes, the scales (and zero points), writes the ``[out, in]`` output;
* prototype: the same useful bytes as the fused kernel (its extra traffic is its own cost).

Times are medians of ``triton.testing.do_bench`` (warm-up first; the L2 cache is flushed before every repetition,
so a weight that fits in L2 is not timed from it). The prototype is the algorithm of the unmerged vLLM
``INT4Unpacker`` (../shared/PEFT_VLLM.md section 2.4), re-implemented in :func:`prototype_dequant`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys

import torch
import triton
import triton.testing

from int4lora_train.quant.dequant import dequantize_torch
from int4lora_train.quant.layout import Int4Weight
from int4lora_train.quant.triton_dequant import DEFAULT_CONFIG, LaunchConfig, launch_dequant

LLAMA3_8B_SHAPES = {  # (out, in) of the projections; q/k/v and gate/up are fused as vLLM serves them
    "qkv_proj": (6144, 4096),
    "o_proj": (4096, 4096),
    "gate_up_proj": (28672, 4096),
    "down_proj": (4096, 14336),
}

SWEEP_BLOCKS = [  # (block_n, block_k, num_warps)
    (8, 128, 4),
    (16, 128, 4),
    (32, 128, 4),
    (32, 128, 8),
    (64, 128, 8),
    (8, 256, 4),
    (16, 256, 4),
    (16, 256, 8),
    (32, 256, 8),
    (64, 256, 8),
    (4, 512, 4),
    (8, 512, 4),
    (16, 512, 8),
    (4, 1024, 4),
    (8, 1024, 8),
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
        weight = weight - zp.to(dtype)
    expanded_scales = scales.unsqueeze(2).repeat(1, 1, group_size).view(out_features, -1)
    return weight * expanded_scales.to(dtype)


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=250, return_mode="median")


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
    configs = [DEFAULT_CONFIG] + [LaunchConfig(*b) for b in SWEEP_BLOCKS[:6]] + [LaunchConfig(16, 256, 4, False)]
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
    """Median time (us) of every tile shape / load mode on every shape."""
    configs = [LaunchConfig(bn, bk, w, words) for (bn, bk, w), words in itertools.product(SWEEP_BLOCKS, (True, False))]
    configs += [LaunchConfig(16, 128, 4, True, True), LaunchConfig(16, 256, 4, True, True)]
    results: dict[str, dict[str, float]] = {}
    for name, (out_features, in_features) in LLAMA3_8B_SHAPES.items():
        weight = random_weight(out_features, in_features, group_size)
        out = torch.empty(weight.shape, dtype=dtype, device="cuda")
        for config in configs:
            us = 1e3 * median_ms(lambda c=config, w=weight, o=out: launch_dequant(w, dtype, o, c))
            results.setdefault(config_name(config), {})[name] = us
    names = list(LLAMA3_8B_SHAPES)
    print(f"\nsweep: median us per shape (bf16 out, group {group_size}); total = sum over the four shapes")
    print(f"{'config':<28}" + "".join(f"{n:>14}" for n in names) + f"{'total':>10}")
    for config, row in sorted(results.items(), key=lambda item: sum(item[1].values())):
        print(f"{config:<28}" + "".join(f"{row[n]:>14.1f}" for n in names) + f"{sum(row.values()):>10.1f}")
    return results


def config_name(config: LaunchConfig) -> str:
    name = f"{config.block_n}x{config.block_k}/w{config.num_warps}/{'words' if config.word_loads else 'bytes'}"
    return name + ("/intround" if config.integer_rounding else "")


def measure_shape(out_features: int, in_features: int, group_size: int, dtype: torch.dtype, config: LaunchConfig):
    """One row of the table: copy, fused kernel (twice, and with its own allocation) and prototype, one shape."""
    weight = random_weight(out_features, in_features, group_size)
    out = torch.empty(weight.shape, dtype=dtype, device="cuda")
    src = torch.randn(weight.shape, device="cuda").to(dtype)
    out_bytes = out.numel() * dtype.itemsize

    def run_fused(buffer=out):
        return launch_dequant(weight, dtype, buffer, config)

    def run_prototype():
        return prototype_dequant(weight.packed[:, : -(-in_features // 2)], weight.scales, None, group_size, dtype)

    copy_us = 1e3 * median_ms(lambda: out.copy_(src))
    fused_us = 1e3 * median_ms(run_fused)
    fused_again_us = 1e3 * median_ms(run_fused)
    alloc_us = 1e3 * median_ms(lambda: run_fused(None))
    prototype_us = 1e3 * median_ms(run_prototype)
    moved = bytes_moved(weight, dtype)
    copy_gbs = 2 * out_bytes / copy_us / 1e3
    fused_gbs = moved / fused_us / 1e3
    return dict(
        out=out_features,
        inp=in_features,
        bytes_moved=moved,
        copy_us=copy_us,
        copy_gbs=copy_gbs,
        fused_us=fused_us,
        fused_again_us=fused_again_us,
        fused_alloc_us=alloc_us,
        fused_gbs=fused_gbs,
        pct_of_copy=100 * fused_gbs / copy_gbs,
        prototype_us=prototype_us,
        prototype_gbs=moved / prototype_us / 1e3,
        speedup=prototype_us / fused_us,
        prototype_peak_x_out=peak_bytes(run_prototype) / out_bytes,
        fused_peak_x_out=peak_bytes(lambda: run_fused(None)) / out_bytes,
        prototype_bit_exact=torch.equal(bits(run_prototype()), bits(dequantize_torch(weight, dtype))),
    )


def table(group_size: int, dtype: torch.dtype, config: LaunchConfig) -> list[dict]:
    rows = []
    for name, (out_features, in_features) in LLAMA3_8B_SHAPES.items():
        rows.append(dict(shape=name, **measure_shape(out_features, in_features, group_size, dtype, config)))
        torch.cuda.empty_cache()
    print(f"\nconfig {config_name(config)}; group {group_size}; {dtype} out; symmetric bf16 scales")
    print(
        "| shape (out x in) | copy us | copy GB/s | fused us | fused GB/s | % of copy | prototype us | speedup "
        "| prototype peak / out |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['shape']} {r['out']}x{r['inp']} | {r['copy_us']:.1f} | {r['copy_gbs']:.0f} | {r['fused_us']:.1f} "
            f"| {r['fused_gbs']:.0f} | {r['pct_of_copy']:.1f}% | {r['prototype_us']:.1f} | {r['speedup']:.1f}x "
            f"| {r['prototype_peak_x_out']:.2f}x |"
        )
    for label, key in [
        ("repeat of the fused timing (us)", "fused_again_us"),
        ("fused with its own output allocation (us)", "fused_alloc_us"),
        ("fused peak / out", "fused_peak_x_out"),
        ("prototype bit-exact", "prototype_bit_exact"),
    ]:
        print(f"{label}: " + ", ".join(f"{r[key]:.2f}" if isinstance(r[key], float) else str(r[key]) for r in rows))
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
    out = torch.empty(weight.shape, dtype=dtype, device="cuda")
    src = torch.empty_like(out).uniform_()
    copy_gbs = 2 * out.numel() * dtype.itemsize / median_ms(lambda: out.copy_(src)) / 1e6
    fused_us = 1e3 * median_ms(lambda: launch_dequant(weight, dtype, out, config))
    return dict(fused_us=fused_us, fused_gbs=bytes_moved(weight, dtype) / fused_us / 1e3, copy_gbs=copy_gbs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="bit-exactness against dequantize_torch on the GPU")
    parser.add_argument("--check-cases", type=int, default=120, help="random weights for --check")
    parser.add_argument("--sweep", action="store_true", help="time every tile shape / load mode")
    parser.add_argument("--variants", action="store_true", help="time other weight kinds on the down_proj shape")
    parser.add_argument("--group-size", type=int, default=128)
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
        report["variants"] = variants(DEFAULT_CONFIG)
    report["table"] = table(args.group_size, torch.bfloat16, DEFAULT_CONFIG)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 1 if report.get("check_failures") else 0


if __name__ == "__main__":
    sys.exit(main())
