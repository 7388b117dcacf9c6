"""The run configuration: YAML -> typed dataclasses, validated in one place.

A config file has five sections (``model``, ``lora``, ``data``, ``train``, ``output``); every key is optional and
falls back to the default written next to its field below. :func:`load_config` is the only parser: it reads the
YAML, applies command-line overrides (``section.key=value``, the value parsed as a YAML scalar), and checks every
key, type and range. An unknown or misspelled key is a :class:`ConfigError` that names it with its section path
and suggests the closest valid key.

Paths are used as written (relative paths are relative to the working directory). The reserved value ``demo``
(``model.path: demo``, ``data.train_files: demo``, ``data.validation_file: demo``) names the tiny INT4 model and
the small data set shipped with the toolkit; :mod:`int4lora_train.demo` resolves it.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ..errors import ConfigError

logger = logging.getLogger(__name__)

DEMO = "demo"
"""Reserved path value: the toolkit's own tiny INT4 model / bundled data set."""

SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
"""transformers ``get_scheduler`` names that need no extra arguments."""


ALIASES = {
    "learning_rate": "train.lr",
    "num_epochs": "train.epochs",
    "num_train_epochs": "train.epochs",
    "per_device_train_batch_size": "train.micro_batch_size",
    "batch_size": "train.micro_batch_size",
    "lr_scheduler": "train.scheduler",
    "lr_scheduler_type": "train.scheduler",
    "bf16": "train.mixed_precision",
    "fp16": "train.mixed_precision",
    "eval_steps": "train.eval_every",
    "save_steps": "train.save_every",
    "logging_steps": "train.log_every",
    "save_total_limit": "train.keep_last",
    "load_best_model_at_end": "train.keep_best",
    "resume_from_checkpoint": "train.resume",
    "lora_r": "lora.r",
    "rank": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "sequence_len": "data.max_length",
    "cutoff_len": "data.max_length",
    "max_seq_length": "data.max_length",
    "sample_packing": "data.packing",
    "val_set_size": "data.validation_split",
    "base_model": "model.path",
    "model_name_or_path": "model.path",
    "output_dir": "output.dir",
}
"""Names other trainers (axolotl, LLaMA-Factory, transformers' TrainingArguments) use, for "did you mean"."""

EITHER_OR = (("train.max_steps", "train.epochs"), ("data.validation_file", "data.validation_split"))
"""Keys a config sets one of, not both. A command-line override of one replaces the other if the file sets it."""


def _opt(default: Any, help: str, *, min: float | None = None, max: float | None = None, above: float | None = None):
    """A dataclass field with its help text and an inclusive range (``above`` = exclusive lower bound)."""
    metadata = {"help": help, "min": min, "max": max, "above": above}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    path: str = _opt(DEMO, "INT4 checkpoint directory (compressed-tensors W4A16, GPTQ, AWQ) or `demo`.")
    tokenizer: str | None = _opt(None, "Tokenizer directory; default: `model.path`.")
    dtype: Literal["bfloat16", "float16", "float32"] = _opt(
        "bfloat16",
        "dtype of the dense weights (embeddings, norms, lm_head); INT4 weights are dequantized to the compute "
        "dtype (this one, or the autocast dtype).",
    )
    device: Literal["auto", "cpu", "cuda"] = _opt("auto", "`auto`: the process's GPU if there is one, else the CPU.")
    mode: Literal["on_the_fly", "cache"] = _opt(
        "on_the_fly", "Dequantize INT4 weights on every forward (`on_the_fly`) or keep them in a budgeted cache."
    )
    cache_budget_mb: float | None = _opt(
        None, "`cache` mode: most MiB of dequantized weights kept (LRU); null = unbounded.", above=0
    )
    trust_remote_code: bool = _opt(False, "Run model code shipped with the checkpoint (off unless you trust it).")
    allow_pickle: bool = _opt(False, "Allow pickled `.bin` weights; only safetensors are read otherwise.")


