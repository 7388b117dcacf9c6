"""Aten operations per decoder layer in one training step, on the CPU: the proxy for CUDA kernel launches.

At batch size 1 the product's step is host-bound (on an H200 ~204 ms of kernels in a ~455 ms step, ~300 launches
per decoder layer), so every operation removed from the per-layer path saves host time. On CUDA nearly every aten
operation that is not a view is one kernel launch; this script counts them without a GPU.

The model is what the trainer trains, built by the trainer's own functions: a tiny INT4 checkpoint written by the
toolkit's packer (:func:`int4lora_train.modeling.tiny_models.build_tiny_model`, ``save_int4_checkpoint``), loaded
with ``train.job.load_model``, LoRA from ``train.job.apply_lora`` (r 16, alpha 32, all linear projections, fp32
adapters), ``prepare_for_training`` with non-reentrant gradient checkpointing as ``Trainer.fit`` calls it, and the
``train.speed`` defaults through ``Trainer._apply_speed_options``, the rest of ``Trainer.fit``'s set-up (memory
options, optimizer, accelerate's ``prepare`` with ``train.mixed_precision: bf16``, ``--fp32``: ``no``). Counted:
one ``Trainer._train_step`` on one packed row (three segments), forward, backward and optimizer step.

A :class:`~torch.utils._python_dispatch.TorchDispatchMode` counts every aten operation, attributed to the decoder
layer running it (forward pre-hooks; in backward, a layer's operations run from its recompute until the gradient of
its input is complete) and to a phase: ``forward``, ``recompute`` (a checkpoint re-running the layer inside
backward) or ``backward``. An INT4 dequantization counts as one operation, ``int4lora::dequantize``:
on CUDA it is one Triton launch (the CPU reference takes a dozen). ``launches`` leaves out views and ``detach``
(metadata only, no kernel, though still host work); ``all`` counts them too.

::

    PYTHONPATH=. python benchmarks/op_count.py              # tiny Llama (2 layers, seq 96 in 3 segments), bf16
    PYTHONPATH=. python benchmarks/op_count.py --arch qwen3 --top 40

(``PYTHONPATH=.``: the package of this checkout, not whichever one the environment installed.)

Example, ``--top 12``, before (main at a507534) and after reusing the adapters' bf16 copies within a step
(``lora_layer.reuse_adapter_weights``); per decoder layer, forward / recompute / backward / total::

    before                                  forward  recompute  backward  total
    aten._to_copy.default                        18         18        22     58
    aten.mul.Tensor                              14         14        16     44
    aten.mm.default                               8          7        16     31
    aten.add.Tensor                               6          5         8     19
    int4lora::dequantize                          7          7         0     14
    aten.addmm_.default                           4          3         4     11
    aten.cat.default                              4          4         2     10
    aten.mul_.Tensor                              0          0         9      9
    aten.block_diag.default                       2          2         0      4
    layer 1 launches                             80         78       102    260
    layer 1 all (views too)                     134        153       189    476

    after
    aten._to_copy.default                        18          4        18     40
    aten.mul.Tensor                              14          9        16     39
    aten.cat.default                              4          2         2      8
    aten.block_diag.default                       2          0         0      2
    layer 1 launches                             80         55        98    233
    layer 1 all (views too)                     134        130       185    449
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from int4lora_train.modeling import int4_linear
from int4lora_train.modeling.tiny_models import BYTE_VOCAB, build_tiny_model, build_tokenizer
from int4lora_train.quant.packer import save_int4_checkpoint
from int4lora_train.train.config import config_from_dict
from int4lora_train.train.data import Sample
from int4lora_train.train.job import apply_lora, load_model
from int4lora_train.train.module import LoraModule
from int4lora_train.train.trainer import Trainer

PHASES = ("forward", "recompute", "backward")
DEQUANTIZE = "int4lora::dequantize"
METADATA_OPS = {"aten.detach.default", "aten.lift_fresh.default", "aten._unsafe_view.default"}


def current_phase() -> str:
    """``forward``, ``recompute`` (a non-reentrant checkpoint re-running its function inside backward: its
    recomputation saved-tensor hooks are installed) or ``backward``."""
    if torch._C._current_graph_task_id() == -1:
        return "forward"
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    recompute = hooks and getattr(hooks[0], "__qualname__", "").startswith("_recomputation_hook.")
    return "recompute" if recompute else "backward"


class OpCounter(TorchDispatchMode):
    """Counts aten operations by ``(layer, phase, op)``; ``layer`` is None outside the decoder layers."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.views: set[str] = set()
        self.layer: int | None = None
        self.paused = 0

    def record(self, name: str) -> None:
        self.counts[(self.layer, current_phase(), name)] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            name = str(func)
            if func.is_view or name in METADATA_OPS:
                self.views.add(name)
            self.record(name)
        return func(*args, **(kwargs or {}))

    def track_layers(self, layers) -> list:
        """Attribute operations to ``layers`` (the decoder layers); returns the hook handles."""
        handles = []
        for index, layer in enumerate(layers):

            def enter(module, args, kwargs, index=index):
                self.layer = index
                hidden = args[0] if args else kwargs.get("hidden_states")
                if torch._C._current_graph_task_id() == -1 and hidden is not None and hidden.requires_grad:
                    hidden.register_hook(self._leave)  # the layer's backward ends with its input's gradient

            def enter_child(*_, index=index):
                self.layer = index

            handles.append(layer.register_forward_pre_hook(enter, with_kwargs=True))
            handles.append(layer.register_forward_hook(lambda *_: self._leave()))
            # transformers checkpoints the layer's forward, not its __call__: its recompute runs only the children's
            handles += [child.register_forward_pre_hook(enter_child) for child in layer.modules() if child is not layer]
        return handles

    def _leave(self, *_) -> None:
        self.layer = None

    @contextlib.contextmanager
    def dequantize_as_one_op(self):
        """Count each dense-weight dequantization as one operation (one Triton launch on CUDA)."""
        original = int4_linear._WeightSpec.dense

        def dense(spec, *args, **kwargs):
            self.record(DEQUANTIZE)
            self.paused += 1
            try:
                return original(spec, *args, **kwargs)
            finally:
                self.paused -= 1

        int4_linear._WeightSpec.dense = dense
        try:
            yield
        finally:
            int4_linear._WeightSpec.dense = original

    def table(self, layer: int | None, views: bool) -> dict[str, collections.Counter]:
        """``{op: Counter(phase -> count)}`` for ``layer``, without views unless ``views``."""
        rows: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for (where, phase, name), n in self.counts.items():
            if where == layer and (views or name not in self.views):
                rows[name][phase] += n
        return rows


