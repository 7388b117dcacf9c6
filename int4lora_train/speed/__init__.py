"""Training-step speed: one call, :func:`apply`, switches each optimisation of a PEFT model (INT4 or not) on or off.

::

    model = get_peft_model(load_int4_model(path), lora_config)
    prepare_for_training(model, gradient_checkpointing=True)           # the core: frozen base, checkpointing
    report = speed.apply(model)                                        # every feature of SpeedConfig(), the defaults
    loss = model(input_ids=..., labels=..., num_items_in_batch=...).loss     # as before; logits are None

    speed.apply(model, SpeedConfig(fused_kernels="on"))                 # every feature as given
    speed.apply(model, fused_lora=False, chunked_loss=False)           # only those named; the rest stays as it is

What each feature does and what it was measured to give (Llama-3.1-8B shape, seq 2048, H100; BENCHMARKS.md,
"Training step"); each is exact up to summation order:

- ``fused_lora``: one autograd node per LoRA'd INT4 projection (``Int4LoraLinear.fused_lora``, the node is
  :class:`~int4lora_train.modeling.lora_layer.Int4LoraFunction`); on by default even without this call.
- ``keep_dense_for_backward``: the dense weight dequantized in a checkpoint recompute serves its backward
  (``Int4Linear.keep_dense_for_backward``); on by default even without this call.
- ``lean_recompute``: a checkpoint recompute skips the MLP down projection's output, which nothing it keeps reads
  (Llama-like layers; :mod:`.lean_recompute`).
- ``group_projections``: q/k/v and gate/up as one node each (:mod:`.projection_groups`); needs ``fused_lora``.
- ``fused_dropout_backward``: with LoRA dropout, the fused nodes' backward computes the dropout's part of the input
  and ``A`` gradients in one pass over the ``[T, in]`` tensors each (Triton, CUDA:
  :mod:`int4lora_train.kernels.lora_dropout`; ``Int4LoraLinear.fused_dropout_backward``). fp32 accumulation with
  one rounding, so not bit-identical to the torch ops it replaces (it rounds less). On by default: the product's
  step on an H200 went from 0.707 to 0.686 s at 4 x 2048 tokens, 0.37 GiB less peak memory (BENCHMARKS.md).
  Elsewhere (the CPU) the torch ops run as without it.
- ``fused_dropout_forward``: with LoRA dropout, the fused nodes draw the members' masks and compute their ``A``
  projections in one Triton pass that reads the input once (:func:`~int4lora_train.modeling.lora_layer.dropped_projection`;
  CUDA, ``in_features`` a multiple of 4), instead of one ``native_dropout`` copy per member and a matmul over it.
  The masks come from the kernel's own Philox stream (a checkpoint's recompute redraws them alike), so a run draws
  other masks than with it off. Off by default: measured slower than torch's dropout on an H200 (BENCHMARKS.md).
- ``chunked_loss`` / ``loss_chunk_size``: the loss without full fp32 logits (:mod:`.chunked_loss`); models it does
  not support keep their own loss (logged).
- ``fused_kernels``: Triton RMSNorm and SwiGLU (:mod:`.fused_ops`); ``"auto"`` uses them for inputs of at least
  :data:`~int4lora_train.speed.fused_ops.AUTO_MIN_ELEMENTS` elements, where the step is GPU-bound.
- ``fused_rope``: transformers' ``apply_rotary_pos_emb`` as one Triton kernel for q and k each way
  (:mod:`.fused_rope`; bit-identical). On by default: the product's step on an H200 went from 0.676 to 0.629 s at
  4 x 2048 tokens (the ~55 ms per step of broadcast multiplies, slices and concatenations it replaces; BENCHMARKS.md);
  patches the modeling module's function, reference-counted per model.
- ``cuda_graphs``: each checkpointed decoder layer's forward and recompute + backward captured once as CUDA graphs
  and replayed (:mod:`.layer_graphs`; bit-identical): ``"auto"`` (on where they can run: CUDA, gradient
  checkpointing, no activation offloading, no INT4 unpacker cache), ``"on"`` (an error where they cannot), ``"off"``.
  Call it last: features that replace the layers' checkpoint function (activation offloading) must come first.
- ``packed_attention``: attention over rows of several segments (packing; padding in batches of several rows)
  without a 4-D mask, on the flash varlen kernel (:mod:`.varlen_attention`): ``"varlen"``, ``"mask"`` (transformers'
  block-causal mask) or ``"auto"``: varlen where the rows hold several segments (``apply``'s ``packed``) and the
  kernel runs (CUDA, bf16/fp16), else mask. Switches ``config._attn_implementation``.

Call it after ``get_peft_model`` (the LoRA layers must exist) and before wrapping the model for DDP / FSDP.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

from int4lora_train.errors import ConfigError, UnsupportedFormatError
from int4lora_train.modeling.int4_linear import Int4Linear
from int4lora_train.modeling.lora_layer import Int4LoraLinear
from int4lora_train.speed.chunked_loss import disable_chunked_loss, enable_chunked_loss
from int4lora_train.speed.fused_ops import disable_fused_kernels, enable_fused_kernels
from int4lora_train.speed.fused_rope import disable_fused_rope, enable_fused_rope
from int4lora_train.speed.layer_graphs import set_layer_graphs
from int4lora_train.speed.lean_recompute import set_lean_recompute
from int4lora_train.speed.projection_groups import find_projection_groups
from int4lora_train.speed.varlen_attention import PACKED_ATTENTION_CHOICES, set_packed_attention

logger = logging.getLogger(__name__)

AUTO_CHOICES = ("auto", "on", "off", True, False)
"""What ``fused_kernels`` and ``cuda_graphs`` take."""


@dataclass(frozen=True)
class SpeedConfig:
    """The training-step optimisations (see the module docstring); the defaults are the recommended setup."""

    fused_lora: bool = True
    keep_dense_for_backward: bool = True
    lean_recompute: bool = True
    group_projections: bool = True
    fused_dropout_backward: bool = True
    fused_dropout_forward: bool = False  # measured slower than torch's dropout on an H200 (BENCHMARKS.md)
    chunked_loss: bool = True
    loss_chunk_size: int | None = None  # tokens per loss chunk; None: chosen from the vocabulary size
    fused_kernels: bool | str = "auto"  # "auto", "on" / True, "off" / False
    fused_rope: bool = True
    packed_attention: str = "auto"  # "auto", "varlen", "mask"
    cuda_graphs: bool | str = "auto"  # "auto", "on" / True, "off" / False


FEATURES = tuple(f.name for f in dataclasses.fields(SpeedConfig))
SWITCHES = tuple(f.name for f in dataclasses.fields(SpeedConfig) if f.type == "bool")
"""The features that are plain on/off switches (true or false)."""
LORA_LAYER_SWITCHES = ("fused_lora", "fused_dropout_backward", "fused_dropout_forward")
"""The switches that are attributes of each ``Int4LoraLinear`` of the same name."""


def apply(
    model: nn.Module,
    config: SpeedConfig | None = None,
    *,
    packed: bool = True,
    device: Any = None,
    dtype: Any = None,
    **features: Any,
) -> dict[str, Any]:
    """Switch the features of ``config`` (default ``SpeedConfig()`` when no keyword is given) on ``model``, with
    ``features`` (keywords named like :class:`SpeedConfig`'s fields) overriding them; without ``config`` only the
    features named change. Returns what was done, for logging: the LoRA and INT4 layer counts, plus ``groups``,
    ``lean_recompute`` (down projections marked), ``chunked_loss``, ``rmsnorm`` / ``swiglu``, ``fused_rope`` (modeling
    modules patched for the model), ``packed_attention`` (``"varlen"`` or ``"mask"``), ``cuda_graphs`` (whether the
    layers are graphed) for the features that were set.

    ``packed``, ``device``, ``dtype`` inform ``packed_attention="auto"``: whether the batches hold several segments
    per row, and where and in which dtype the model computes (default: its first parameter's device, its dtype).
    """
    unknown = sorted(set(features) - set(FEATURES))
    if unknown:
        raise ConfigError(f"speed.apply: unknown feature(s) {unknown}; the features are {list(FEATURES)}")
    if config is None and not features:
        config = SpeedConfig()
    features = {**(dataclasses.asdict(config) if config is not None else {}), **features}
    _check(features)

    report: dict[str, Any] = {"lora_layers": 0, "int4_layers": 0}
    if "group_projections" in features:
        report["groups"] = _set_projection_groups(model, features["group_projections"])
    for module in model.modules():
        if isinstance(module, Int4LoraLinear):
            for name in LORA_LAYER_SWITCHES:
                if name in features:
                    setattr(module, name, features[name])
            report["lora_layers"] += 1
        elif isinstance(module, Int4Linear):
            if "keep_dense_for_backward" in features:
                module.keep_dense_for_backward = features["keep_dense_for_backward"]
            report["int4_layers"] += 1
    if "lean_recompute" in features:
        report["lean_recompute"] = set_lean_recompute(model, features["lean_recompute"])
    if "chunked_loss" in features:
        report["chunked_loss"] = _set_chunked_loss(model, features["chunked_loss"], features.get("loss_chunk_size"))
    if "fused_kernels" in features:
        disable_fused_kernels(model)
        choice = {"on": True, "off": False}.get(features["fused_kernels"], features["fused_kernels"])
        report.update(rmsnorm=0, swiglu=0)
        if choice is not False:
            report.update(enable_fused_kernels(model, min_elements="auto" if choice == "auto" else 0))
    if "fused_rope" in features:
        disable_fused_rope(model)
        report["fused_rope"] = len(enable_fused_rope(model)) if features["fused_rope"] else 0
    if "packed_attention" in features:
        report["packed_attention"] = set_packed_attention(
            model, features["packed_attention"], packed=packed, device=device, dtype=dtype
        )
    if "cuda_graphs" in features:
        report["cuda_graphs"] = set_layer_graphs(model, features["cuda_graphs"], device=device)
    logger.info("training-step speed features: %s", report)
    return report


def _check(features: dict[str, Any]) -> None:
    """ConfigError for a value a feature cannot take (the message names the feature and what it accepts)."""
    for name in SWITCHES:
        if name in features and not isinstance(features[name], bool):
            raise ConfigError(f"{name} must be true or false, got {features[name]!r}")
    chunk = features.get("loss_chunk_size")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ConfigError(f"loss_chunk_size must be a positive integer or null (auto), got {chunk!r}")
    if chunk is not None and "chunked_loss" not in features:
        raise ConfigError("loss_chunk_size is set with chunked_loss: pass chunked_loss=True too")
    for name in ("fused_kernels", "cuda_graphs"):
        value = features.get(name, "auto")
        if not isinstance(value, bool | str) or value not in AUTO_CHOICES:
            raise ConfigError(f"{name} must be one of 'auto', 'on', 'off', true, false; got {value!r}")
    if "packed_attention" in features and features["packed_attention"] not in PACKED_ATTENTION_CHOICES:
        raise ConfigError(
            f"packed_attention must be one of {', '.join(PACKED_ATTENTION_CHOICES)}; got {features['packed_attention']!r}"
        )
    if features.get("group_projections") and features.get("fused_lora") is False:
        raise ConfigError("group_projections needs fused_lora: true (or set group_projections: false)")


def _set_projection_groups(model: nn.Module, enabled: bool) -> int:
    """Form (or, with False, dissolve) the q/k/v and gate/up groups of ``model``; returns the groups formed."""
    for module in model.modules():
        if isinstance(module, Int4LoraLinear):
            module.lora_group = None
    if not enabled:
        return 0
    groups = find_projection_groups(model)
    for group in groups:
        for member in group.members:
            member.lora_group = group
    return len(groups)


def _set_chunked_loss(model: nn.Module, enabled: bool, chunk_size: int | None) -> bool:
    """Patch (or restore) the causal LM's loss; returns whether the chunked loss is in effect."""
    disable_chunked_loss(model)
    if not enabled:
        return False
    try:
        enable_chunked_loss(model, chunk_size=chunk_size)
    except UnsupportedFormatError as exc:
        logger.warning("chunked loss not used: %s", exc)
        return False
    return True
