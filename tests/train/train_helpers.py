"""Helpers shared by the trainer tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

from int4lora_train.modeling.tiny_models import build_tiny_model

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def arithmetic_records(n: int = 48) -> list[dict]:
    """Short prompt/completion pairs with an easy pattern (the completion repeats the prompt's digits)."""
    return [{"prompt": f"{a} {a}:", "completion": f"{a}{a}"} for a in range(10, 10 + n)]


def tiny_peft_model(seed: int = 0, dropout: float = 0.0):
    """A dense tiny Llama with plain PEFT LoRA on all linears (the trainer does not care what the base is)."""
    from peft import LoraConfig, get_peft_model

    model = build_tiny_model("llama", seed=seed, **TINY)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
