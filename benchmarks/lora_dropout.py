"""GPU micro-benchmark of LoRA dropout around the A projection: the fused kernels against today's torch path.

    PYTHONPATH=. python3 benchmarks/lora_dropout.py            # the table (Llama-3-8B-like shapes), well under 60 s
    PYTHONPATH=. python3 benchmarks/lora_dropout.py --sweep    # + the fused kernels' tile shapes and warps

For ``x`` ``[T, K]`` bf16 and ``members`` LoRA A matrices of rank ``r`` sharing it (1: one projection; 3: a q/k/v
group), one forward + backward of the dropout-and-A part of the fused LoRA nodes, three ways:

* torch: what the nodes run without fused dropout, per member: ``native_dropout`` (x -> dropped copy + bool mask),
  the matmul of the copy; backward ``native_dropout_backward`` twice (the dropped copy again for ``grad_A``, the
  masked ``gs @ A`` for ``grad_x``), the matmuls, and the add into ``grad_x``;
* fused: :func:`~int4lora_train.kernels.lora_dropout.dropout_lora_a` and ``dropout_lora_a_backward`` (masks from
  seeds, ``grad_x`` updated in place, ``grad_A`` partial sums added by torch);
* no dropout: the same products without dropout (the nodes' ``p = 0`` path): the floor either path could reach.

Times are medians of ``triton.testing.do_bench`` (it clears the L2 cache before every repetition), in ms. The base
layer's matmuls, which both paths share, are left out.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
import triton.testing

from int4lora_train.kernels import lora_dropout

T, RANK, P = 8192, 16, 0.05
WIDTHS = (4096, 14336)  # Llama-3-8B: hidden (q/k/v, gate/up inputs), intermediate (down input)
MEMBERS = (1, 3)


def torch_path(x2, a_list, gs_list, grad_x, p):
    scale = 1.0 / (1.0 - p)
    masks, parts = [], []
    for a in a_list:
        xd, mask = torch.native_dropout(x2, p, True)
        masks.append(mask)
        parts.append(xd @ a.t())
    xa = torch.cat(parts, dim=1)
    grads_a = []
    for gs, a, mask in zip(gs_list, a_list, masks):
        grad_x.add_(torch.ops.aten.native_dropout_backward(gs @ a, mask, scale))
        grads_a.append(gs.t() @ torch.ops.aten.native_dropout_backward(x2, mask, scale))
    return xa, grads_a


def fused_path(x2, a_cat, gs, grad_x, ranks, p):
    seeds = tuple(range(1, len(ranks) + 1))
    xa = lora_dropout.dropout_lora_a(x2, a_cat, ranks, seeds, p)
    grad_a = lora_dropout.dropout_lora_a_backward(x2, gs, a_cat, ranks, seeds, p, grad_x, True)
    return xa, grad_a


def no_dropout_path(x2, a_cat, gs, grad_x):
    xa = x2 @ a_cat.t()
    grad_x.addmm_(gs, a_cat)
    return xa, gs.t() @ x2


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def run_case(width: int, members: int, device: torch.device) -> dict[str, float]:
    gen = torch.Generator(device=device).manual_seed(0)
    x2 = torch.randn(T, width, device=device, dtype=torch.bfloat16, generator=gen)
    a_cat = (torch.randn(members * RANK, width, device=device, generator=gen) / width**0.5).bfloat16()
    gs = torch.randn(T, members * RANK, device=device, dtype=torch.bfloat16, generator=gen)
    grad_x = torch.zeros(T, width, device=device, dtype=torch.bfloat16)
    ranks = (RANK,) * members
    a_list, gs_list = list(a_cat.split(RANK)), [g.contiguous() for g in gs.split(RANK, dim=1)]
    return {
        "torch": bench(lambda: torch_path(x2, a_list, gs_list, grad_x, P)),
        "fused": bench(lambda: fused_path(x2, a_cat, gs, grad_x, ranks, P)),
        "no dropout": bench(lambda: no_dropout_path(x2, a_cat, gs, grad_x)),
    }


def table(device: torch.device) -> None:
    print(f"T={T}, r={RANK}, p={P}, bf16; forward + backward of dropout and the A projection, ms (median)")
    print(f"{'K':>6} {'members':>7} {'torch':>8} {'fused':>8} {'no dropout':>10} {'torch/fused':>11}")
    for width, members in itertools.product(WIDTHS, MEMBERS):
        t = run_case(width, members, device)
        print(
            f"{width:>6} {members:>7} {t['torch']:>8.3f} {t['fused']:>8.3f} {t['no dropout']:>10.3f} "
            f"{t['torch'] / t['fused']:>11.2f}"
        )


def sweep(device: torch.device) -> None:
    print("fused kernels by tile (BLOCK_T x BLOCK_K) and warps, ms (median); the default first")
    default = (lora_dropout.BLOCK_T, lora_dropout.BLOCK_K, lora_dropout.NUM_WARPS)
    configs = [default] + [c for c in itertools.product((64,), (32, 64), (4, 8)) if c != default]
    print(
        f"{'tile':>8} {'warps':>5} " + " ".join(f"{f'K={w},n={m}':>14}" for w, m in itertools.product(WIDTHS, MEMBERS))
    )
    try:
        for block_t, block_k, warps in configs:
            lora_dropout.BLOCK_T, lora_dropout.BLOCK_K, lora_dropout.NUM_WARPS = block_t, block_k, warps
            times = [run_case(w, m, device)["fused"] for w, m in itertools.product(WIDTHS, MEMBERS)]
            print(f"{f'{block_t}x{block_k}':>8} {warps:>5} " + " ".join(f"{t:>14.3f}" for t in times))
    finally:
        lora_dropout.BLOCK_T, lora_dropout.BLOCK_K, lora_dropout.NUM_WARPS = default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time the fused kernels' tile shapes and warps")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    device = torch.device("cuda")
    start = time.perf_counter()
    print(torch.cuda.get_device_name(device))
    table(device)
    if args.sweep:
        sweep(device)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
