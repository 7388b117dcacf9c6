"""The embedded demo: a tiny INT4 model the toolkit builds itself, and a small bundled data set.

The model is a randomly initialised tiny Llama (:mod:`int4lora_train.modeling.tiny_models`), quantized with the
toolkit's own RTN packer into a real compressed-tensors ``pack-quantized`` W4A16 directory (config.json with its
``quantization_config``, safetensors, tokenizer) that vLLM can serve: the same kind of checkpoint a user brings, only
small. The data are 400 templated question/answer pairs (arithmetic, numbers in words, reversing and capitalising
words, counting), short enough that the whole main job runs on two CPU cores in a couple of minutes.

In a config, ``demo`` as a path names these: ``model.path: demo`` (built into ``<output.dir>/demo-model``),
``data.train_files: demo`` and ``data.validation_file: demo``. :func:`resolve_demo` replaces them by real paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch

from .errors import ConfigError
from .train.config import DEMO, RunConfig, load_config

logger = logging.getLogger(__name__)

DEMO_MODEL = {
    "architecture": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 320,
    "seed": 0,
}
DEMO_GROUP_SIZE = 64
DEMO_MODEL_DIR = "demo-model"
_MARKER = "int4lora_demo.json"  # what the directory was built from: reuse it only if this matches


def resource_path(name: str) -> Path:
    """A file shipped in ``int4lora_train/resources`` (the demo config and data)."""
    return Path(str(resources.files("int4lora_train") / "resources" / name))


def demo_config(overrides: Sequence[str] = ()) -> RunConfig:
    """The embedded default config (``resources/demo.yaml``, the same as ``configs/demo.yaml``) with overrides."""
    return load_config(resource_path("demo.yaml"), overrides)


def build_demo_checkpoint(out_dir: str | Path) -> Path:
    """Build the tiny Llama, quantize it (W4A16, symmetric, group 64) and write it to ``out_dir``; returns it.

    Deterministic (seeded); a directory already built with the same settings is reused.
    """
    from .modeling.tiny_models import build_tiny_model, build_tokenizer
    from .quant.packer import save_int4_checkpoint

    out_dir = Path(out_dir)
    settings = {**DEMO_MODEL, "group_size": DEMO_GROUP_SIZE, "format": "compressed-tensors", "dtype": "bfloat16"}
    marker = out_dir / _MARKER
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == settings:
        logger.info("reusing the demo model in %s", out_dir)
        return out_dir
    arch = dict(DEMO_MODEL)
    architecture, seed = arch.pop("architecture"), arch.pop("seed")
    # bf16 like a real checkpoint: the INT4 scales are stored in the model's dtype.
    model = build_tiny_model(architecture, seed=seed, dtype=torch.bfloat16, **arch)
    save_int4_checkpoint(
        model,
        out_dir,
        format="compressed-tensors",
        group_size=DEMO_GROUP_SIZE,
        symmetric=True,
        ignore=("lm_head",),
        tokenizer=build_tokenizer(),
        overwrite=out_dir.exists(),
    )
    marker.write_text(json.dumps(settings, indent=2), encoding="utf-8")
    logger.info("built the demo INT4 model in %s", out_dir)
    return out_dir


def resolve_demo(config: RunConfig) -> RunConfig:
    """``config`` with every ``demo`` path replaced: the model built under ``<output.dir>/demo-model`` (once, by the
    main process first when several run), the bundled train / validation files."""
    data = config.data
    if (DEMO in data.train_files or data.validation_file == DEMO) and data.format != "instruction":
        raise ConfigError(
            f"the bundled demo data are prompt/completion records: set data.format: instruction (not {data.format})"
        )
    model = config.model
    if model.path == DEMO:
        with _main_process_first(model.device):
            # Absolute, like every path the run records (config.yaml, the adapter's base, the serve command).
            path = build_demo_checkpoint(Path(config.output.dir).absolute() / DEMO_MODEL_DIR)
        model = dataclasses.replace(model, path=str(path))
    train_files = [str(resource_path("demo_train.jsonl")) if f == DEMO else f for f in data.train_files]
    validation = str(resource_path("demo_val.jsonl")) if data.validation_file == DEMO else data.validation_file
    data = dataclasses.replace(data, train_files=train_files, validation_file=validation)
    return dataclasses.replace(config, model=model, data=data)


def _main_process_first(device: str):
    """Under ``accelerate launch`` the main process builds first and the others then find the result."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        from .train.strategy import use_cpu

        return PartialState(cpu=use_cpu(device)).main_process_first()
    return contextlib.nullcontext()