@dataclass
class LoraSettings:
    r: int = _opt(16, "LoRA rank (vLLM serves ranks up to its `--max-lora-rank`).", min=1)
    alpha: float = _opt(32.0, "LoRA alpha; scale = alpha / r (alpha / sqrt(r) with rsLoRA).", above=0)
    dropout: float = _opt(0.0, "Dropout on the LoRA input.", min=0, max=0.99)
    target_modules: str | list[str] = _opt(
        "all-linear", "`all-linear` or a list of module names (`q_proj`, `v_proj`, ...)."
    )
    use_rslora: bool = _opt(False, "Rank-stabilised LoRA scaling (alpha / sqrt(r)).")


@dataclass
class DataConfig:
    train_files: list[str] = _opt(
        [DEMO],
        "Training file(s): `.jsonl`, `.json` (a list of records), `.txt`; with the `datasets` extra also `.parquet`, "
        "`.arrow` and `save_to_disk` directories.",
    )
    validation_file: str | None = _opt(None, "Validation file (same format); overrides `validation_split`.")
    validation_split: float = _opt(0.0, "Fraction of the training samples held out for validation.", min=0, max=0.5)
    format: Literal["text", "instruction", "chat", "alpaca", "sharegpt", "pretokenized"] = _opt(
        "instruction",
        "`text` (plain LM), `instruction` (prompt/completion), `chat` (messages); presets: `alpaca` "
        "(instruction/input/output, the Alpaca prompt, loss on the output) and `sharegpt` (conversations of "
        "from/value, roles human/gpt/system, loss on gpt turns); `pretokenized` (`input_ids`, optional `labels` "
        "with -100 = no loss).",
    )
    mix: list[float] | None = _opt(
        None,
        "One weight per training file: the training set is drawn from the files in these proportions (seeded; a "
        "file is repeated when its share exceeds its size); null = the files concatenated.",
    )
    max_length: int = _opt(
        512, "Samples are truncated to this many tokens (packed rows hold at most this many).", min=2
    )
    packing: bool = _opt(False, "Pack several short samples into one row (attention stays within each sample).")
    text_field: str = _opt("text", "`text` format: record field holding the text.")
    prompt_field: str = _opt("prompt", "`instruction` format: record field holding the prompt (no loss).")
    completion_field: str = _opt("completion", "`instruction` format: record field holding the completion (loss).")
    messages_field: str = _opt("messages", "`chat` format: record field holding the list of {role, content}.")


@dataclass
class FsdpConfig:
    reshard_after_forward: bool = _opt(
        True,
        "`fsdp`: free each layer's gathered INT4 weights and LoRA after its forward and gather them again for "
        "backward (less memory, more communication).",
    )
    wrap_classes: list[str] | None = _opt(
        None,
        "`fsdp`: class names of the blocks sharded as one unit each (e.g. `LlamaDecoderLayer`); null = the model's "
        "decoder layer (`_no_split_modules`).",
    )
    all_gather_stream: Literal["compute", "separate"] = _opt(
        "compute",
        "`fsdp`: where FSDP gathers each unit's shards. `compute`: in order on the compute stream (exact; the "
        "gathers do not overlap compute). `separate`: FSDP2's own side streams (overlap), which on CUDA with torch "
        "2.11 read a gathered frozen tensor wrong in some runs (issue 12).",
    )


@dataclass
class DdpConfig:
    static_graph: Literal["auto", "on", "off"] = _opt(
        "auto",
        "`ddp`: tell DDP the graph is the same every step (with gradient_as_bucket_view): less host work per step. "
        "`auto` = on when gradient_accumulation_steps is 1 (torch's static graph drops gradients under no_sync, "
        "pytorch#187732).",
    )
    comm_hook: Literal["none", "bf16", "fp16"] = _opt(
        "none", "`ddp`: all-reduce the LoRA gradients in this precision (half the bytes; rounds the gradients)."
    )


