"""Device memory: one call, :func:`apply`, decides and switches the features that trade time for memory.

::

    model = get_peft_model(load_int4_model(path), lora_config)
    prepare_for_training(model, gradient_checkpointing=True, use_reentrant=False)
    speed.apply(model)                                                  # first: the MLP patch wraps speed's
    report = memory.apply(model, MemoryConfig(), micro_batch_size=1, seq_len=131072)   # auto: decided here
    memory.apply(model, MemoryConfig(offload_activations="on", embeddings_on_cpu="off", mlp_chunk_tokens=8192))

The features (docs/memory.md has when ``auto`` picks each and what it costs):

- ``offload_activations``: the inputs of the gradient-checkpointed decoder layers live in pinned host memory
  (:mod:`.offload`); needs gradient checkpointing.
- ``embeddings_on_cpu``: the frozen input embedding table stays in host memory (:mod:`.host_embeddings`).
- ``mlp_chunk_tokens``: the decoder MLPs run on this many tokens at a time, each chunk checkpointed
  (:mod:`.chunked_mlp`); ``None`` = auto, ``0`` = off.
- ``optimizer_on_cpu``: the LoRA optimizer's state and update in host memory (:mod:`.host_optimizer`); the
  trainer builds the optimizer from the plan (:func:`optimizer_class`), :func:`apply` has nothing to switch for it.
- under memory pressure ``auto`` also turns off ``keep_dense_for_backward`` (one layer's dense weights held through
  the recompute, :mod:`int4lora_train.modeling.int4_linear`).

:func:`plan` is the one place the ``auto`` choices are made, from an estimate of the run's device memory; a
:class:`MemoryPlan` says what it chose and why. :func:`apply` takes a config (and the workload: micro-batch size and
tokens per row) or a plan. Call it after ``speed.apply`` and before wrapping the model for DDP / FSDP.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from int4lora_train.errors import ConfigError
from int4lora_train.memory.chunked_mlp import chunked_mlp_tokens, disable_chunked_mlp, enable_chunked_mlp
from int4lora_train.memory.host_embeddings import (
    disable_host_embeddings,
    enable_host_embeddings,
    host_embedding_refusal,
    host_embeddings_enabled,
    input_embedding,
)
from int4lora_train.memory.host_optimizer import HostAdamW
from int4lora_train.memory.offload import (
    DEFAULT_MIN_BYTES,
    activation_offloader,
    checkpointed_layers,
    disable_activation_offload,
    enable_activation_offload,
)
from int4lora_train.modeling.int4_linear import Int4Linear

logger = logging.getLogger(__name__)

CHOICES = ("auto", "on", "off")

# The thresholds of `plan` (docs/memory.md explains them).
OFFLOAD_SHARE = 0.10
"""Offload the checkpointed layer inputs when they would take more than this share of the device memory left after
the weights: below it the memory they free buys nothing a run would notice, above it they start to decide the
largest sequence that fits."""
OFFLOAD_MIN_ROW_TOKENS = 32 * 1024
"""...or when a row has at least this many tokens: long-context runs are memory-bound by construction, and there
each layer's compute (quadratic attention) hides the copies."""
PRESSURE_SHARE = 0.90
"""A run is memory-bound when weights + activations + one layer's working set exceed this share of the device's
memory: then ``auto`` keeps the embeddings on the host and drops ``keep_dense_for_backward``."""
MLP_CHUNK_MIN_TOKENS = 16 * 1024
"""``mlp_chunk_tokens`` auto: chunk when a micro-batch holds more tokens than this..."""
MLP_CHUNK_TOKENS = 8 * 1024
"""...in chunks of this many tokens. At 8k tokens a chunk's matmuls (8192 x hidden x intermediate, the 8B shape:
~1 TFLOP per projection) keep an H100/H200 busy, so chunking costs only the extra recompute of the MLP (about a
third of a layer's forward FLOPs); the intermediates of a chunk are 8192 x 14336 x 2 bytes = 224 MiB each for the 8B
shape (448 MiB at 70B) instead of 3.5 GiB (7 GiB) at 128k tokens."""


