"""One optimizer step of ``torch.optim.AdamW`` (state on the GPU) against ``HostAdamW`` (state and update on the host)
on the LoRA tensors of a Llama shape (r 16 on all seven projections), gradients given: what ``optimizer_on_cpu``
costs per step.

    python3 benchmarks/host_adamw.py                # the Llama-3-70B shape: 207.1M fp32 parameters in 1120 tensors
    python3 benchmarks/host_adamw.py --shape 8b
"""

from __future__ import annotations

import argparse
import time

import torch
from common import SHAPES

from int4lora_train.memory import HostAdamW


def lora_parameters(shape: str, rank: int, device: str) -> list[torch.nn.Parameter]:
    s = SHAPES[shape]
    layers, hidden, kv, inter = s["layers"], s["hidden"], s["kv_heads"] * s["hidden"] // s["heads"], s["intermediate"]
    projections = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inter), (hidden, inter)]
    projections.append((inter, hidden))
    params = []
    for _ in range(layers):
        for fan_in, fan_out in projections:
            params.append(torch.nn.Parameter(torch.randn(rank, fan_in, device=device) * 0.01))
            params.append(torch.nn.Parameter(torch.zeros(fan_out, rank, device=device)))
    for param in params:
        param.grad = torch.randn_like(param)
    return params


def seconds_per_step(optimizer: torch.optim.Optimizer, device: str, steps: int) -> float:
    optimizer.step()  # the state is created here
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="70b")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    params = lora_parameters(args.shape, args.rank, args.device)
    count = sum(p.numel() for p in params)
    print(
        f"{args.shape}: {count / 1e6:.1f}M LoRA parameters in {len(params)} tensors; {torch.get_num_threads()} threads"
    )
    for cls in (torch.optim.AdamW, HostAdamW):
        print(
            f"{cls.__name__}: {seconds_per_step(cls(params, lr=1e-4), args.device, args.steps):.3f} s/step", flush=True
        )


if __name__ == "__main__":
    main()
