"""Load an INT4 checkpoint directory into a transformers model with :class:`Int4Linear` layers, never holding a dense
copy of a quantized weight.

::

    config.json ──► quantization_config ──► Int4CheckpointConfig (compressed-tensors / gptq / awq)
         │
         └─► config without quantization_config ──► skeleton on the meta device (transformers builds no quantizer)
    shard headers ──► catalog: every tensor's file, shape, dtype ──► plan: INT4 modules and their tensors, dense
                                                                      tensors; missing / unexpected / mis-shaped
                                                                      tensors are errors before any data is read
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

import json
import logging
import os
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from torch import nn

from int4lora_train.errors import CheckpointError, check_model_dir
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
from int4lora_train.quant.checkpoint_config import Int4CheckpointConfig, WeightScheme, parse_quantization_config
from int4lora_train.quant.formats import CT_TENSOR_NAMES, QUANT_LINEAR_TENSOR_NAMES, read_int4_weight

logger = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
_ALWAYS_IGNORED_UNEXPECTED = (r"\.rotary_emb\.inv_freq$",)
"""Old Llama-family checkpoints saved the rotary buffer; transformers ignores it too."""

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    """Where one checkpoint tensor lives and what it is, read from its shard's header."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype | None
    offset: int = 0


@dataclass
class _Int4Plan:
    """One INT4 module to load: its scheme, its tensors' checkpoint keys, and those read so far."""

    name: str
    scheme: WeightScheme
    config_path: Path
    keys: dict[str, str] = field(default_factory=dict)  # local tensor name -> checkpoint key
    pending: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


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
    raw_config = _read_json(config_path, what="config.json")
    block = raw_config.get("quantization_config")
    if block is None:
        raise CheckpointError(
            f"{config_path}: no quantization_config, so this is not an INT4 checkpoint. Point at a compressed-tensors "
            "W4A16, GPTQ or AWQ checkpoint, or load the dense model with transformers and call quantize_model_rtn()."
        )
    quant_config = parse_quantization_config(block, source=str(config_path))
    hf_config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config  # or transformers would set up its own (dequantizing) quantizer

    model = _build_skeleton(hf_config, dtype, trust_remote_code)
    check_loadable_architecture(model, str(config_path))
    shards, index_path = find_shards(directory, allow_pickle)
    catalog = _read_catalog(shards, index_path)
    plans, dense_keys = _plan(model, quant_config, catalog, index_path or shards[0], config_path, strict)

    device = torch.device(device)
    report = SurgeryReport(mode=mode)
    cache = make_cache(mode, cache_max_bytes)
    for shard in shards:
        report.converted.extend(
            _load_shard(model, shard, catalog, plans, dense_keys, device, dtype, compute_dtype, cache)
        )
    if any(plan.pending for plan in plans.values()):  # only if a shard changed while loading
        raise CheckpointError(f"{directory}: INT4 tensors of some modules were never completed; was a shard modified?")

    model.tie_weights()
    model.to(device)  # non-persistent buffers (rotary inv_freq) were built on the CPU
    _check_materialised(model, directory, index_path or shards[0])
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


# ------------------------------------------------------------------------------------------------------ shards


def find_shards(directory: Path, allow_pickle: bool) -> tuple[list[Path], Path | None]:
    """The weight files in load order, and the index file when there is one."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory; pass an INT4 checkpoint directory.")
    index = directory / SAFE_INDEX
    if index.exists():
        return _files_from_index(index), index
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files, None
    bin_index = directory / BIN_INDEX
    bin_files = _files_from_index(bin_index) if bin_index.exists() else sorted(directory.glob("pytorch_model*.bin"))
    if bin_files:
        if not allow_pickle:
            raise CheckpointError(
                f"{directory}: only pickled weights ({', '.join(f.name for f in bin_files[:3])}) were found; "
                "unpickling can run arbitrary code, so it is off by default. Convert the checkpoint to safetensors, "
                "or pass allow_pickle=True if you trust its source."
            )
        return bin_files, bin_index if bin_index.exists() else None
    raise CheckpointError(f"{directory}: no weights found (no *.safetensors, no {SAFE_INDEX}).")


def _files_from_index(index: Path) -> list[Path]:
    weight_map = _read_json(index, what="shard index").get("weight_map")
    if not isinstance(weight_map, Mapping) or not weight_map:
        raise CheckpointError(f"{index}: no weight_map; the shard index is corrupt.")
    files = list(dict.fromkeys(index.parent / name for name in weight_map.values()))
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise CheckpointError(
            f"{index} lists shard(s) {missing} that do not exist in {index.parent}; the download is incomplete."
        )
    return files


def _read_catalog(shards: list[Path], index: Path | None) -> dict[str, TensorInfo]:
    """Every tensor's file, shape and dtype, from the shard headers (no tensor data is read)."""
    catalog: dict[str, TensorInfo] = {}
    for shard in shards:
        infos = _safetensors_header(shard) if shard.suffix == ".safetensors" else _pickle_header(shard)
        for key, info in infos.items():
            if key in catalog:
                raise CheckpointError(f"{shard}: tensor {key!r} is also stored in {catalog[key].file.name}.")
            catalog[key] = info
    if index is not None:
        weight_map = _read_json(index, what="shard index")["weight_map"]
        for key, file_name in weight_map.items():
            info = catalog.get(key)
            if info is None:
                raise CheckpointError(
                    f"{index.parent / file_name}: tensor {key!r} is missing, although {index.name} lists it in that "
                    "shard; the shard is incomplete or from another checkpoint."
                )
            if info.file.name != file_name:
                raise CheckpointError(f"{index}: lists {key!r} in {file_name} but it is stored in {info.file.name}.")
    return catalog