@dataclass(frozen=True)
class MemoryConfig:
    """The memory features (see the module docstring); the defaults let :func:`plan` choose."""

    offload_activations: str | bool = "auto"  # "auto", "on" / True, "off" / False
    embeddings_on_cpu: str | bool = "auto"
    mlp_chunk_tokens: int | None = None  # None: auto; 0: off; n: chunks of n tokens
    optimizer_on_cpu: str | bool = "auto"


@dataclass
class MemoryPlan:
    """What :func:`plan` chose: each feature, with its reason, and the estimates (bytes) it used."""

    offload_activations: bool = False
    embeddings_on_cpu: bool = False
    mlp_chunk_tokens: int = 0
    optimizer_on_cpu: bool = False
    keep_dense_for_backward: bool | None = None  # False: turn it off; None: leave it as it is
    reasons: dict[str, str] = field(default_factory=dict)
    estimate: dict[str, Any] = field(default_factory=dict)

    @property
    def saves_device_memory(self) -> bool:
        """Whether any feature is on, i.e. the run puts device memory before speed (the trainer then keeps no
        per-step copies it could recompute, such as the adapters' compute-dtype casts)."""
        return bool(
            self.offload_activations
            or self.embeddings_on_cpu
            or self.mlp_chunk_tokens
            or self.optimizer_on_cpu
            or self.keep_dense_for_backward is False
        )

    def summary(self) -> str:
        """The one log line: ``memory: offload_activations=on (...), embeddings_on_cpu=off (...), ...``."""
        parts = [
            f"offload_activations={_onoff(self.offload_activations)} ({self.reasons.get('offload_activations', '')})",
            f"embeddings_on_cpu={_onoff(self.embeddings_on_cpu)} ({self.reasons.get('embeddings_on_cpu', '')})",
            f"mlp_chunk_tokens={self.mlp_chunk_tokens or 'off'} ({self.reasons.get('mlp_chunk_tokens', '')})",
            f"optimizer_on_cpu={_onoff(self.optimizer_on_cpu)} ({self.reasons.get('optimizer_on_cpu', '')})",
        ]
        if self.keep_dense_for_backward is False:
            parts.append(f"keep_dense_for_backward=off ({self.reasons.get('keep_dense_for_backward', '')})")
        return "memory: " + ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _onoff(value: bool) -> str:
    return "on" if value else "off"


def _choice(name: str, value: Any) -> str:
    normal = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
    if normal not in CHOICES:
        raise ConfigError(f"memory.{name} must be one of 'auto', 'on', 'off'; got {value!r}")
    return normal


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _check_config(config: MemoryConfig) -> tuple[str, str, int | None, str]:
    offload = _choice("offload_activations", config.offload_activations)
    embeddings = _choice("embeddings_on_cpu", config.embeddings_on_cpu)
    chunk = config.mlp_chunk_tokens
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0):
        raise ConfigError(f"memory.mlp_chunk_tokens must be null (auto), 0 (off) or a positive integer; got {chunk!r}")
    return offload, embeddings, chunk, _choice("optimizer_on_cpu", config.optimizer_on_cpu)


def _model_dims(model: nn.Module) -> dict[str, int]:
    config = getattr(model, "config", None)
    get = lambda name, default=0: int(getattr(config, name, None) or default)  # noqa: E731
    return {
        "hidden": get("hidden_size"),
        "intermediate": get("intermediate_size", 4 * get("hidden_size")),
        "layers": get("num_hidden_layers"),
    }