@dataclass
class SpeedConfig:
    """Training-step optimisations (int4lora_train.speed); each is exact up to summation order."""

    fused_lora: bool = _opt(True, "One autograd node per LoRA'd INT4 projection (base + LoRA, one dequantization).")
    keep_dense_for_backward: bool = _opt(
        True,
        "With gradient checkpointing, the weight dequantized in the recompute serves the backward (2 instead "
        "of 3 dequantizations per step; one layer's dense weights live at a time).",
    )
    lean_recompute: bool = _opt(
        True,
        "The checkpoint recompute skips the MLP down projection, whose output it never keeps (Llama-like layers; "
        "gradients unchanged).",
    )
    group_projections: bool = _opt(True, "q/k/v and gate/up as one node each (needs `fused_lora`).")
    fused_dropout_backward: bool = _opt(
        True,
        "With `lora.dropout` > 0, the LoRA dropout's part of the input and A gradients in one Triton pass each over "
        "the [tokens, in] tensors (CUDA; fp32 accumulation, one rounding: not bit-identical to the torch ops; 3% "
        "off an 8B step at 4 x 2048 tokens on an H200).",
    )
    fused_dropout_forward: bool = _opt(
        False,
        "With `lora.dropout` > 0, the LoRA dropout masks and A projections in one Triton pass that reads the input "
        "once, without a dropped copy per projection (CUDA, in_features divisible by 4; the masks come from the "
        "kernel's own Philox stream, not torch's). Measured slower than torch's dropout on an H200 (8B step 0.656 "
        "against 0.641 s at 4 x 2048 tokens, 0.240 against 0.232 s at 1 x 2048), so off.",
    )
    chunked_loss: bool = _opt(True, "Cross-entropy in chunks of tokens: the full fp32 logits are never held.")
    loss_chunk_size: int | None = _opt(None, "Tokens per loss chunk; null = chosen from the vocabulary size.", min=1)
    fused_kernels: Literal["auto", "on", "off"] = _opt(
        "auto", "Triton RMSNorm and SwiGLU: `auto` uses them on large inputs (GPU-bound steps), `on`, `off`."
    )
    fused_rope: bool = _opt(
        True,
        "Rotary position embedding (transformers' `apply_rotary_pos_emb`) as one Triton kernel for q and k each way, "
        "bit-identical (CUDA; Llama-like architectures whose function is the standard one; elsewhere unchanged; 7% "
        "off an 8B step at 4 x 2048 tokens on an H200).",
    )
    packed_attention: Literal["auto", "varlen", "mask"] = _opt(
        "auto",
        "Attention over rows of several segments (`data.packing`, or padding with `micro_batch_size` > 1): `varlen` "
        "runs the flash varlen kernel over the segments, without a mask (CUDA, bf16/fp16; elsewhere the same "
        "block-causal attention through SDPA); `mask` is transformers' 4-D block-causal mask; `auto` = varlen when "
        "the rows hold several segments and the kernel runs (CUDA sm80+, bf16/fp16 compute, no attention logit "
        "softcapping as in Gemma-2), else mask.",
    )
    cuda_graphs: Literal["auto", "on", "off"] = _opt(
        "auto",
        "Each checkpointed decoder layer's forward and recompute + backward captured once as CUDA graphs and "
        "replayed, batches padded to the longest row of the data (same losses up to rounding; removes the host "
        "time of ~200 launches per layer and step: 2x faster steps at micro batch 1 x 2048 on an H200). `auto` = "
        "on for single-process CUDA runs with gradient checkpointing and no activation offloading, for "
        "micro-batches of at most 2048 tokens (from 2 x 2048 the step is GPU-bound and graphs were 3% slower) of "
        "rows that average at least 75% of the longest (packed data); `on` (any size; an error where it cannot run); "
        "`off`.",
    )


@dataclass
class MemoryConfig:
    """Device-memory features (int4lora_train.memory; docs/memory.md); `auto` lets the memory plan choose."""

    offload_activations: Literal["auto", "on", "off"] = _opt(
        "auto",
        "Keep the inputs of the gradient-checkpointed layers in pinned host memory (copied on side streams, "
        "prefetched in backward). Needs `gradient_checkpointing`. `auto` = on (CUDA) when they would exceed 10% of "
        "the device memory left after the weights, or rows have >= 32k tokens.",
    )
    embeddings_on_cpu: Literal["auto", "on", "off"] = _opt(
        "auto",
        "Keep the frozen input embedding table in host memory (rows gathered there, copied to the device). Not with "
        "a tied or trained embedding, nor `strategy: fsdp`. `auto` = on when the run is memory-bound (weights + "
        "activations > 90% of the device).",
    )
    mlp_chunk_tokens: int | None = _opt(
        None,
        "Run the decoder MLPs on this many tokens at a time, each chunk checkpointed (one chunk's intermediates "
        "live at once); 0 = off; null = auto: 8192 when a micro-batch has more than 16384 tokens.",
        min=0,
    )
    optimizer_on_cpu: Literal["auto", "on", "off"] = _opt(
        "auto",
        "Keep the LoRA optimizer's AdamW state in pinned host memory and run its update there (2 x the LoRA bytes off "
        "the device; copies and a host update per step). Not with `strategy: fsdp`. `auto` = on when the run is "
        "memory-bound.",
    )


