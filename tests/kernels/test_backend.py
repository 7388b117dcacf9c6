"""The one backend selector and the one escape hatch (INT4LORA_KERNELS)."""

from __future__ import annotations

import pytest
import torch

from int4lora_train.errors import ConfigError, UnsupportedFormatError
from int4lora_train.kernels import backend
from int4lora_train.kernels.backend import ENV_VAR, environment_choice, prepared_launches, use_triton
from int4lora_train.quant.dequant import dequantize, dequantize_torch
from int4lora_train.quant.packer import quantize_rtn

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


@pytest.fixture
def env(monkeypatch):
    """Set INT4LORA_KERNELS for one test (the selector reads it once: the cache is cleared around the test)."""

    def set_to(value: str) -> None:
        monkeypatch.setenv(ENV_VAR, value)
        environment_choice.cache_clear()

    environment_choice.cache_clear()
    yield set_to
    monkeypatch.undo()
    environment_choice.cache_clear()


def test_auto_is_triton_on_cuda_only(env, monkeypatch):
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    assert use_triton(CUDA) and use_triton(CUDA, "auto")
    assert not use_triton(CPU) and not use_triton(CUDA, "torch")
    assert use_triton(CPU, "triton")  # the CPU interpreter's way in (tests)
    assert prepared_launches()


def test_environment_torch_turns_auto_to_torch_but_not_an_explicit_choice(env, monkeypatch):
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    env("torch")
    assert not use_triton(CUDA) and use_triton(CUDA, "triton")
    env("public")
    assert use_triton(CUDA) and not prepared_launches()


def test_bad_choices_say_what_to_use(env, monkeypatch):
    with pytest.raises(UnsupportedFormatError, match=r"unknown kernel backend 'cuda'.*\('auto', 'torch', 'triton'\)"):
        use_triton(CPU, "cuda")
    env("fast")
    with pytest.raises(ConfigError, match=f"{ENV_VAR}='fast' is not one of"):
        use_triton(CUDA)
    env("auto")
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    assert not use_triton(CUDA)  # auto without Triton: torch
    with pytest.raises(UnsupportedFormatError, match="needs Triton"):
        use_triton(CUDA, "triton")


def test_dequantize_asks_the_selector(monkeypatch):
    weight = quantize_rtn(torch.randn(8, 32, generator=torch.Generator().manual_seed(0)), group_size=16)
    asked = []
    monkeypatch.setattr(backend, "use_triton", lambda device, choice=None: asked.append((device.type, choice)) or False)
    assert torch.equal(dequantize(weight, torch.float32, backend="triton"), dequantize_torch(weight, torch.float32))
    assert asked == [("cpu", "triton")]
