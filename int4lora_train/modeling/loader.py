"""Load an INT4 checkpoint directory into a transformers model with :class:`Int4Linear` layers, never holding a dense
copy of a quantized weight.

::

    config.json ──► quantization_config ──► Int4CheckpointConfig (compressed-tensors / gptq / awq)
         │
         └─► config without quantization_config ──► skeleton on the meta device (transformers builds no quantizer)
    shard headers ──► CheckpointDir: every tensor's file, shape, dtype ──► plan: INT4 modules and their tensors
                      (quant/checkpoint_dir.py)                             (the format registry names them), dense
                                                                            tensors; missing / unexpected /
                                                                            mis-shaped tensors are errors before
                                                                            any data is read
    shards, one tensor at a time ──► INT4 module complete? ──► Int4Weight ──► Int4Linear on the target device
                                └──► dense tensor (embeddings, norms, lm_head, biases) ──► `dtype`, target device
    tie weights, check nothing is left on the meta device, attach the report and the quantization config.

Nothing dense is made from an INT4 weight, and no shard is ever held whole: tensors are read one at a time and each
module's INT4 tensors are converted as soon as the last one arrives. On the CPU, tensors that need no conversion
(compressed-tensors' ``weight_packed`` viewed as bytes, scales, dense tensors already in ``dtype``) stay memory-mapped
from the shards, copy-on-write, as safetensors returns them; so peak host memory is about the checkpoint's size
(``benchmarks/loader_memory.py``: 1.09x for a Llama-3.1-8B-shaped W4A16 checkpoint). On a GPU every tensor is copied to
the device and its mapping released. Only safetensors are read unless ``allow_pickle=True``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn

from int4lora_train.errors import CheckpointError, UnsupportedFormatError, check_model_dir
from int4lora_train.modeling import moe
from int4lora_train.modeling.architectures import check_loadable_architecture
from int4lora_train.modeling.int4_linear import Int4Linear
from int4lora_train.modeling.surgery import (
    ConvertedModule,
    DenseModule,
    SurgeryReport,
    converted_entry,
    dense_reason,
    make_cache,
)
from int4lora_train.quant import dequant_at_load
from int4lora_train.quant.checkpoint_config import Int4CheckpointConfig, read_checkpoint_quant_config
from int4lora_train.quant.checkpoint_dir import CheckpointDir, module_and_local
from int4lora_train.quant.formats import checkpoint_formats, format_named, read_int4_weight
from int4lora_train.quant.scheme import WeightScheme

logger = logging.getLogger(__name__)

_ALWAYS_IGNORED_UNEXPECTED = (r"\.rotary_emb\.inv_freq$",)
"""Old Llama-family checkpoints saved the rotary buffer; transformers ignores it too."""


@dataclass(frozen=True)
class _Int4Plan:
    """One INT4 module to load: its scheme and its tensors' checkpoint keys (local tensor name -> key)."""

    name: str
    scheme: WeightScheme
    keys: dict[str, str]
    group: str = ""


@dataclass(frozen=True)
class DequantizedModule:
    """One 8-bit (int8 / FP8) linear of a mixed-precision checkpoint, dequantized at load into a frozen nn.Linear."""

    name: str
    group: str
    scheme: str
    stored_bytes: int
    dense_bytes: int