@dataclass
class TrainConfig:
    seed: int = _opt(42, "Seed for LoRA init, data order and dropout.", min=0)
    max_steps: int | None = _opt(None, "Optimizer steps; give this or `epochs` (default: 1 epoch).", min=1)
    epochs: float | None = _opt(None, "Passes over the training data (converted to optimizer steps).", above=0)
    micro_batch_size: int = _opt(1, "Samples per forward pass, per process.", min=1)
    gradient_accumulation_steps: int = _opt(1, "Micro-batches per optimizer step.", min=1)
    lr: float = _opt(2e-4, "Peak learning rate (AdamW).", above=0)
    weight_decay: float = _opt(0.0, "AdamW weight decay on LoRA matrices.", min=0)
    adam_betas: list[float] = _opt([0.9, 0.999], "AdamW betas.")
    scheduler: Literal[SCHEDULERS] = _opt("cosine", "transformers learning-rate schedule.")  # type: ignore[valid-type]
    warmup_steps: int = _opt(0, "Linear warmup steps (overrides `warmup_ratio` when > 0).", min=0)
    warmup_ratio: float = _opt(0.0, "Warmup as a fraction of all steps.", min=0, max=1)
    max_grad_norm: float | None = _opt(1.0, "Clip the global gradient norm to this; null = no clipping.", above=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = _opt("no", "Autocast for the forward pass (accelerate).")
    gradient_checkpointing: bool = _opt(False, "Recompute activations in backward (less memory, ~30% slower).")
    gradient_checkpointing_reentrant: bool = _opt(
        False, "Reentrant instead of non-reentrant checkpointing (faster at batch size 1 on some hosts)."
    )
    eval_every: int | None = _opt(
        None, "Evaluate every N steps (and always at the end); null = only at the end.", min=1
    )
    eval_at_start: bool = _opt(False, "Also evaluate before the first step (the untrained adapter).")
    eval_prompts: list[str] = _opt(
        [],
        "Prompts completed greedily at each evaluation (sent as written, with the tokenizer's BOS); the completions "
        "go to `metrics.jsonl` and TensorBoard as `eval/prompt_i` / `eval/completion_i`.",
    )
    eval_max_new_tokens: int = _opt(32, "`eval_prompts`: most tokens generated per prompt.", min=1)
    save_every: int | None = _opt(None, "Write a resumable checkpoint every N steps (and at the end).", min=1)
    keep_last: int | None = _opt(2, "Keep the newest N checkpoints; null = keep all.", min=1)
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] | None = _opt(
        None,
        "Experiment trackers (accelerate's) besides `metrics.jsonl`: `tensorboard` (`<output.dir>/tb`), `wandb` "
        "(offline in `<output.dir>/wandb` unless WANDB_MODE is set), `mlflow` (`<output.dir>/mlruns` unless "
        "MLFLOW_TRACKING_URI is set); null = tensorboard when `output.tensorboard`.",
    )
    keep_best: bool = _opt(
        False,
        "Also keep the checkpoint with the lowest validation loss (keep_last never removes it): an evaluation that "
        "sets a new best writes a checkpoint; `summary.json` names it, `int4lora-train export RUN --checkpoint best` "
        "exports it. Needs validation data.",
    )
    log_every: int = _opt(10, "Log train loss / lr / tokens per second every N steps.", min=1)
    resume: bool | str = _opt(
        False, "`false`, `true`/`latest` (newest checkpoint in the run directory, if any) or a checkpoint path."
    )
    strategy: Literal["ddp", "fsdp"] = _opt(
        "ddp",
        "Several processes: `ddp` (each holds the whole INT4 model) or `fsdp` (FSDP2: INT4 weights, LoRA and "
        "optimizer state sharded across processes; for models that do not fit one GPU).",
    )
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    ddp: DdpConfig = field(default_factory=DdpConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)


