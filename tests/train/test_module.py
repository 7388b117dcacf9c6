"""LoraModule's optimizer: torch's fused AdamW wherever it applies (int4lora_train/train/module.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from train_helpers import tiny_peft_model

from int4lora_train.memory import HostAdamW
from int4lora_train.train.config import TrainConfig
from int4lora_train.train.module import LoraModule, fused_adamw_options


def test_fused_adamw_only_for_plain_adamw_over_plain_cuda_tensors(monkeypatch):
    cpu = [nn.Parameter(torch.zeros(2, 2))]
    assert fused_adamw_options(torch.optim.AdamW, cpu) == {}
    assert fused_adamw_options(torch.optim.AdamW, []) == {}
    # CUDA tensors, as far as the check can tell without a GPU
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert fused_adamw_options(torch.optim.AdamW, cpu) == {"fused": True}
    assert fused_adamw_options(HostAdamW, cpu) == {}  # its own update, on the host
    assert fused_adamw_options(torch.optim.AdamW, cpu, "fp16") == {}  # the loss scaler counts skipped steps
    assert fused_adamw_options(torch.optim.AdamW, [nn.Parameter(torch.zeros(2), requires_grad=False).int()]) == {}

    class Sharded(torch.Tensor):  # a tensor subclass such as FSDP's DTensor
        pass

    assert fused_adamw_options(torch.optim.AdamW, [torch.zeros(2).as_subclass(Sharded)]) == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused AdamW runs on CUDA")
def test_the_module_builds_a_fused_adamw_on_cuda():
    module = LoraModule(tiny_peft_model().cuda(), TrainConfig())
    optimizer, _ = module.configure_optimizers(10)
    assert optimizer.defaults["fused"] is True


def test_the_module_builds_the_default_adamw_on_the_cpu():
    module = LoraModule(tiny_peft_model(), TrainConfig())
    optimizer, _ = module.configure_optimizers(10)
    assert type(optimizer) is torch.optim.AdamW and not optimizer.defaults["fused"]


@pytest.mark.parametrize(("precision", "fused"), [("bf16", True), ("no", True), ("fp16", False)])
def test_the_module_passes_its_precision_to_the_choice(monkeypatch, precision, fused):
    # CUDA tensors as far as the choice can tell; torch's fused AdamW also runs on the CPU, so it builds here
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    module = LoraModule(tiny_peft_model(), TrainConfig(mixed_precision=precision))
    optimizer, _ = module.configure_optimizers(10)
    assert bool(optimizer.defaults["fused"]) is fused
