"""Host (Python) time of one training step on the CPU, with tensors so small that the Python work dominates.

At batch size 1 the product's step is host-bound (on an H200 ~204 ms of kernels in a ~455 ms step): besides the
kernel launches (``benchmarks/op_count.py``), the Python that runs per decoder layer in the forward, the checkpoint
recompute and the backward costs host time. This script times that Python work without a GPU: the model and step are
``op_count.py``'s (:func:`op_count.build_train_step`: a tiny INT4 checkpoint loaded by the trainer, LoRA r 16 on all
linear projections, non-reentrant gradient checkpointing, the ``train.speed`` defaults, one
``Trainer._train_step`` on one packed row, bf16 autocast unless ``--fp32``), but hidden 64, seq 16: the fused LoRA
path and the projection groups run as they do at full size, and the aten kernels, which on the CPU also run on the
host, are cheap. It is a proxy for the GPU's host-bound regime, not a GPU measurement: on CUDA the kernels run on the
device, the launches cost more host time than these CPU calls, and the Triton dequantizer replays a prepared launch
where the CPU runs the torch reference.

Printed: the median of ``--repeats`` timings of ``--steps`` steps each (after ``--warmup`` steps), per step, and one
step under cProfile: the ``--top`` functions of ``int4lora_train`` by self time (``tottime``, in ms per step), then
the same for every function (torch's Python included).

::

    PYTHONPATH=. python benchmarks/host_time.py                 # llama, 4 layers, hidden 64, seq 16, bf16 autocast
    PYTHONPATH=. python benchmarks/host_time.py --layers 2 --fp32 --top 30

A function's self time includes the aten work it starts through operators (``x @ w``, ``y.addmm_``: cProfile sees
no call there), so the ``backward`` / ``forward`` of the autograd functions lead the table partly for their
matmuls; ``torch.Tensor.to`` and the like are listed as their own entries. The CPU's own dequantization
(``dequantize_torch``, ``unpack_nibbles``) is the torch reference, which CUDA replaces by one prepared Triton
launch. Timings on a shared 2-core machine move by +-10% from run to run: compare several alternating runs.

Example (2-core x86 CPU, ``--repeats 11 --top 8``), after keeping ``Int4Linear``'s weight spec between calls and
skipping no-op casts (wt-host 8381cfb)::

    host time per step: 18.6 ms (median of 11 x 20 steps)

    int4lora_train functions by self time, one profiled step (ms), the 8 largest:
     self ms   cum ms  calls  function
        0.97     1.73      8  projection_groups.py:117(backward)
        0.80     2.70     56  dequant.py:33(dequantize_torch)
        0.79    11.99      8  lora_layer.py:328(backward)
        0.63     4.79     16  projection_groups.py:87(forward)
        0.59     1.04     56  layout.py:60(unpack_nibbles)
        0.54     0.86     80  lora_layer.py:372(fused_lora_applies)
        0.47     2.68     16  lora_layer.py:309(forward)
        0.20     2.38     16  projection_groups.py:52(dense)
        7.80                  total self time of these functions (profiled)

    all functions by self time, one profiled step (ms), the 8 largest:
     self ms   cum ms  calls  function
        2.29    15.84      1  ~:0(<method 'run_backward' of 'torch._C._EngineBase' objects>)
        1.28     1.38   6742  .../torch/nn/modules/module.py:2836(named_modules)
        1.23     1.23     29  ~:0(<built-in method torch._C._nn.linear>)
        1.22     1.22    469  ~:0(<method 'to' of 'torch._C.TensorBase' objects>)
        ...

Before and after (02ad147 -> 8381cfb, alternating runs, ``--repeats 11``): 25.5 / 24.8 ms and 20.7 / 20.2 ms per
step, within the run-to-run noise; per step, ``weight_spec`` 0.23 -> 0.13 ms cumulative (profiled),
``fused_lora_applies`` 0.73 -> 0.64, ``ProjectionGroup._spec`` 0.40 -> 0.28, ``Tensor.to`` 501 -> 469 calls.
``named_modules`` (6742 calls) was per step, not per layer: ``model.train()`` and ``trainable_parameters()`` in
``Trainer._train_step`` walked every module each step (since then the trainer does neither per step; BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import torch
from op_count import build_train_step  # a sibling script: Python puts this folder on sys.path


def time_steps(step, steps: int, repeats: int) -> float:
    """The median over ``repeats`` of the seconds per step of ``steps`` consecutive steps."""
    per_step = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        per_step.append((time.perf_counter() - start) / steps)
    return statistics.median(per_step)


def profile_table(step, top: int, ours: bool) -> str:
    """One step under cProfile, the ``top`` functions by self time; with ``ours`` only ``int4lora_train``'s."""
    profiler = cProfile.Profile()
    profiler.enable()
    step()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, primitive, tottime, cumtime, callers)}
    rows = [
        (tottime, cumtime, calls, f"{Path(file).name}:{line}({name})" if ours else f"{file}:{line}({name})")
        for (file, line, name), (_, calls, tottime, cumtime, _) in stats.items()
        if not ours or "int4lora_train" in file
    ]
    rows.sort(reverse=True)
    lines = [f"{'self ms':>8s} {'cum ms':>8s} {'calls':>6s}  function"]
    for tottime, cumtime, calls, where in rows[:top]:
        lines.append(f"{tottime * 1e3:8.2f} {cumtime * 1e3:8.2f} {calls:6d}  {where}")
    total = sum(r[0] for r in rows)
    lines.append(f"{total * 1e3:8.2f} {'':8s} {'':6s}  total self time of these functions (profiled)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="llama", choices=("llama", "mistral", "qwen2", "qwen3"))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--fp32", action="store_true", help="no autocast (fp32 compute)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: threads add only synchronisation
    sizes = dict(num_hidden_layers=args.layers, hidden_size=args.hidden, intermediate_size=2 * args.hidden)
    with tempfile.TemporaryDirectory() as tmp:
        step, _ = build_train_step(Path(tmp), args.arch, args.fp32, args.seq, **sizes)
        for _ in range(args.warmup):
            step()
        seconds = time_steps(step, args.steps, args.repeats)
        print(f"host time per step: {seconds * 1e3:.1f} ms (median of {args.repeats} x {args.steps} steps)")
        print(f"\nint4lora_train functions by self time, one profiled step (ms), the {args.top} largest:")
        print(profile_table(step, args.top, ours=True))
        print(f"\nall functions by self time, one profiled step (ms), the {args.top} largest:")
        print(profile_table(step, args.top, ours=False))
    return seconds


if __name__ == "__main__":
    main()
