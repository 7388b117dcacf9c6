"""GPU benchmark of the LoRA dropout in the fused nodes: the torch ops against the one-pass Triton kernels of
:mod:`int4lora_train.kernels.lora_dropout` (``train.speed.fused_dropout_backward`` and ``fused_dropout_forward``).

::

    PYTHONPATH=. python3 benchmarks/lora_dropout_kernels.py                 # the table (bf16, r 16)
    PYTHONPATH=. python3 benchmarks/lora_dropout_kernels.py --sweep         # + block shapes / programs per launch
    PYTHONPATH=. python3 benchmarks/lora_dropout_kernels.py --sweep forward --tokens 8192   # one kernel's sweep
    PYTHONPATH=. python3 benchmarks/lora_dropout_kernels.py --json out.json

Per shape (tokens T, input width ``in``, members n of rank r; one bool keep mask per member, p = 0.05):

* ``grad_x``: torch ``grad_x.add_(dropped(gs_i @ A_i, mask_i))`` per member (add_dropped_lora_grad_x_torch) vs
  :func:`~int4lora_train.kernels.lora_dropout.add_dropped_lora_grad_x` (in place on a copy of the same grad_x);
* ``grad_A``: torch ``gs_i.T @ dropped(x, mask_i)`` per member then ``.float()`` (the adapters' dtype) vs
  :func:`~int4lora_train.kernels.lora_dropout.dropped_lora_grad_a` (fp32 already);
* ``forward``: torch ``native_dropout`` per member and ``xd @ A_i.T`` (``dropped_projection`` without the kernel) vs
  :func:`~int4lora_train.kernels.lora_dropout.dropped_lora_projection` (masks drawn inside, x read once).

Times are medians of ``triton.testing.do_bench`` (ms; it clears the L2 before each repetition). ``GB/s`` counts the
fused kernel's own bytes (grad_x: read grad_x, n masks, write grad_x; grad_A: read x and n masks; forward: read x,
write n masks). ``err`` is the
largest difference of each path from a float64 computation of the same math, relative to its largest value (the
kernels round once, the torch ops at every step).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

import torch
import triton.testing

from int4lora_train.kernels import lora_dropout
from int4lora_train.modeling.lora_layer import (
    add_dropped_lora_grad_x_torch,
    dropped_lora_grad_a_torch,
    dropped_projection,
)

P = 0.05
DEVICE = "cuda"


def make_case(tokens: int, width: int, members: int, rank: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    total = members * rank
    grad_x = torch.randn(tokens, width, device=DEVICE, generator=gen).to(dtype)
    gs = (torch.randn(tokens, total, device=DEVICE, generator=gen) / 4).to(dtype)
    a_cat = (torch.randn(total, width, device=DEVICE, generator=gen) / 16).to(dtype)
    x2 = torch.randn(tokens, width, device=DEVICE, generator=gen).to(dtype)
    masks = [torch.rand(tokens, width, device=DEVICE, generator=gen) >= P for _ in range(members)]
    return grad_x, gs, a_cat, x2, masks, [rank] * members


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def errors(grad_x, gs, a_cat, x2, masks, ranks, scale) -> dict:
    """Largest |path - float64| / largest |float64|, per path and output."""
    ref_x = grad_x.double().clone()
    ref_a = []
    for gs_i, a_i, mask in zip(gs.double().split(ranks, 1), a_cat.double().split(ranks), masks):
        ref_x += (gs_i @ a_i) * mask * scale
        ref_a.append(gs_i.t() @ (x2.double() * mask * scale))

    def rel(outs, refs):
        return max(((o.double() - r).abs().max() / r.abs().max()).item() for o, r in zip(outs, refs))

    torch_x = add_dropped_lora_grad_x_torch(grad_x.clone(), gs, a_cat, masks, ranks, scale)
    fused_x = lora_dropout.add_dropped_lora_grad_x(grad_x.clone(), gs, a_cat, masks, ranks, scale)
    torch_a = dropped_lora_grad_a_torch(x2, gs, masks, ranks, scale)
    fused_a = lora_dropout.dropped_lora_grad_a(x2, gs, masks, ranks, scale)
    return {
        "err_x_torch": rel([torch_x], [ref_x]),
        "err_x_fused": rel([fused_x], [ref_x]),
        "err_a_torch": rel(torch_a, ref_a),
        "err_a_fused": rel(fused_a, ref_a),
    }


def measure(tokens: int, width: int, members: int, rank: int, dtype: torch.dtype, check: bool = True) -> dict:
    grad_x, gs, a_cat, x2, masks, ranks = make_case(tokens, width, members, rank, dtype)
    scale = 1.0 / (1.0 - P)
    work = grad_x.clone()
    row = {"tokens": tokens, "in": width, "members": members, "r": rank}
    row["x_torch_ms"] = median_ms(lambda: add_dropped_lora_grad_x_torch(work, gs, a_cat, masks, ranks, scale))
    row["x_fused_ms"] = median_ms(lambda: lora_dropout.add_dropped_lora_grad_x(work, gs, a_cat, masks, ranks, scale))
    row["a_torch_ms"] = median_ms(lambda: [g.float() for g in dropped_lora_grad_a_torch(x2, gs, masks, ranks, scale)])
    row["a_fused_ms"] = median_ms(lambda: lora_dropout.dropped_lora_grad_a(x2, gs, masks, ranks, scale))
    row["f_torch_ms"] = median_ms(lambda: dropped_projection(x2, a_cat, ranks, P, fused=False))
    row["f_fused_ms"] = median_ms(lambda: lora_dropout.dropped_lora_projection(x2, a_cat, ranks, P))
    elem = tokens * width
    size = grad_x.element_size()
    row["x_fused_GBs"] = elem * (2 * size + members) / row["x_fused_ms"] / 1e6
    row["a_fused_GBs"] = elem * (size + members) / row["a_fused_ms"] / 1e6
    row["f_fused_GBs"] = elem * (size + members) / row["f_fused_ms"] / 1e6
    row["slices"] = lora_dropout.token_slices(tokens, width)
    if check:
        row.update(errors(grad_x, gs, a_cat, x2, masks, ranks, scale))
    return row


def print_rows(rows: list[dict]) -> None:
    head = (
        f"{'T':>6} {'in':>6} {'n':>2} | {'grad_x torch':>12} {'fused':>8} {'x':>5} {'GB/s':>6} | "
        f"{'grad_A torch':>12} {'fused':>8} {'x':>5} {'GB/s':>6} | {'both x':>6} | "
        f"{'fwd torch':>9} {'fused':>8} {'x':>5} {'GB/s':>6} | errors x t/f, A t/f"
    )
    print(head)
    for r in rows:
        both = (r["x_torch_ms"] + r["a_torch_ms"]) / (r["x_fused_ms"] + r["a_fused_ms"])
        errs = ""
        if "err_x_torch" in r:
            errs = f"{r['err_x_torch']:.1e}/{r['err_x_fused']:.1e}, {r['err_a_torch']:.1e}/{r['err_a_fused']:.1e}"
        print(
            f"{r['tokens']:>6} {r['in']:>6} {r['members']:>2} | {r['x_torch_ms']:>12.3f} {r['x_fused_ms']:>8.3f} "
            f"{r['x_torch_ms'] / r['x_fused_ms']:>5.2f} {r['x_fused_GBs']:>6.0f} | {r['a_torch_ms']:>12.3f} "
            f"{r['a_fused_ms']:>8.3f} {r['a_torch_ms'] / r['a_fused_ms']:>5.2f} {r['a_fused_GBs']:>6.0f} | "
            f"{both:>6.2f} | {r['f_torch_ms']:>9.3f} {r['f_fused_ms']:>8.3f} "
            f"{r['f_torch_ms'] / r['f_fused_ms']:>5.2f} {r['f_fused_GBs']:>6.0f} | {errs}"
        )


SWEPT = ("forward", "grad_x", "grad_a")


def sweep(tokens: int, width: int, members: int, rank: int, dtype: torch.dtype, kernels: list[str]) -> list[dict]:
    """Fused times of ``kernels`` (forward, grad_x, grad_a) over block shapes, warps, pipelining stages and programs
    per launch (module constants, set and restored)."""
    grad_x, gs, a_cat, x2, masks, ranks = make_case(tokens, width, members, rank, dtype)
    scale = 1.0 / (1.0 - P)
    saved = (lora_dropout.GRAD_X_BLOCK, lora_dropout.GRAD_A_BLOCK, lora_dropout.TARGET_PROGRAMS)
    saved_project = (lora_dropout.PROJECT_BLOCK, lora_dropout.PROJECT_WARPS, lora_dropout.PROJECT_STAGES)
    forward = itertools.product([(16, 64), (16, 128), (32, 64), (32, 128)], [4, 8], [1, 2])
    grad_x_blocks = [(32, 128), (64, 64), (64, 128), (128, 64), (64, 256), (128, 128)]
    grad_a = itertools.product([(32, 64), (64, 64), (64, 128), (128, 64)], [132, 264, 528, 1056])
    results = []
    try:
        for block, warps, stages in forward if "forward" in kernels else []:
            lora_dropout.PROJECT_BLOCK, lora_dropout.PROJECT_WARPS, lora_dropout.PROJECT_STAGES = block, warps, stages
            ms = median_ms(lambda: lora_dropout.dropped_lora_projection(x2, a_cat, ranks, P))
            results.append({"kernel": "forward", "block": block, "warps": warps, "stages": stages, "ms": ms})
        for block in grad_x_blocks if "grad_x" in kernels else []:
            lora_dropout.GRAD_X_BLOCK = block
            ms = median_ms(lambda: lora_dropout.add_dropped_lora_grad_x(grad_x, gs, a_cat, masks, ranks, scale))
            results.append({"kernel": "grad_x", "block": block, "ms": ms})
        lora_dropout.GRAD_X_BLOCK = saved[0]
        for block, target in grad_a if "grad_a" in kernels else []:
            lora_dropout.GRAD_A_BLOCK, lora_dropout.TARGET_PROGRAMS = block, target
            ms = median_ms(lambda: lora_dropout.dropped_lora_grad_a(x2, gs, masks, ranks, scale))
            results.append({"kernel": "grad_a", "block": block, "target_programs": target, "ms": ms})
    finally:
        lora_dropout.GRAD_X_BLOCK, lora_dropout.GRAD_A_BLOCK, lora_dropout.TARGET_PROGRAMS = saved
        lora_dropout.PROJECT_BLOCK, lora_dropout.PROJECT_WARPS, lora_dropout.PROJECT_STAGES = saved_project
    for kernel in kernels:
        mine = [r for r in results if r["kernel"] == kernel]
        best = min(mine, key=lambda r: r["ms"])
        middle = statistics.median(r["ms"] for r in mine)
        print(f"  {tokens} x {width}, n {members}, {kernel}: best {best}; median of all {middle:.3f} ms")
        for r in mine:
            print(f"    {r}")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--widths", type=int, nargs="+", default=[4096, 14336])
    parser.add_argument("--members", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 error columns")
    parser.add_argument(
        "--sweep",
        nargs="*",
        choices=SWEPT,
        help="also sweep these kernels' launch constants at each shape (all three when none is named)",
    )
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, r {args.rank}, p {P}; median ms (do_bench)")
    rows, sweeps = [], []
    for tokens, width, members in itertools.product(args.tokens, args.widths, args.members):
        rows.append(measure(tokens, width, members, args.rank, dtype, check=not args.no_check))
        torch.cuda.empty_cache()
    print_rows(rows)
    if args.sweep is not None:
        for tokens, width, members in itertools.product(args.tokens, args.widths, args.members):
            sweeps.extend(sweep(tokens, width, members, args.rank, dtype, args.sweep or list(SWEPT)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "sweep": sweeps}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