def _safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header (8-byte little-endian length, JSON) and check the data is all there."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header); re-download it.")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors file: the header claims {header_len} bytes but the file "
                f"has {size}; re-download it."
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc}); re-download it.") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object); re-download it.")
    data_size = size - 8 - header_len
    infos = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = meta["data_offsets"]
            shape = tuple(int(d) for d in meta["shape"])
            dtype = _SAFETENSORS_DTYPES.get(meta["dtype"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {key!r} ({exc}).") from exc
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated: tensor {key!r} ends at byte {end} of the data section but the file holds "
                f"only {data_size} data bytes; re-download the shard."
            )
        infos[key] = TensorInfo(path, shape, dtype, begin)
    return infos


def _pickle_header(path: Path) -> dict[str, TensorInfo]:
    state = _load_pickle(path)
    return {key: TensorInfo(path, tuple(t.shape), t.dtype) for key, t in state.items()}


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for a bad pickle
        raise CheckpointError(f"{path}: cannot read the pickled weights ({type(exc).__name__}: {exc}).") from exc


def _iter_shard(path: Path, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` for ``keys`` of one shard, one tensor at a time, in file order; errors name the file."""
    if path.suffix != ".safetensors":
        state = _load_pickle(path)
        for key in keys:
            yield key, state[key]
        return
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as reader:
            for key in keys:
                yield key, reader.get_tensor(key)
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises SafetensorError / OSError for damaged files
        if type(exc).__name__ in ("SafetensorError",) or isinstance(exc, OSError):
            raise CheckpointError(f"{path}: cannot read the shard ({exc}); it is corrupt or truncated.") from exc
        raise


def _load_shard(model, shard, catalog, plans, dense_keys, device, dtype, compute_dtype, cache):
    """Read one shard tensor by tensor (in file order) into ``model``; yield a report entry per INT4 module.

    ``_plan`` guarantees that every INT4 module's tensors are in the catalog; a module whose tensors span shards is
    completed in the shard holding its last tensor (the pending tensors are kept on ``plans``' entries meanwhile).
    """
    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    owner = {key: plan for plan in plans.values() for key in plan.keys.values()}
    in_shard = sorted((k for k, info in catalog.items() if info.file == shard), key=lambda k: catalog[k].offset)
    for key, tensor in _iter_shard(shard, in_shard):
        plan = owner.get(key)
        if plan is not None:
            plan.pending[key[len(plan.name) + 1 :]] = tensor
            if len(plan.pending) == len(plan.keys):
                tensors, plan.pending = plan.pending, {}
                yield _install_int4(model, plan, tensors, device, compute_dtype, cache, plan.config_path)
        elif key in dense_keys:
            target_dtype = torch.float32 if _keep_in_fp32(key, keep_fp32) else dtype
            _set_dense(model, key, tensor, device, target_dtype)


# -------------------------------------------------------------------------------------------------------- plan


def _plan(
    model: nn.Module,
    quant_config: Int4CheckpointConfig,
    catalog: Mapping[str, TensorInfo],
    where: Path,
    config_path: Path,
    strict: bool,
) -> tuple[dict[str, _Int4Plan], set[str]]:
    """Match the checkpoint's tensors to the skeleton: INT4 modules (with their tensors) and dense keys.

    Raises :class:`CheckpointError` for missing tensors, dense tensors whose shape contradicts config.json, INT4
    tensors where the config expects none (or the reverse) and, with ``strict``, unexpected tensors.
    """
    int4_names = set(CT_TENSOR_NAMES) | set(QUANT_LINEAR_TENSOR_NAMES)
    plans: dict[str, _Int4Plan] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        scheme = quant_config.scheme_for(name, module)
        if scheme is None:
            continue
        plan = _Int4Plan(name, scheme, config_path)
        for local in CT_TENSOR_NAMES if scheme.format == "compressed-tensors" else QUANT_LINEAR_TENSOR_NAMES:
            if f"{name}.{local}" in catalog:
                plan.keys[local] = f"{name}.{local}"
        for local in _required_tensors(scheme):
            if local not in plan.keys:
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

    int4_keys = {key for plan in plans.values() for key in plan.keys.values()}
    dense_expected = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        module_name, _, local = key.rpartition(".")
        if module_name in plans and local == "weight":
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
    stray_int4 = [key for key in unexpected if key.rpartition(".")[2] in int4_names]
    if stray_int4:
        module_name = stray_int4[0].rpartition(".")[0]
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


def _required_tensors(scheme: WeightScheme) -> tuple[str, ...]:
    if scheme.format == "compressed-tensors":
        required = ("weight_packed", "weight_scale", "weight_shape")
        return required if scheme.symmetric else (*required, "weight_zero_point")
    return ("qweight", "qzeros", "scales")


def _tied_keys(model: nn.Module) -> set[str]:
    """Parameter names that tie_weights() fills from another (when the config ties embeddings)."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return set()
    tied = getattr(model, "_tied_weights_keys", None) or ()
    return set(tied.keys() if isinstance(tied, Mapping) else tied)


def _is_persistent(model: nn.Module, key: str) -> bool:
    module_name, _, local = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return local not in getattr(module, "_non_persistent_buffers_set", ())


def _find_module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


# ------------------------------------------------------------------------------------------------------- install


def _install_int4(model, plan: _Int4Plan, tensors, device, compute_dtype, cache, config_path) -> ConvertedModule:
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


def _set_dense(model: nn.Module, key: str, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
    """Replace the meta parameter / buffer ``key`` by ``tensor`` (floating tensors cast to ``dtype``)."""
    module_name, _, local = key.rpartition(".")
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


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path) as f:
            value = json.load(f)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: no {what}; is {path.parent} a checkpoint directory?") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({exc}).") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object.")
    return value
