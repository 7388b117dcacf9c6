"""``int4lora-train train`` with a recorder of what each FSDP unit's forward reads; launched by the repeat test of
``test_train_fsdp.py`` (issue 12) on every process.

Every training forward of an FSDP unit copies the gathered (unsharded) tensors it is about to read, on the compute
stream, right after FSDP's pre-forward hook has gathered and waited for them; every step copies each process's own
shards before it starts. Neither synchronises the host, so the timing the defect depends on stays as it is. After
the run the shards are gathered and each copy is compared with the whole tensor it should have been: the process
writes ``rank-R.json`` into ``$INT4LORA_FSDP_RECORD`` with every mismatch (step, micro-batch, tensor, the rows that
differ), so a failing run names the unit, the tensor and which process's half arrived wrong.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from int4lora_train.cli import main
from int4lora_train.train import trainer as trainer_module

OUT = Path(os.environ["INT4LORA_FSDP_RECORD"])
seen: list[tuple[int, int, int, torch.Tensor]] = []  # (step, micro-batch, parameter index, the gathered copy)
shards: dict[int, list[torch.Tensor]] = {}  # step -> this process's shard of each parameter at the step's start
where = {"step": 0, "micro": -1}


def _fsdp_params(model: torch.nn.Module) -> list[tuple[torch.nn.Module, object]]:
    """``(unit module, FSDPParam)`` for every parameter FSDP manages (private FSDP2 attributes: a test tool)."""
    found = []
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        group = get_state()._fsdp_param_group if get_state is not None else None
        if group is not None:
            found += [(module, fsdp_param) for fsdp_param in group.fsdp_params]
    return found


def _install(model: torch.nn.Module) -> list:
    params = _fsdp_params(model)
    by_unit: dict[int, list] = {}
    for index, (unit, fsdp_param) in enumerate(params):  # FSDP names its parameters only at the first forward
        by_unit.setdefault(id(unit), [unit]).append((index, fsdp_param))

    def recorder(fsdp_params):
        def hook(module, args, kwargs=None):  # runs after FSDP's own pre-forward hook (registered first, prepended)
            if torch.is_grad_enabled() and module.training:
                for index, fsdp_param in fsdp_params:
                    copy = fsdp_param.unsharded_param.detach().clone()
                    seen.append((where["step"], where["micro"], index, copy))

        return hook

    for unit, *fsdp_params in by_unit.values():
        unit.register_forward_pre_hook(recorder(fsdp_params))
    return [fsdp_param for _, fsdp_param in params]


def _run() -> int:
    fsdp_params: list = []
    original_fit, original_step = trainer_module.Trainer.fit, trainer_module.Trainer._train_step

    def fit(self, module, *args, **kwargs):
        strategy_prepare = self.strategy.prepare

        def prepared(model, optimizer):
            model, optimizer = strategy_prepare(model, optimizer)
            fsdp_params.extend(_install(model))
            return model, optimizer

        self.strategy.prepare = prepared
        result = original_fit(self, module, *args, **kwargs)
        _compare(fsdp_params)  # before the job ends the process group
        return result

    def train_step(self, module, optimizer, scheduler, plan, train_data, step, last_checkpoint, **options):
        where["step"], where["micro"] = step + 1, 0
        shards[step + 1] = [p.sharded_param.to_local().detach().clone() for p in fsdp_params]
        micro = iter(range(1, 1000))
        original_backward = self.accelerator.backward

        def backward(loss, **kw):
            original_backward(loss, **kw)
            where["micro"] = next(micro)

        self.accelerator.backward = backward
        try:
            return original_step(self, module, optimizer, scheduler, plan, train_data, step, last_checkpoint, **options)
        finally:
            self.accelerator.backward = original_backward

    trainer_module.Trainer.fit, trainer_module.Trainer._train_step = fit, train_step
    return main(["train", *sys.argv[1:]])


def _rows(t: torch.Tensor, row_bytes: int) -> torch.Tensor:
    """``t`` on the CPU as bytes, one row per row of its first dimension (FSDP shards that dimension)."""
    t = t.detach().cpu().contiguous()
    return t.view(torch.uint8).reshape(-1, row_bytes) if t.numel() else torch.empty(0, row_bytes, dtype=torch.uint8)


def _compare(fsdp_params: list) -> None:
    """Gather every step's shards into whole tensors and list each recorded copy that differs from its tensor."""
    rank, world = dist.get_rank(), dist.get_world_size()
    row_bytes = [p.sharded_param.element_size() * math.prod(p._orig_size[1:]) for p in fsdp_params]
    rows = [p._orig_size[0] for p in fsdp_params]
    mine = {step: [_rows(t, row_bytes[i]) for i, t in enumerate(tensors)] for step, tensors in shards.items()}
    every: list = [None] * world
    dist.all_gather_object(every, mine)  # bytes, as uint8: pickling float8 tensors does not round-trip
    mismatches = []
    for step, micro, i, copy in seen:
        whole = torch.cat([every[r][step][i] for r in range(world)])[: rows[i]]
        got = _rows(copy, row_bytes[i])
        if got.shape != whole.shape or not torch.equal(got, whole):
            bad = (got != whole).any(1).nonzero() if got.shape == whole.shape else torch.arange(rows[i])
            span = [int(bad.min()), int(bad.max())] if bad.numel() else []
            name = fsdp_params[i]._param_fqn
            mismatches.append({"step": step, "micro": micro, "tensor": name, "rows": span, "of": rows[i]})
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"rank-{rank}.json").write_text(json.dumps({"copies": len(seen), "mismatches": mismatches}, indent=1))


if __name__ == "__main__":
    sys.exit(_run())
