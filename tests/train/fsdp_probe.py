"""Launched by ``test_train_fsdp.py`` under ``accelerate launch`` (2 gloo processes): shard a tiny INT4 LoRA model as
the trainer does, then report, per process, the bytes of every uint8 tensor storage still alive in the process
(the packed INT4 weights are the only uint8 tensors), next to the whole model's packed bytes.

    python fsdp_probe.py MODEL_DIR OUT_DIR    (writes OUT_DIR/rank-R.json)
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import get_peft_model
from torch.distributed.tensor import DTensor

from int4lora_train.modeling import Int4Linear
from int4lora_train.modeling.loader import load_int4_model
from int4lora_train.modeling.peft_integration import make_lora_config
from int4lora_train.train import distributed

PACKED_DTYPES = (torch.uint8, distributed.FLOAT_STORAGE[1])  # a buffer; a parameter under FSDP (float_storage)


def live_uint8_storage_bytes() -> int:
    """Bytes of the distinct storages of all live one-byte tensors that can hold packed weights (uint8, or their
    float8 view while they are FSDP parameters; DTensors counted through their local tensor)."""
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not isinstance(obj, DTensor) and obj.dtype in PACKED_DTYPES:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def main(model_dir: str, out_dir: str) -> None:
    plugin = distributed.fsdp_plugin()
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    if not distributed.activate_fsdp(accelerator, plugin):
        raise SystemExit("launch with 2 processes")
    model = get_peft_model(load_int4_model(model_dir, dtype=torch.float32), make_lora_config(r=4))
    packed_bytes = sum(m.packed.numel() for m in model.modules() if isinstance(m, Int4Linear))
    # Loaded on the CPU, the packed weights are memory-mapped views of the checkpoint; copy them to plain memory so
    # that the count below sees them if anything keeps them alive.
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.packed = module.packed.clone()
    gc.collect()
    before = live_uint8_storage_bytes()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model, optimizer = distributed.prepare_fsdp(accelerator, model, optimizer)
    gc.collect()
    report = {"packed_bytes": packed_bytes, "live_uint8_before": before, "live_uint8_after": live_uint8_storage_bytes()}
    Path(out_dir, f"rank-{accelerator.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:3])