def build_train_step(work: Path, arch: str, fp32: bool, seq: int, **sizes) -> tuple[Callable[[], Any], nn.ModuleList]:
    """``(step, layers)``: the trainer's model (see the module docstring) set up as ``Trainer.fit`` sets it up,
    ``step()``, ``Trainer._train_step`` on one packed row of ``seq`` tokens, and the model's decoder layers."""
    checkpoint = save_int4_checkpoint(
        build_tiny_model(arch, seed=0, dtype=torch.bfloat16, **sizes),
        work / "model",
        group_size=32,
        tokenizer=build_tokenizer(),
    )
    config = config_from_dict(
        {
            "model": {"path": str(checkpoint), "dtype": "bfloat16", "device": "cpu"},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
            "train": {"mixed_precision": "no" if fp32 else "bf16", "gradient_checkpointing": True},
        }
    )
    trainer = Trainer(config.train, work / "run", device="cpu", tensorboard=False, progress_bar=False)
    module = LoraModule(apply_lora(load_model(config, trainer.device), config), config.train)
    rows = [packed_row(seq, segments=3, vocab=BYTE_VOCAB)]
    trainer.pad_token_id = 0
    optimizer, scheduler = trainer.prepare_model(module, rows, max_steps=1)  # what Trainer.fit does before step 1
    plan = trainer.plan_for(len(rows))

    def step():
        return trainer._train_step(module, optimizer, scheduler, plan, rows, 0, None)

    return step, module.unwrapped_model.get_base_model().model.layers


def build_step(work: Path, arch: str, fp32: bool, seq: int, **sizes) -> tuple[OpCounter, Callable[[], Any], int]:
    """``(counter, step, layers)``: :func:`build_train_step`'s step, counted by ``counter``."""
    train_step, layers = build_train_step(work, arch, fp32, seq, **sizes)
    counter = OpCounter()

    def step():
        handles = counter.track_layers(layers)
        try:
            with counter, counter.dequantize_as_one_op():
                return train_step()
        finally:
            for handle in handles:
                handle.remove()

    return counter, step, len(layers)


def packed_row(seq: int, segments: int, vocab: int) -> Sample:
    """One row of ``segments`` samples (positions restart at each), every token a target."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (seq,), generator=generator, dtype=torch.int32)
    length = -(-seq // segments)
    positions = torch.cat([torch.arange(min(length, seq - s)) for s in range(0, seq, length)]).int()
    return Sample(ids, ids.clone(), positions)


def per_layer_totals(counter: OpCounter, layer: int, views: bool) -> dict[str, int]:
    """``{phase: ops, "total": ops}`` of one decoder layer."""
    rows = counter.table(layer, views)
    totals = {phase: sum(c[phase] for c in rows.values()) for phase in PHASES}
    totals["total"] = sum(totals.values())
    return totals


def report(counter: OpCounter, num_layers: int, top: int) -> str:
    layer = num_layers - 1  # every decoder layer runs the same operations; the last one stands for them
    lines = [f"decoder layer {layer}, launches (no views), the {top} most frequent:"]
    lines.append(f"{'op':48s} {'forward':>8s} {'recompute':>10s} {'backward':>9s} {'total':>6s}")
    rows = counter.table(layer, views=False)
    for name, c in sorted(rows.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))[:top]:
        lines.append(f"{name:48s} {c['forward']:8d} {c['recompute']:10d} {c['backward']:9d} {sum(c.values()):6d}")
    lines.append("")
    lines.append(f"{'per layer':16s} {'forward':>8s} {'recompute':>10s} {'backward':>9s} {'total':>6s}")
    for index in range(num_layers):
        for views in (False, True):
            t = per_layer_totals(counter, index, views)
            label = f"layer {index} {'all' if views else 'launches'}"
            lines.append(f"{label:16s} {t['forward']:8d} {t['recompute']:10d} {t['backward']:9d} {t['total']:6d}")
    outside = sum(n for (where, _, _), n in counter.counts.items() if where is None)
    lines.append(f"outside the decoder layers (embedding, head, loss; all ops): {outside}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="llama", choices=("llama", "mistral", "qwen2", "qwen3"))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=96)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--fp32", action="store_true", help="no autocast (fp32 compute)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        counter, step, _ = build_step(Path(tmp), args.arch, args.fp32, args.seq, num_hidden_layers=args.layers)
        step()
    print(report(counter, args.layers, args.top))
    return {index: per_layer_totals(counter, index, views=False) for index in range(args.layers)}


if __name__ == "__main__":
    main()