def load_int4_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    mode: str = "on_the_fly",
    cache_max_bytes: int | None = None,
    compute_dtype: torch.dtype | None = None,
    strict: bool = True,
) -> transformers.PreTrainedModel:
    """A causal LM from an INT4 checkpoint directory, its INT4 linears as :class:`Int4Linear` on ``device``.

    ``dtype`` is for everything dense (embeddings, norms, lm_head, biases); INT4 scales keep the checkpoint's dtype
    (the dequantized values are defined in it). ``mode``: ``"on_the_fly"`` or ``"cache"`` (a dense-weight cache of
    ``cache_max_bytes``). ``strict=False`` turns unexpected extra tensors into a warning. The model comes back in eval
    mode with ``model.int4_report`` (a :class:`SurgeryReport`), ``model.int4_checkpoint_config`` (the parsed
    quantization config; ``.to_dict()`` is the original block) and ``model.int4_checkpoint_dir``.
    """
    check_model_dir(path)
    directory = Path(path)
    config_path = directory / "config.json"
    quant_config = read_checkpoint_quant_config(directory, required=True)
    try:
        hf_config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise UnsupportedFormatError(
            f"{config_path} names custom model code (auto_map) that transformers would have to run; it is off unless "
            "you trust this checkpoint: set model.trust_remote_code: true (load_int4_model(..., "
            "trust_remote_code=True)), or use a checkpoint of an architecture transformers ships."
        ) from None
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config  # or transformers would set up its own (dequantizing) quantizer

    model = _build_skeleton(hf_config, dtype, trust_remote_code)
    check_loadable_architecture(model, str(config_path))
    checkpoint = moe.rename_checkpoint(model, CheckpointDir.open(directory, allow_pickle))
    expert_plans = moe.plan_experts(model, quant_config, checkpoint, config_path)  # MoE: {} for dense models
    plans, dense_keys = _plan(model, quant_config, checkpoint, config_path, strict, expert_plans)

    device = torch.device(device)
    report = SurgeryReport(mode=mode)
    cache = make_cache(mode, cache_max_bytes)
    dequantized: list[DequantizedModule] = []
    for entry in _load_tensors(
        model, checkpoint, plans, dense_keys, device, dtype, compute_dtype, cache, config_path, expert_plans
    ):
        (dequantized if isinstance(entry, DequantizedModule) else report.converted).append(entry)
    _log_dequantized(dequantized, dtype)

    model.tie_weights()
    model.to(device)  # non-persistent buffers (rotary inv_freq) were built on the CPU
    _check_materialised(model, directory, checkpoint.where)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    report.converted.sort(key=lambda m: order[m.name])  # model order, not shard order
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not isinstance(module, Int4Linear):
            report.left_dense.append(
                DenseModule(name, dense_reason(name, module, quant_config), tuple(module.weight.shape))
            )
    _load_generation_config(model, directory)
    model.eval()
    model.int4_report = report
    model.int4_checkpoint_config = quant_config
    model.int4_checkpoint_dir = str(directory)
    model.int4_dequantized_modules = dequantized
    logger.info("loaded %s\n%s", directory, report.summary())
    return model


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer stored in the checkpoint directory."""
    check_model_dir(path, key="model.tokenizer or model.path", need_config=False)
    try:
        return transformers.AutoTokenizer.from_pretrained(Path(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: no loadable tokenizer ({exc}); save one into the checkpoint directory "
            "(tokenizer.save_pretrained(path)) or load it from its own path."
        ) from exc


# --------------------------------------------------------------------------------------------------- skeleton


def _build_skeleton(hf_config, dtype: torch.dtype, trust_remote_code: bool) -> transformers.PreTrainedModel:
    """The model with parameters on the meta device (buffers such as rotary ``inv_freq`` stay real)."""
    from accelerate import init_empty_weights

    dtype_kwarg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    with init_empty_weights():
        return transformers.AutoModelForCausalLM.from_config(
            hf_config, trust_remote_code=trust_remote_code, **{dtype_kwarg: dtype}
        )


# ------------------------------------------------------------------------------------------------------ tensors


def _load_tensors(model, checkpoint, plans, dense_keys, device, dtype, compute_dtype, cache, config_path, expert_plans):
    """Read the checkpoint tensor by tensor (shard by shard, in file order) into ``model``; yield a report entry per
    INT4 module, converted as soon as its last tensor is read. Each dense tensor is its own request; an experts
    module (all its experts' INT4 tensors) is one."""
    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    requests = {name: plan.keys for name, plan in plans.items()}
    requests.update({name: plan.keys for name, plan in expert_plans.items()})
    requests.update({key: {module_and_local(key)[1]: key} for key in dense_keys if key in checkpoint.catalog})
    for name, tensors in checkpoint.iter_module_tensors(requests):
        plan = plans.get(name)
        if name in expert_plans:
            experts = moe.install_experts(model, expert_plans[name], tensors, device, compute_dtype)
            yield moe.experts_report_entry(name, expert_plans[name], experts)
        elif plan is not None and plan.scheme.dequantize:
            yield _install_dequantized(model, plan, tensors, device, dtype, config_path)
        elif plan is not None:
            yield _install_int4(model, plan, tensors, device, compute_dtype, cache, config_path)
        else:
            target_dtype = torch.float32 if _keep_in_fp32(name, keep_fp32) else dtype
            (tensor,) = tensors.values()
            _set_dense(model, name, tensor, device, target_dtype)


# -------------------------------------------------------------------------------------------------------- plan


def _plan(
    model: nn.Module,
    quant_config: Int4CheckpointConfig,
    checkpoint: CheckpointDir,
    config_path: Path,
    strict: bool,
    expert_plans: Mapping,
) -> tuple[dict[str, _Int4Plan], set[str]]:
    """Match the checkpoint's tensors to the skeleton: INT4 modules (with their tensors) and dense keys.

    Raises :class:`CheckpointError` for missing tensors, dense tensors whose shape contradicts config.json, INT4
    tensors where the config expects none (or the reverse) and, with ``strict``, unexpected tensors.
    """
    catalog, where = checkpoint.catalog, checkpoint.where
    stored = checkpoint.modules()
    int4_names = {local for fmt in checkpoint_formats() for local in fmt.tensor_names}
    plans: dict[str, _Int4Plan] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        group = quant_config.group_for(name, module)
        if group is None:
            continue
        scheme = group.scheme
        own = stored.get(name, {})
        if scheme.dequantize:
            names, required = dequant_at_load.TENSOR_NAMES, dequant_at_load.required_tensor_names(scheme)
        else:
            fmt = format_named(scheme.format)
            names, required = fmt.tensor_names, fmt.required_tensor_names(scheme)
        plan = _Int4Plan(name, scheme, {local: key for local, key in own.items() if local in names}, group.name)
        for local in required:
            if local not in plan.keys:
                if scheme.dequantize:
                    raise CheckpointError(
                        f"missing tensor {name}.{local} of module {name} (config group {group.name}: "
                        f"{scheme.describe()}, dequantized at load): not found in {where}; the checkpoint is "
                        "incomplete or its quantization_config does not describe it."
                    )
                if f"{name}.weight" in catalog:
                    raise CheckpointError(
                        f"{catalog[name + '.weight'].file}: {name} is stored dense ({name}.weight), but "
                        f"{config_path} quantizes it ({quant_config.quant_method}); add it to the config's ignore "
                        "list (modules_to_not_convert for GPTQ / AWQ) or re-export the checkpoint."
                    )
                raise CheckpointError(
                    f"missing tensor {name}.{local} of INT4 module {name} ({scheme.format}"
                    f"{'' if scheme.symmetric else ', asymmetric'}): not found in {where}; the checkpoint is "
                    "incomplete or its quantization_config does not describe it."
                )
        plans[name] = plan

    int4_keys = {key for plan in [*plans.values(), *expert_plans.values()] for key in plan.keys.values()}
    dense_expected = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        module_name, local = module_and_local(key)
        if module_name in plans and local == "weight":
            continue
        if module_name in expert_plans and local in ("gate_up_proj", "down_proj"):
            continue
        dense_expected[key] = tensor
    tied = _tied_keys(model)
    missing = [key for key in dense_expected if key not in catalog and key not in tied and _is_persistent(model, key)]
    if missing:
        raise CheckpointError(
            f"missing tensor(s) {missing[:5]}{' and more' if len(missing) > 5 else ''} ({len(missing)} in all): not "
            f"found in {where}, but the model built from {config_path} needs them."
        )
    for key, tensor in dense_expected.items():
        info = catalog.get(key)
        if info is not None and tuple(info.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{info.file}: {key} has shape {list(info.shape)}, but {config_path} builds it as "
                f"{list(tensor.shape)}; the config and the weights are from different models."
            )

    ignorable = [
        re.compile(p)
        for p in (*(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()), *_ALWAYS_IGNORED_UNEXPECTED)
    ]
    unexpected = [
        key
        for key in catalog
        if key not in int4_keys and key not in dense_expected and not any(p.search(key) for p in ignorable)
    ]
    stray_int4 = [key for key in unexpected if module_and_local(key)[1] in int4_names]
    if stray_int4:
        module_name = module_and_local(stray_int4[0])[0]
        module = _find_module(model, module_name)
        why = (
            f"the quantization config ({config_path}) does not quantize {module_name}"
            if isinstance(module, nn.Linear)
            else f"the model built from {config_path} has no linear layer {module_name}"
        )
        raise CheckpointError(
            f"{catalog[stray_int4[0]].file}: unexpected INT4 tensor(s) {stray_int4[:4]}: {why}; the checkpoint and "
            "its config.json disagree."
        )
    if unexpected:
        message = (
            f"{where}: unexpected tensor(s) {unexpected[:5]}{' and more' if len(unexpected) > 5 else ''} "
            f"({len(unexpected)} in all) that the model built from {config_path} has no place for"
        )
        if strict:
            raise CheckpointError(message + "; pass strict=False to skip them.")
        logger.warning("%s; skipped", message)
    return plans, set(dense_expected)


def _tied_keys(model: nn.Module) -> set[str]:
    """Parameter names that tie_weights() fills from another (when the config ties embeddings)."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return set()
    tied = getattr(model, "_tied_weights_keys", None) or ()
    return set(tied.keys() if isinstance(tied, Mapping) else tied)


def _is_persistent(model: nn.Module, key: str) -> bool:
    module_name, local = module_and_local(key)
    module = model.get_submodule(module_name) if module_name else model
    return local not in getattr(module, "_non_persistent_buffers_set", ())


def _find_module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


# ------------------------------------------------------------------------------------------------------- install


def _install_int4(model, plan: _Int4Plan, tensors, device, compute_dtype, cache, config_path: Path) -> ConvertedModule:
    """Convert one module's complete INT4 tensors and put an Int4Linear in its place."""
    weight = read_int4_weight(tensors, plan.name, plan.scheme)
    module = model.get_submodule(plan.name)
    if (weight.out_features, weight.in_features) != (module.out_features, module.in_features):
        raise CheckpointError(
            f"{plan.name}: the INT4 weight is [{weight.out_features}, {weight.in_features}] (out, in), but "
            f"{config_path} builds this layer as [{module.out_features}, {module.in_features}]; the config and the "
            "weights are from different models."
        )
    weight = weight.to(device)
    new = Int4Linear(weight, bias=module.bias, compute_dtype=compute_dtype, cache=cache, cache_key=plan.name)
    parent_name, _, child = plan.name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return converted_entry(plan.name, plan.scheme.format, weight)


def _install_dequantized(model, plan: _Int4Plan, tensors, device, dtype, config_path: Path) -> DequantizedModule:
    """Dequantize one 8-bit module once into its (frozen) nn.Linear weight, in the model's dtype; record the digest
    of its stored tensors for the base fingerprint (export/fingerprint.py)."""
    weight = dequant_at_load.dequantize_stored(tensors, plan.scheme, plan.name, dtype)
    module = model.get_submodule(plan.name)
    if tuple(weight.shape) != (module.out_features, module.in_features):
        raise CheckpointError(
            f"{plan.name}: the stored weight is {list(weight.shape)} (out, in), but {config_path} builds this layer "
            f"as [{module.out_features}, {module.in_features}]; the config and the weights are from different models."
        )
    module._parameters["weight"] = nn.Parameter(weight.to(device), requires_grad=False)
    module.int4lora_stored_digest = dequant_at_load.stored_digest(tensors)
    module.int4lora_dequantized_from = f"{plan.group}: {plan.scheme.describe()}"
    return DequantizedModule(
        plan.name,
        plan.group,
        plan.scheme.describe(),
        sum(t.numel() * t.element_size() for t in tensors.values()),
        weight.numel() * weight.element_size(),
    )


def _log_dequantized(modules: list[DequantizedModule], dtype: torch.dtype) -> None:
    """One INFO line per config group that was dequantized at load."""
    by_group: dict[tuple[str, str], list[DequantizedModule]] = {}
    for module in modules:
        by_group.setdefault((module.group, module.scheme), []).append(module)
    for (group, scheme), members in by_group.items():
        logger.info(
            "config group %s (%s): %d linear(s) dequantized at load to %s nn.Linear (%.2f MiB stored -> %.2f MiB dense)",
            group,
            scheme,
            len(members),
            str(dtype).removeprefix("torch."),
            sum(m.stored_bytes for m in members) / 2**20,
            sum(m.dense_bytes for m in members) / 2**20,
        )


def _set_dense(model: nn.Module, key: str, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
    """Replace the meta parameter / buffer ``key`` by ``tensor`` (floating tensors cast to ``dtype``)."""
    module_name, local = module_and_local(key)
    module = model.get_submodule(module_name) if module_name else model
    value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
    if local in module._parameters:
        old = module._parameters[local]
        module._parameters[local] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)
    else:
        module._buffers[local] = value


def _keep_in_fp32(key: str, keep: set[str]) -> bool:
    return bool(keep) and any(name in key.split(".") for name in keep)


def _check_materialised(model: nn.Module, directory: Path, where: Path) -> None:
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(
            f"{directory}: tensor(s) {left[:5]} were not found in {where} and could not be tied; the checkpoint is "
            "incomplete."
        )


def _load_generation_config(model, directory: Path) -> None:
    if (directory / "generation_config.json").exists():
        try:
            model.generation_config = transformers.GenerationConfig.from_pretrained(directory)
        except (OSError, ValueError) as exc:
            logger.warning("%s: generation_config.json not loaded (%s)", directory, exc)