@dataclass
class ExportConfig:
    enabled: bool = _opt(True, "Export the adapter for vLLM at the end of training.")
    dir: str | None = _opt(None, "Adapter directory; default: `<output.dir>/adapter`.")
    check_reload: bool = _opt(
        False,
        "After exporting, load the adapter with PEFT onto a fresh copy of the INT4 base and check that it "
        "reproduces the trained model's logits (costs a second copy of the base).",
    )
    fold_scaling: bool = _opt(
        False, "Fold per-module LoRA scales into lora_B (vLLM applies one alpha / r to every module)."
    )


@dataclass
class OutputConfig:
    dir: str = _opt("runs/demo", "Run directory (config, checkpoints, adapter, metrics, plot, summary).")
    if_exists: Literal["error", "overwrite"] = _opt(
        "error",
        "A run directory that already holds a run (and `train.resume` is off): `error`, or `overwrite` "
        "(removes only the toolkit's own files there).",
    )
    tensorboard: bool = _opt(True, "Write TensorBoard logs to `<output.dir>/tb`.")
    plot: bool = _opt(True, "Write the loss curve to `<output.dir>/loss.png`.")
    export: ExportConfig = field(default_factory=ExportConfig)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML-safe)."""
        return dataclasses.asdict(self)

    @property
    def resume_target(self) -> str | None:
        """``None`` (start fresh), ``"latest"`` or a checkpoint path."""
        resume = self.train.resume
        if resume is False:
            return None
        if resume is True:
            return "latest"
        return resume


# ---------------------------------------------------------------------------------------------------------------
# Parsing


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read ``path`` (YAML; ``None`` = all defaults), apply ``section.key=value`` overrides, validate.

    Raises:
        ConfigError: unreadable YAML, unknown key (with the closest valid key), bad type or range.
    """
    raw: dict[str, Any] = {}
    source = "command-line overrides" if overrides else "defaults"
    if path is not None:
        source = f"{path} (with command-line overrides)" if overrides else str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if loaded is not None:
            if not isinstance(loaded, Mapping):
                raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
            raw = dict(loaded)
    raw = apply_overrides(raw, overrides)
    return config_from_dict(raw, source=source)


def config_from_dict(raw: Mapping[str, Any], source: str = "config") -> RunConfig:
    """Build and validate a :class:`RunConfig` from a nested mapping (as read from YAML)."""
    config = _parse_dataclass(RunConfig, raw, path="", source=source)
    _check_cross_field(config, source)
    return config


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``section.key=value`` override applied (value parsed as YAML).

    The command line wins: overriding one key of an :data:`EITHER_OR` pair (``train.max_steps``) removes the other
    (``train.epochs``) from ``raw``, with an INFO log line, instead of making the config set both.

    Raises:
        ConfigError: an override without ``=``, or whose key path is not a config key (with a suggestion).
    """
    result = _deep_copy(raw)
    overridden = set()
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=1e-4)")
        parts = key.split(".")
        _check_key_path(parts, source=f"command-line override {item!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"command-line override {item!r}: the value is not a YAML scalar/list: {exc}") from exc
        node = result
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
        if value is not None:
            overridden.add(key)
    for pair in EITHER_OR:
        for key, other in (pair, pair[::-1]):
            if key in overridden and other not in overridden:
                section, name = other.split(".")
                node = result.get(section)
                dropped = node.pop(name, None) if isinstance(node, dict) else None
                if dropped is not None:
                    logger.info("%s from the command line overrides %s=%s of the config", key, other, dropped)
    return result


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (``load_config`` reads it back to an equal config)."""
    text = yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False)
    Path(path).write_text(text, encoding="utf-8")