def _device_of(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def _bytes_on(model: nn.Module, device: torch.device) -> tuple[int, int]:
    """(bytes of ``model``'s parameters and buffers on ``device``, bytes of all of them)."""
    on, total = 0, 0
    for tensor in (*model.parameters(), *model.buffers()):
        size = tensor.numel() * tensor.element_size()
        total += size
        if tensor.device.type == device.type and (device.index is None or tensor.device.index == device.index):
            on += size
    return on, total


def _host_table_bytes(model: nn.Module) -> int:
    """The bytes of the input embedding table an earlier :func:`apply` keeps in host memory (else 0). The plan
    counts them as weights on the device: it estimates the run without the features it decides, so that planning
    again after :func:`apply` decides the same (else the table, off the device, would make a memory-bound run look
    roomy and the next :func:`apply` would move it back). The free memory is left as it is: the table's device
    block stays in torch's caching allocator, which ``mem_get_info`` counts as used."""
    if not host_embeddings_enabled(model):
        return 0
    weight = input_embedding(model).weight
    return weight.numel() * weight.element_size()


def _layer_dense_bytes(model: nn.Module, dtype_bytes: int, layers: int) -> int:
    """The dense bf16 weights of one decoder layer's INT4 projections (what keep_dense_for_backward holds)."""
    total = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Int4Linear))
    return total * dtype_bytes // max(1, layers)


