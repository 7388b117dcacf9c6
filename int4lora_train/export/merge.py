"""Merged exports: the LoRA folded into the weights, as a dense checkpoint or re-quantized to W4A16.

::

    W_merged = dequant(W4) + sum over active adapters of  scaling * B @ A          fp32, [out, in]

- :func:`merge_to_dense` writes ``W_merged`` (in ``dtype``, bf16 by default) as an ordinary transformers checkpoint:
  exact up to that final rounding, about 4x the size of the INT4 base.
- :func:`merge_to_w4a16` re-quantizes ``W_merged`` with round-to-nearest at the base's group size (the toolkit's
  packer) into a compressed-tensors ``pack-quantized`` checkpoint that vLLM serves without LoRA. Re-quantization
  moves the weights again, so the outputs are no longer those the adapter was trained for; the function measures
  how much on a prompt set (max and mean |logit change| against the INT4 base + adapter) and reports it.

Both stream one module at a time into safetensors shards (never a whole dense model in memory), write to a
temporary sibling directory and rename it into place.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from int4lora_train.atomic import atomic_directory, resolve_path
from int4lora_train.errors import ExportError
from int4lora_train.quant.layout import INT4_TENSOR_NAMES
from int4lora_train.quant.packer import ShardWriter

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Question: What is the capital of France?\nAnswer:",
    "In 1905, Albert Einstein published four papers that",
)
"""Prompts for the re-quantization error when the caller gives none (mixed prose, code, Q&A)."""


@dataclass(frozen=True)
class MergedTensor:
    """One tensor of the merged model: its state-dict ``key``, the ``tensor`` and whether it is the weight of a
    linear that was INT4 in the base (and is re-quantized by :func:`merge_to_w4a16`)."""

    key: str
    tensor: torch.Tensor
    int4: bool = False


@dataclass
class MergeReport:
    """What :func:`merge_to_w4a16` wrote and the error re-quantization added (logits of the written checkpoint
    against the INT4 base + adapter, on ``num_tokens`` positions of ``num_prompts`` prompts)."""

    out_dir: Path
    group_size: int | None
    symmetric: bool
    num_requantized: int
    max_logit_change: float | None = None
    mean_logit_change: float | None = None
    top1_agreement: float | None = None
    num_prompts: int = 0
    num_tokens: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"Merged W4A16 checkpoint: {self.out_dir} ({self.num_requantized} linears re-quantized, "
            f"RTN {'group ' + str(self.group_size) if self.group_size else 'per-channel'}, "
            f"{'symmetric' if self.symmetric else 'asymmetric'})"
        ]
        if self.max_logit_change is not None:
            lines.append(
                f"  re-quantization error vs INT4 base + adapter on {self.num_prompts} prompts / {self.num_tokens} "
                f"positions: max |dlogit| {self.max_logit_change:.4g}, mean |dlogit| {self.mean_logit_change:.4g}, "
                f"top-1 agreement {100 * self.top1_agreement:.1f}%"
            )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the merged stream


def _walk(base: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """``(name, kind, module)`` for the modules that own the merged model's tensors, in state-dict order.

    ``kind``: ``"lora"`` (a LoRA layer; its base layer and adapters are not visited again), ``"modules_to_save"``,
    ``"trainable_tokens"``, ``"int4"`` (an unwrapped Int4Linear) or ``"plain"`` (any other module's own tensors).
    """
    from peft.tuners.lora.layer import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper

    from int4lora_train.modeling.int4_linear import Int4Linear

    done: list[str] = []
    for name, module in base.named_modules():
        if any(name.startswith(p) for p in done):
            continue
        kind = _kind(module, LoraLayer, ModulesToSaveWrapper, TrainableTokensWrapper, Int4Linear)
        if kind in ("lora", "modules_to_save", "trainable_tokens"):
            done.append(f"{name}.")
        yield name, kind, module


def _kind(module: nn.Module, lora, modules_to_save, trainable_tokens, int4) -> str:
    if isinstance(module, trainable_tokens):
        return "trainable_tokens"
    if isinstance(module, modules_to_save):
        return "modules_to_save"
    if isinstance(module, lora):
        return "lora"
    if isinstance(module, int4):
        return "int4"
    return "plain"


def linear_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """``(INT4 linears, dense linears)`` of the merged model, by the base model's module names."""
    from int4lora_train.modeling.int4_linear import Int4Linear

    int4, dense = [], []
    for name, kind, module in _walk(_base_model(model)):
        layer = module.get_base_layer() if kind == "lora" else getattr(module, "original_module", module)
        if isinstance(layer, Int4Linear):
            int4.append(name)
        elif isinstance(layer, nn.Linear):
            dense.append(name)
    return int4, dense


def iter_merged_tensors(model: nn.Module, adapter_names: Sequence[str] | None = None) -> Iterator[MergedTensor]:
    """The merged model's state, one tensor at a time, under the base model's own state-dict keys.

    ``model``: a ``PeftModel`` (or the transformers model with LoRA layers inside) whose base holds ``Int4Linear``
    and/or dense layers. ``adapter_names``: the adapters to merge (default: the active ones). LoRA variants other
    than plain LoRA (DoRA, ...) and trainable-token wrappers are refused; ``modules_to_save`` copies are written in
    place of the original module. Tied weights are written once (the first key), like transformers does.
    """
    from int4lora_train.modeling.int4_linear import Int4Linear

    adapters = list(adapter_names) if adapter_names is not None else _active_adapters(model)
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, kind, module in _walk(_base_model(model)):
        prefix = f"{name}." if name else ""
        if kind == "trainable_tokens":
            raise ExportError(
                f"{name}: trainable tokens (trainable_token_indices) cannot be merged by this export; train without "
                "them or target the embedding with LoRA."
            )
        if kind == "modules_to_save":
            chosen = next((module.modules_to_save[a] for a in adapters if a in module.modules_to_save), None)
            for key, tensor in (chosen or module.original_module).state_dict(prefix=prefix).items():
                yield MergedTensor(key, tensor.detach())
        elif kind == "lora":
            base_layer = module.get_base_layer()
            yield MergedTensor(
                f"{prefix}weight", _merged_weight(module, name, adapters), isinstance(base_layer, Int4Linear)
            )
            for key, tensor in _own_tensors(base_layer, prefix, skip=("weight",) + INT4_TENSOR_NAMES):
                yield MergedTensor(key, tensor)
        elif kind == "int4":
            yield MergedTensor(f"{prefix}weight", module.dequantize(torch.float32), True)
            for key, tensor in _own_tensors(module, prefix, skip=INT4_TENSOR_NAMES):
                yield MergedTensor(key, tensor)
        else:
            for key, tensor in _own_tensors(module, prefix):
                identity = (tensor.data_ptr(), tuple(tensor.shape))
                if tensor.numel() and identity in seen:
                    continue  # tied to a tensor already written (lm_head <- embed_tokens)
                seen.add(identity)
                yield MergedTensor(key, tensor)


def _merged_weight(layer: nn.Module, name: str, adapters: Sequence[str]) -> torch.Tensor:
    """fp32 ``dequant(base) + sum(get_delta_weight(adapter))`` of one LoRA layer, ``[out, in]``."""
    weight = _dense_weight(layer.get_base_layer(), name)
    for adapter in adapters:
        if adapter not in layer.lora_A and adapter not in layer.lora_embedding_A:
            continue
        if layer.lora_variant.get(adapter) is not None or layer.use_dora.get(adapter):
            raise ExportError(f"{name}: adapter {adapter!r} is a LoRA variant (e.g. DoRA); only plain LoRA is merged.")
        if layer.lora_bias.get(adapter):
            raise ExportError(f"{name}: adapter {adapter!r} has lora_bias=True, which this export does not merge.")
        delta = layer.get_delta_weight(adapter).to(device=weight.device, dtype=torch.float32)
        if delta.shape != weight.shape:
            raise ExportError(
                f"{name}: LoRA delta {tuple(delta.shape)} does not match the base weight {tuple(weight.shape)}."
            )
        weight = weight + delta
    return weight


def _own_tensors(module: nn.Module, prefix: str, skip: Sequence[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """The module's own parameters and persistent buffers (what its state_dict holds at this level)."""
    from int4lora_train.quant.formats import module_tensors

    for name, tensor in module_tensors(module).items():
        if name not in skip and name not in module._non_persistent_buffers_set:
            yield f"{prefix}{name}", tensor.detach()


def _dense_weight(layer: nn.Module, name: str) -> torch.Tensor:
    """The base layer's weight as fp32 ``[out, in]`` (INT4 layers dequantized bit-exactly first)."""
    dequantize = getattr(layer, "dequantize", None)
    if callable(dequantize) and hasattr(layer, "packed"):
        return dequantize(torch.float32)
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ExportError(f"{name}: {type(layer).__name__} has no weight this export can merge into.")
    return weight.detach().to(torch.float32)


def _base_model(model: nn.Module) -> nn.Module:
    from int4lora_train.modeling.peft_integration import unwrap_peft  # PEFT only once a model is at hand

    return unwrap_peft(model)


def _active_adapters(model: nn.Module) -> list[str]:
    active = getattr(model, "active_adapters", None)
    if callable(active):  # transformers' PreTrainedModel.active_adapters is a method
        try:
            active = active()
        except Exception:  # raises when no adapter is loaded through transformers' integration
            active = None
    if isinstance(active, str):
        return [active]
    return list(active or ["default"])


# --------------------------------------------------------------------------------------------------------- dense


def merge_to_dense(
    model: nn.Module,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    *,
    tokenizer=None,
    adapter_names: Sequence[str] | None = None,
    max_shard_bytes: int | None = 5 * 2**30,
    overwrite: bool = False,
) -> Path:
    """Write the model with its LoRA merged as a dense checkpoint in ``dtype`` that transformers loads with
    ``AutoModelForCausalLM.from_pretrained(out_dir)``; returns ``out_dir``."""
    base = _base_model(model)
    out_dir = resolve_path(out_dir)  # `..` and symlinks resolved before the ownership rule looks at it
    with atomic_directory(out_dir, overwrite, kind="merged-dense", what="merged export directory") as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for item in iter_merged_tensors(model, adapter_names):
            tensor = item.tensor.to(dtype) if item.tensor.is_floating_point() else item.tensor
            writer.add({item.key: tensor})
        writer.finish()
        config = _plain_config(base, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        _save_extras(base, tmp, tokenizer)
    logger.info("wrote the dense merged checkpoint (%s) to %s", dtype, out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------------------- W4A16


def merge_to_w4a16(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    group_size: int | None = None,
    symmetric: bool | None = None,
    tokenizer=None,
    prompts: Sequence[str] | Sequence[Sequence[int]] | None = None,
    adapter_names: Sequence[str] | None = None,
    max_shard_bytes: int | None = 5 * 2**30,
    overwrite: bool = False,
    measure: bool = True,
) -> MergeReport:
    """Re-quantize the merged weights (RTN, compressed-tensors W4A16) and measure the error that adds.

    ``group_size`` / ``symmetric`` default to the base's scheme. Every linear that was INT4 in the base is
    re-quantized with scales in the base's scale dtype; everything else (embeddings, norms, a dense ``lm_head``)
    is written in the base's dtype. With ``measure``, the written checkpoint is loaded back with the toolkit's
    loader and its logits are compared with ``model``'s on ``prompts`` (default :data:`DEFAULT_PROMPTS`, tokenized
    with ``tokenizer``, or seeded random token ids without one).
    """
    from int4lora_train.modeling.int4_linear import Int4Linear
    from int4lora_train.quant.packer import quantize_rtn, write_int4_checkpoint

    base = _base_model(model)
    int4_layers = [m for m in base.modules() if isinstance(m, Int4Linear)]
    if not int4_layers:
        raise ExportError("merge_to_w4a16 needs a model whose base holds Int4Linear layers; this one has none.")
    scheme = _base_scheme(base, int4_layers)
    strategy = scheme["strategy"] if group_size is None else "group"
    group_size = scheme["group_size"] if group_size is None else group_size
    symmetric = scheme["symmetric"] if symmetric is None else symmetric
    scale_dtype = int4_layers[0].scales.dtype
    dense_dtype = _model_dtype(base, scale_dtype)
    _, dense_linears = linear_names(model)
    count = 0

    def stream():
        nonlocal count
        for item in iter_merged_tensors(model, adapter_names):
            if item.int4:
                module = item.key.removesuffix(".weight")
                count += 1
                yield module, quantize_rtn(item.tensor.to(scale_dtype), group_size, symmetric, strategy, name=module)
            else:
                t = item.tensor
                yield item.key, t.to(dense_dtype) if t.is_floating_point() else t

    out_dir = resolve_path(out_dir)
    config = _plain_config(base, dense_dtype)
    write_int4_checkpoint(
        config,
        stream(),
        out_dir,
        format="compressed-tensors",
        group_size=group_size,
        symmetric=symmetric,
        strategy=strategy,
        ignore=tuple(dict.fromkeys(["lm_head", *dense_linears])),
        tokenizer=tokenizer,
        generation_config=getattr(base, "generation_config", None),
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
        dtype=dense_dtype,
    )
    report = MergeReport(out_dir, group_size, bool(symmetric), count)
    if scheme.get("actorder"):
        report.notes.append("the base used activation order (g_idx); the re-quantized weights use plain groups")
    if measure:
        _measure(model, out_dir, tokenizer, prompts, report)
    logger.info("%s", report.summary())
    return report


@torch.no_grad()
def _measure(model: nn.Module, out_dir: Path, tokenizer, prompts, report: MergeReport) -> None:
    from int4lora_train.modeling.loader import load_int4_model

    base = _base_model(model)
    param = next(base.parameters())
    merged = load_int4_model(out_dir, device=param.device, dtype=param.dtype)
    merged.eval()
    was_training = model.training
    model.eval()
    max_change, total, count, agree = 0.0, 0.0, 0, 0
    try:
        prompt_ids = _prompt_ids(prompts, tokenizer, base.config.vocab_size)
        for ids in prompt_ids:
            x = torch.tensor([ids], device=param.device)
            ref = model(input_ids=x).logits.float()
            got = merged(input_ids=x).logits.float()
            diff = (got - ref).abs()
            max_change = max(max_change, float(diff.max()))
            total += float(diff.mean()) * len(ids)
            count += len(ids)
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
    finally:
        model.train(was_training)
    report.max_logit_change = max_change
    report.mean_logit_change = total / max(count, 1)
    report.top1_agreement = agree / max(count, 1)
    report.num_prompts = len(prompt_ids)
    report.num_tokens = count


def _prompt_ids(prompts, tokenizer, vocab_size: int) -> list[list[int]]:
    """Token id lists: given ids as they are, strings through ``tokenizer``; default prompts otherwise."""
    if prompts is not None and len(prompts) and not isinstance(prompts[0], str):
        return [list(map(int, p)) for p in prompts]
    texts = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
    if tokenizer is not None:
        return [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    if prompts is not None:
        raise ExportError("text prompts need a tokenizer; pass tokenizer= or token id lists.")
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (32,), generator=generator).tolist() for _ in texts]


# ------------------------------------------------------------------------------------------------------- helpers


def _base_scheme(base: nn.Module, int4_layers: list) -> dict:
    """Group size / symmetry / act order of the base (from its recorded quantization config, else its layers)."""
    config = getattr(base, "int4_checkpoint_config", None)
    if config is not None:
        scheme = config.default_scheme
        return {
            "group_size": scheme.group_size,
            "symmetric": scheme.symmetric,
            "strategy": scheme.strategy,
            "actorder": scheme.actorder,
        }
    first = int4_layers[0]
    grouped = first.scales.shape[-1] > 1
    return {
        "group_size": first.group_size if grouped else None,
        "symmetric": first.zero_points is None,
        "strategy": "group" if grouped else "channel",
        "actorder": first.g_idx is not None,
    }


def _model_dtype(base: nn.Module, fallback: torch.dtype) -> torch.dtype:
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else fallback


def _plain_config(base: nn.Module, dtype: torch.dtype) -> dict:
    """The base's config.json without quantization, with its architecture and dtype; untied embeddings when LoRA
    changed one of a tied pair."""
    config = base.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(base).__name__]
    config["dtype"] = config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if config.get("tie_word_embeddings") and _embedding_has_lora(base):
        config["tie_word_embeddings"] = False
    return config


def _embedding_has_lora(base: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    wrappers = (BaseTunerLayer, AuxiliaryTrainingWrapper)
    heads = [base.get_input_embeddings(), base.get_output_embeddings()]
    return any(isinstance(m, wrappers) for m in heads if m is not None)


def _save_extras(base: nn.Module, directory: Path, tokenizer) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    generation_config = getattr(base, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