def config_reference() -> str:
    """A Markdown table of every key with its type, default and help (the reference in docs/training.md)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, hint, default, help_text in _walk_fields(RunConfig, ""):
        lines.append(f"| `{key}` | {_type_name(hint)} | `{_yaml_inline(default)}` | {help_text} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Internals: one generic walker over the dataclasses, so schema, validation and docs cannot drift apart.


def _parse_dataclass(cls: type, raw: Any, path: str, source: str) -> Any:
    where = path or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: {where} must be a mapping of keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            raise ConfigError(_unknown_key_message(cls, path, str(key), source))
    values = {}
    for name, fld in fields.items():
        if name not in raw:
            continue
        key_path = f"{path}.{name}" if path else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _parse_dataclass(hint, raw[name], key_path, source)
        else:
            values[name] = _coerce(raw[name], hint, key_path, source)
            _check_range(values[name], fld.metadata, key_path, source)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check ``value`` against the type ``hint`` and normalise it (YAML 1.1 quirks, str -> [str])."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, source)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{source}: {key} must be {_type_name(hint)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(hint)
        # YAML 1.1 reads a bare `no` / `yes` / `on` / `off` as a boolean.
        if isinstance(value, bool) and ("yes" if value else "no") in choices:
            return "yes" if value else "no"
        if isinstance(value, bool) and ("on" if value else "off") in choices:
            return "on" if value else "off"
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint_text = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: {key} must be one of {list(choices)}, got {value!r}{hint_text}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if isinstance(value, str) and (item_type is str or typing.get_origin(item_type) is Literal):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list of {_type_name(item_type)}, got {value!r}")
        return [_coerce(item, item_type, f"{key}[{i}]", source) for i, item in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # PyYAML reads `1e-4` (no dot) as a string; accept any float literal.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{source}: {key} must be a non-empty string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has an unsupported type hint {hint!r}")  # a bug in this module


def _check_range(value: Any, metadata: Mapping[str, Any], key: str, source: str) -> None:
    if value is None or isinstance(value, (str, list, bool)):
        return
    low, high, above = metadata.get("min"), metadata.get("max"), metadata.get("above")
    if low is not None and value < low:
        raise ConfigError(f"{source}: {key} must be >= {low}, got {value!r}")
    if above is not None and value <= above:
        raise ConfigError(f"{source}: {key} must be > {above}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{source}: {key} must be <= {high}, got {value!r}")


def _check_cross_field(config: RunConfig, source: str) -> None:
    train, data, model = config.train, config.data, config.model
    if train.max_steps is not None and train.epochs is not None:
        raise ConfigError(f"{source}: set train.max_steps or train.epochs, not both")
    if len(train.adam_betas) != 2 or not all(0 <= b < 1 for b in train.adam_betas):
        raise ConfigError(f"{source}: train.adam_betas must be two numbers in [0, 1), got {train.adam_betas}")
    if not data.train_files:
        raise ConfigError(f"{source}: data.train_files is empty; give at least one training file")
    if data.mix is not None and (len(data.mix) != len(data.train_files) or not all(w > 0 for w in data.mix)):
        raise ConfigError(
            f"{source}: data.mix needs one positive weight per training file ({len(data.train_files)} files), got "
            f"{data.mix}"
        )
    if data.validation_file is not None and data.validation_split > 0:
        raise ConfigError(f"{source}: set data.validation_file or data.validation_split, not both")
    if isinstance(config.lora.target_modules, list) and not config.lora.target_modules:
        raise ConfigError(f"{source}: lora.target_modules is empty; use all-linear or list module names")
    if model.cache_budget_mb is not None and model.mode != "cache":
        raise ConfigError(f"{source}: model.cache_budget_mb only applies with model.mode: cache")
    if isinstance(train.resume, str) and train.resume.lower() in ("true", "false", "yes", "no", ""):
        raise ConfigError(f"{source}: train.resume={train.resume!r} is a string; write true/false without quotes")
    if train.strategy == "fsdp" and model.mode == "cache":
        raise ConfigError(
            f"{source}: model.mode: cache keeps whole dense weights on every process, which undoes train.strategy: "
            "fsdp's sharding; use model.mode: on_the_fly (or train.strategy: ddp)"
        )
    if train.strategy == "fsdp" and config.output.export.check_reload:
        raise ConfigError(
            f"{source}: output.export.check_reload needs the whole trained model in one process, which "
            "train.strategy: fsdp never holds; set it to false and check the adapter afterwards with "
            "`int4lora-train verify`"
        )
    if train.strategy == "fsdp" and train.mixed_precision == "fp16":
        # accelerate's FSDP2 gradient clipping unscales fp16 gradients twice (a GradScaler error) for a subset of
        # parameters such as LoRA's; bf16 needs no scaler.
        raise ConfigError(f"{source}: train.strategy: fsdp supports train.mixed_precision bf16 or no, not fp16")
    if train.keep_best and data.validation_file is None and not data.validation_split:
        raise ConfigError(
            f"{source}: train.keep_best needs validation data; set data.validation_file or data.validation_split"
        )
    if train.report_to is not None and "tensorboard" in train.report_to and not config.output.tensorboard:
        raise ConfigError(
            f"{source}: train.report_to lists tensorboard but output.tensorboard is false; drop one of them"
        )
    if train.memory.offload_activations == "on" and not train.gradient_checkpointing:
        raise ConfigError(
            f"{source}: train.memory.offload_activations: on moves the inputs of gradient-checkpointed layers to host "
            "memory, which needs train.gradient_checkpointing: true (set it, or offload_activations: auto/off)"
        )
    if train.memory.embeddings_on_cpu == "on" and train.strategy == "fsdp":
        raise ConfigError(
            f"{source}: train.memory.embeddings_on_cpu: on keeps the embedding table out of the parameters, which "
            "train.strategy: fsdp shards; use embeddings_on_cpu: auto/off (or train.strategy: ddp)"
        )
    if train.memory.optimizer_on_cpu == "on" and train.strategy == "fsdp":
        raise ConfigError(
            f"{source}: train.memory.optimizer_on_cpu: on keeps whole AdamW states on the host, while "
            "train.strategy: fsdp shards them over the processes; use optimizer_on_cpu: auto/off (or strategy: ddp)"
        )
    if train.fsdp.wrap_classes is not None and not train.fsdp.wrap_classes:
        raise ConfigError(f"{source}: train.fsdp.wrap_classes is empty; use null (the decoder layer) or class names")


def _unknown_key_message(cls: type, path: str, key: str, source: str) -> str:
    valid = [f.name for f in dataclasses.fields(cls)]
    full = f"{path}.{key}" if path else key
    # In order: the right key in the wrong section (`lr` under `lora`), another trainer's name for a key
    # (`learning_rate`), a typo of a key of this section, a typo of another trainer's name.
    elsewhere = [k for k, *_ in _walk_fields(RunConfig, "") if k.rsplit(".", 1)[-1] == key]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    close_alias = difflib.get_close_matches(key, list(ALIASES), n=1, cutoff=0.8)
    if elsewhere:
        target = elsewhere[0]
    elif key in ALIASES:
        target = ALIASES[key]
    elif close:
        target = f"{path}.{close[0]}" if path else close[0]
    elif close_alias:
        target = ALIASES[close_alias[0]]
    else:
        target = None
    suggestion = f"did you mean '{target}'?" if target else "no close match"
    where = f"section '{path}'" if path else "the top level"
    return f"{source}: unknown key '{full}' in {where}; {suggestion} (valid keys: {', '.join(valid)})"


def _check_key_path(parts: list[str], source: str) -> None:
    cls: Any = RunConfig
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{source}: '{'.'.join(parts[:depth])}' is a value, not a section")
        if part not in {f.name for f in dataclasses.fields(cls)}:
            raise ConfigError(_unknown_key_message(cls, ".".join(parts[:depth]), part, source))
        cls = typing.get_type_hints(cls)[part]


def _walk_fields(cls: type, prefix: str):
    """Yield ``(dotted key, type hint, default, help)`` for every leaf field."""
    hints = typing.get_type_hints(cls)
    for fld in dataclasses.fields(cls):
        key = f"{prefix}.{fld.name}" if prefix else fld.name
        hint = hints[fld.name]
        if dataclasses.is_dataclass(hint):
            yield from _walk_fields(hint, key)
            continue
        default = fld.default_factory() if fld.default is dataclasses.MISSING else fld.default
        yield key, hint, default, fld.metadata.get("help", "")


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is Literal:
        return " / ".join(f"`{c}`" for c in typing.get_args(hint))
    if origin is list:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    if hint is type(None):
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(hint, str(hint))


def _yaml_inline(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