def plan(
    model: nn.Module,
    micro_batch_size: int = 1,
    seq_len: int | None = None,
    device: torch.device | str | None = None,
    config: MemoryConfig | None = None,
    *,
    strategy: str = "single",
    world_size: int = 1,
    keep_dense_for_backward: bool | None = None,
) -> MemoryPlan:
    """Choose every feature of ``config`` (default ``MemoryConfig()``: all ``auto``) for ``model`` training on
    ``micro_batch_size`` rows of ``seq_len`` tokens on ``device`` (default: where the model is).

    The estimate: the weights on the device (``model`` loaded there, or its share of ``world_size`` under FSDP; an
    input embedding an earlier :func:`apply` keeps on the host counts as there), the
    checkpointed layer inputs (``checkpointed layers x tokens x hidden x bytes``), one layer's working set in its
    recompute and backward (``tokens x hidden x 16 + MLP tokens x intermediate x 6`` elements, plus one layer's
    dense weights with ``keep_dense_for_backward``), and the device's free and total memory
    (``torch.cuda.mem_get_info``). ``auto`` then picks:

    - ``offload_activations``: on (CUDA, checkpointing) when the checkpointed inputs exceed :data:`OFFLOAD_SHARE` of
      the memory left after the weights, or rows have at least :data:`OFFLOAD_MIN_ROW_TOKENS` tokens;
    - ``mlp_chunk_tokens``: :data:`MLP_CHUNK_TOKENS` when a micro-batch has more than :data:`MLP_CHUNK_MIN_TOKENS`
      tokens, else off;
    - memory-bound (weights + on-device activations + working set > :data:`PRESSURE_SHARE` of the device):
      ``embeddings_on_cpu`` on (where allowed: one device, a frozen untied embedding), and
      ``keep_dense_for_backward`` off (``keep_dense_for_backward``: the current setting; None = leave it).

    ``strategy``: ``single``, ``ddp`` or ``fsdp`` (FSDP shards the embedding: host embeddings are refused).

    Raises:
        ConfigError: a value a feature cannot take, ``offload_activations: on`` without gradient checkpointing,
            ``embeddings_on_cpu: on`` where the embedding cannot move (the message says why).
    """
    config = config or MemoryConfig()
    offload_choice, embed_choice, chunk_choice, optimizer_choice = _check_config(config)
    device = torch.device(device) if device is not None else _device_of(model)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    dims = _model_dims(model)
    embed = input_embedding(model)
    weight = getattr(embed, "weight", None)
    dtype_bytes = weight.element_size() if isinstance(weight, torch.Tensor) and weight.is_floating_point() else 2
    ckpt_layers = len(checkpointed_layers(model))
    tokens = micro_batch_size * seq_len if seq_len else 0
    ckpt_inputs = ckpt_layers * tokens * dims["hidden"] * dtype_bytes

    on_device, all_bytes = _bytes_on(model, device)
    host_table = _host_table_bytes(model)
    if device.type == "cuda" and on_device == 0:  # not placed yet (FSDP loads on the CPU): its share
        on_device = (all_bytes + host_table) // max(1, world_size) if strategy == "fsdp" else all_bytes + host_table
        placed = False
    else:
        on_device += host_table
        placed = True
    free = total = None
    if device.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
    left = None if free is None else (free if placed else free - on_device)

    result = MemoryPlan()
    reasons = result.reasons

    # mlp_chunk_tokens
    if chunk_choice is None:
        if tokens > MLP_CHUNK_MIN_TOKENS:
            result.mlp_chunk_tokens = MLP_CHUNK_TOKENS
            reasons["mlp_chunk_tokens"] = f"auto: {tokens} tokens per micro-batch > {MLP_CHUNK_MIN_TOKENS}"
        else:
            reasons["mlp_chunk_tokens"] = (
                f"auto: {tokens} tokens per micro-batch <= {MLP_CHUNK_MIN_TOKENS}" if tokens else "auto: no workload"
            )
    else:
        result.mlp_chunk_tokens = chunk_choice
        reasons["mlp_chunk_tokens"] = "set"

    # offload_activations
    ckpt_text = f"checkpointed inputs {_gib(ckpt_inputs)}"
    if offload_choice == "on":
        if ckpt_layers == 0:
            raise ConfigError(
                "memory.offload_activations: on moves the inputs of gradient-checkpointed layers to host memory, but "
                "no layer is checkpointed; set train.gradient_checkpointing: true (or offload_activations: auto/off)"
            )
        result.offload_activations = True
        reasons["offload_activations"] = f"set; {ckpt_text}"
        if device.type != "cuda":
            reasons["offload_activations"] += f"; no effect on {device.type}"
    elif offload_choice == "off":
        reasons["offload_activations"] = "set"
    elif ckpt_layers == 0:
        reasons["offload_activations"] = "auto: no gradient checkpointing"
    elif device.type != "cuda":
        reasons["offload_activations"] = f"auto: {device.type} has no device memory to save"
    elif left is not None and ckpt_inputs > OFFLOAD_SHARE * left:
        result.offload_activations = True
        reasons["offload_activations"] = f"auto: {ckpt_text} > {OFFLOAD_SHARE:.0%} of {_gib(left)} left"
    elif seq_len and seq_len >= OFFLOAD_MIN_ROW_TOKENS:
        result.offload_activations = True
        reasons["offload_activations"] = f"auto: {seq_len} tokens per row >= {OFFLOAD_MIN_ROW_TOKENS}"
    else:
        reasons["offload_activations"] = f"auto: {ckpt_text}" + (f" of {_gib(left)} left" if left is not None else "")

    # memory pressure
    mlp_tokens = min(tokens, result.mlp_chunk_tokens) if result.mlp_chunk_tokens else tokens
    working = (tokens * dims["hidden"] * 16 + mlp_tokens * dims["intermediate"] * 6) * dtype_bytes
    keeps_dense = keep_dense_for_backward if keep_dense_for_backward is not None else True
    dense = _layer_dense_bytes(model, dtype_bytes, dims["layers"]) if keeps_dense else 0
    resident = (2 * ckpt_inputs // max(1, ckpt_layers)) if result.offload_activations else ckpt_inputs
    optimizer_state = 2 * _trainable_bytes(model)  # AdamW's exp_avg and exp_avg_sq (gradients: in `working`'s margin)
    needed = on_device + resident + working + dense + optimizer_state
    pressure = total is not None and needed > PRESSURE_SHARE * total
    pressure_text = (
        f"weights {_gib(on_device)} + activations {_gib(resident + working + dense)} + optimizer state "
        f"{_gib(optimizer_state)} "
        f"{'>' if pressure else '<='} {PRESSURE_SHARE:.0%} of {_gib(total)}"
        if total is not None
        else "no device memory figure"
    )

    # embeddings_on_cpu
    refusal = host_embedding_refusal(model)
    if refusal is None and strategy == "fsdp":
        refusal = "train.strategy: fsdp shards the embedding with the other parameters"
    no_gain = None  # allowed, but nothing to save
    if device.type != "cuda" and not host_embeddings_enabled(model):
        no_gain = f"the model computes on {device.type}, already host memory"
    if embed_choice == "on":
        if refusal is not None:
            raise ConfigError(
                f"memory.embeddings_on_cpu: on cannot be used: {refusal}; set embeddings_on_cpu: auto/off"
            )
        result.embeddings_on_cpu = True
        reasons["embeddings_on_cpu"] = "set" + (f"; {no_gain}" if no_gain else "")
    elif embed_choice == "off":
        reasons["embeddings_on_cpu"] = "set"
    elif refusal is not None or no_gain is not None:
        reasons["embeddings_on_cpu"] = f"auto: {refusal or no_gain}"
    else:
        result.embeddings_on_cpu = pressure
        reasons["embeddings_on_cpu"] = f"auto: {pressure_text}"

    # optimizer_on_cpu
    optimizer_refusal = "train.strategy: fsdp shards the optimizer state" if strategy == "fsdp" else None
    if optimizer_choice == "on":
        if optimizer_refusal is not None:
            raise ConfigError(
                f"memory.optimizer_on_cpu: on cannot be used: {optimizer_refusal}; set optimizer_on_cpu: auto/off"
            )
        result.optimizer_on_cpu = True
        reasons["optimizer_on_cpu"] = "set" + ("" if device.type == "cuda" else f"; no effect on {device.type}")
    elif optimizer_choice == "off":
        reasons["optimizer_on_cpu"] = "set"
    elif optimizer_refusal is not None:
        reasons["optimizer_on_cpu"] = f"auto: {optimizer_refusal}"
    elif device.type != "cuda":
        reasons["optimizer_on_cpu"] = f"auto: {device.type} has no device memory to save"
    else:
        result.optimizer_on_cpu = pressure
        reasons["optimizer_on_cpu"] = f"auto: {pressure_text}"

    if pressure and keep_dense_for_backward:
        result.keep_dense_for_backward = False
        reasons["keep_dense_for_backward"] = f"auto: {pressure_text}"

    result.estimate = {
        "device": str(device),
        "tokens_per_micro_batch": tokens,
        "checkpointed_layers": ckpt_layers,
        "checkpointed_inputs_bytes": ckpt_inputs,
        "weights_on_device_bytes": on_device,
        "working_set_bytes": working + dense,
        "optimizer_state_bytes": optimizer_state,
        "device_free_bytes": free,
        "device_total_bytes": total,
        "memory_bound": bool(pressure),
    }
    return result


def apply(
    model: nn.Module,
    config: MemoryConfig | MemoryPlan | None = None,
    *,
    micro_batch_size: int = 1,
    seq_len: int | None = None,
    strategy: str = "single",
    world_size: int = 1,
    offload_min_bytes: int = DEFAULT_MIN_BYTES,
    **features: Any,
) -> dict[str, Any]:
    """Switch the memory features on ``model`` as ``config`` says: a :class:`MemoryPlan`, or a
    :class:`MemoryConfig` (default: all ``auto``; ``features`` named like its fields override it) that :func:`plan`
    resolves for the workload (``micro_batch_size`` rows of ``seq_len`` tokens). Every feature the plan does not
    switch on is switched off, so a second call replaces the first. Logs the plan's line (INFO).

    Returns the report: the plan (``plan``: its dict, ``summary``: its line) and what was done: ``offloaded_layers``,
    ``embeddings_on_cpu``, ``chunked_mlps``, ``keep_dense_switched_off`` (INT4 layers, when the plan turned it off).
    """
    if isinstance(config, MemoryPlan):
        if features:
            raise ConfigError("memory.apply: pass features with a MemoryConfig, not with a MemoryPlan")
        chosen = config
    else:
        unknown = sorted(set(features) - {f.name for f in dataclasses.fields(MemoryConfig)})
        if unknown:
            raise ConfigError(
                f"memory.apply: unknown feature(s) {unknown}; the features are "
                f"{[f.name for f in dataclasses.fields(MemoryConfig)]}"
            )
        config = dataclasses.replace(config or MemoryConfig(), **features)
        keep_dense = any(m.keep_dense_for_backward for m in model.modules() if isinstance(m, Int4Linear))
        chosen = plan(
            model,
            micro_batch_size,
            seq_len,
            config=config,
            strategy=strategy,
            world_size=world_size,
            keep_dense_for_backward=keep_dense,
        )
    report: dict[str, Any] = {"plan": chosen.to_dict(), "summary": chosen.summary()}
    # A feature that cannot be switched on raises before anything changes: a failed call leaves the model as it was.
    if chosen.offload_activations and not checkpointed_layers(model):
        raise ConfigError(
            "memory.offload_activations: activation offloading needs gradient checkpointing: no checkpointed decoder "
            "layer found; set train.gradient_checkpointing: true"
        )
    refusal = host_embedding_refusal(model) if chosen.embeddings_on_cpu else None
    if refusal is not None:
        raise ConfigError(f"memory.embeddings_on_cpu: {refusal}; set embeddings_on_cpu: auto/off")

    disable_activation_offload(model)
    report["offloaded_layers"] = 0
    if chosen.offload_activations:
        report["offloaded_layers"] = len(enable_activation_offload(model, min_bytes=offload_min_bytes).layers)

    if chosen.embeddings_on_cpu:
        enable_host_embeddings(model, device=_compute_device(model))
    else:
        disable_host_embeddings(model)
    report["embeddings_on_cpu"] = host_embeddings_enabled(model)

    disable_chunked_mlp(model)
    report["chunked_mlps"] = enable_chunked_mlp(model, chosen.mlp_chunk_tokens) if chosen.mlp_chunk_tokens else 0

    if chosen.keep_dense_for_backward is False:
        layers = [m for m in model.modules() if isinstance(m, Int4Linear) and m.keep_dense_for_backward]
        for module in layers:
            module.keep_dense_for_backward = False
        report["keep_dense_switched_off"] = len(layers)
    logger.info("%s", chosen.summary())
    return report


def optimizer_class(memory_plan: MemoryPlan | None) -> type[torch.optim.Optimizer]:
    """The AdamW class a run with ``memory_plan`` trains with: :class:`~.host_optimizer.HostAdamW` when the plan
    puts the optimizer on the host, else :class:`torch.optim.AdamW`."""
    if memory_plan is not None and memory_plan.optimizer_on_cpu:
        return HostAdamW
    return torch.optim.AdamW


def _trainable_bytes(model: nn.Module) -> int:
    """Bytes of the trainable parameters (the LoRA tensors; fp32 with PEFT's defaults)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def _compute_device(model: nn.Module) -> torch.device:
    """Where the model computes: the device of its first parameter outside the input embedding."""
    embed = input_embedding(model)
    skip = {id(p) for p in embed.parameters()} if embed is not None else set()
    for param in model.parameters():
        if id(param) not in skip and param.device.type != "meta":
            return param.device
    return _device_of(model)


__all__ = [
    "HostAdamW",
    "MemoryConfig",
    "MemoryPlan",
    "activation_offloader",
    "apply",
    "chunked_mlp_tokens",
    "host_embeddings_enabled",
    "optimizer_class",
    "plan",
]
