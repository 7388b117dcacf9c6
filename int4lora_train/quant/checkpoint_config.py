"""The ``quantization_config`` block of a checkpoint's ``config.json``: parse it, match modules to it, write it.

Three writers' blocks are understood (FORMATS.md §1.5, §3.4, §4.3):

- ``"compressed-tensors"`` (llm-compressor): ``config_groups`` of ``{targets, weights, input_activations, ...}``
  plus a top-level ``ignore``; only ``pack-quantized`` INT4 weights (W4A16, W4A16_ASYM, channel / tensor
  variants, ``actorder``) are supported.
- ``"gptq"`` (AutoGPTQ / GPTQModel / optimum): ``bits``, ``group_size``, ``desc_act``, ``sym``,
  ``checkpoint_format`` / ``format`` (``gptq`` = v1 zero-minus-one, ``gptq_v2``).
- ``"awq"`` (AutoAWQ): ``bits``, ``group_size``, ``zero_point``, ``version`` / ``format`` (only ``gemm``).

Everything else (8-bit, float / FP4 types, sparse or Marlin-2:4 layouts, activation quantization, transforms) is an
:class:`UnsupportedFormatError` that says what was found and what is supported.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from int4lora_train.errors import CheckpointError, UnsupportedFormatError

logger = logging.getLogger(__name__)

QUANT_METHODS = ("compressed-tensors", "gptq", "awq")
STRATEGIES = ("group", "channel", "tensor")
GPTQ_FORMATS = ("gptq", "gptq_v2")
CT_FORMAT = "pack-quantized"
CT_BLOCK_VERSION = "0.20.0"
"""The compressed-tensors release whose ``quantization_config`` layout :func:`compressed_tensors_config` mimics."""

_SUPPORTED = (
    "supported: compressed-tensors pack-quantized INT4 weights (W4A16 / W4A16_ASYM; group, channel or tensor "
    "strategy) with unquantized activations, GPTQ 4-bit (gptq / gptq_v2) and AWQ 4-bit GEMM"
)


@dataclass(frozen=True)
class WeightScheme:
    """How one module's INT4 weight is stored.

    ``group_size`` is ``None`` for the channel and tensor strategies (one scale column per row). ``checkpoint_format``
    is ``"pack-quantized"`` (compressed-tensors), ``"gptq"`` / ``"gptq_v2"`` (the GPTQ zero-point convention) or
    ``"gemm"`` (AWQ). ``actorder`` is ``"group"`` when the checkpoint carries a ``g_idx`` permutation.
    """

    format: str = "compressed-tensors"
    group_size: int | None = 128
    symmetric: bool = True
    strategy: str = "group"
    actorder: str | None = None
    checkpoint_format: str = CT_FORMAT
    num_bits: int = 4


@dataclass(frozen=True)
class TargetGroup:
    """One ``config_groups`` entry: the modules it targets and their scheme."""

    name: str
    targets: tuple[str, ...]
    scheme: WeightScheme


@dataclass(frozen=True)
class Int4CheckpointConfig:
    """A parsed, supported ``quantization_config`` block."""

    quant_method: str
    groups: tuple[TargetGroup, ...]
    ignore: tuple[str, ...] = ()
    source: str = "config.json"
    raw: Mapping = field(default_factory=dict, compare=False, repr=False)

    def scheme_for(self, module_name: str, module_or_class_name: torch.nn.Module | str) -> WeightScheme | None:
        """The scheme of the module called ``module_name`` (None when it is ignored or not targeted).

        Matching follows compressed-tensors: a target or ignore entry matches the module's class name (or that of
        any base class; ``"Linear"`` also matches vLLM's ``LinearBase``), its exact name, or, with a ``re:`` prefix,
        ``re.match`` against its name. The first group whose targets match wins.
        """
        class_names = _class_names(module_or_class_name)
        if any(_matches(module_name, class_names, entry) for entry in self.ignore):
            return None
        for group in self.groups:
            if any(_matches(module_name, class_names, entry) for entry in group.targets):
                return group.scheme
        return None

    @property
    def default_scheme(self) -> WeightScheme:
        """The scheme of the first group (all of them, for GPTQ / AWQ)."""
        return self.groups[0].scheme

    def to_dict(self) -> dict:
        """The block as it appears in ``config.json`` (a deep copy)."""
        return copy.deepcopy(dict(self.raw))


def parse_quantization_config(block: Mapping | object, source: str = "config.json") -> Int4CheckpointConfig:
    """Parse a ``quantization_config`` block (a dict, or a transformers config object with ``to_dict()``).

    ``source`` names where the block came from (a path) for error messages.
    """
    if not isinstance(block, Mapping):
        to_dict = getattr(block, "to_dict", None)
        if to_dict is None:
            raise CheckpointError(f"{source}: quantization_config must be a JSON object, got {type(block).__name__}.")
        block = to_dict()
    method = block.get("quant_method")
    if method not in QUANT_METHODS:
        raise UnsupportedFormatError(
            f"{source}: quantization_config.quant_method is {method!r}; {_SUPPORTED} "
            f"(quant_method one of {list(QUANT_METHODS)})."
        )
    parser = {"compressed-tensors": _parse_compressed_tensors, "gptq": _parse_gptq, "awq": _parse_awq}[method]
    return parser(dict(block), source)


def read_checkpoint_quant_config(directory: str | Path) -> Int4CheckpointConfig | None:
    """Parse ``<directory>/config.json``'s ``quantization_config``; None when the model is not quantized."""
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: no config.json; is {directory} a checkpoint directory?") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}).") from exc
    block = config.get("quantization_config")
    if block is None:
        return None
    return parse_quantization_config(block, source=str(path))


# --------------------------------------------------------------------------------------------- compressed-tensors


def _parse_compressed_tensors(block: dict, source: str) -> Int4CheckpointConfig:
    where = f"{source}: quantization_config"
    status = block.get("quantization_status")
    if status is not None and status != "compressed":
        raise UnsupportedFormatError(
            f'{where}.quantization_status is {status!r}; only packed checkpoints ("compressed") are supported. '
            "Save the model with llm-compressor / compressed-tensors compression enabled."
        )
    for key in ("sparsity_config", "transform_config"):
        if block.get(key):
            raise UnsupportedFormatError(
                f"{where}.{key} is set ({_short(block[key])}); sparse and transformed (rotated) weights are not "
                f"supported; {_SUPPORTED}."
            )
    if block.get("kv_cache_scheme"):
        logger.warning("%s.kv_cache_scheme is set; it only affects vLLM's attention cache and is ignored here", where)
    top_format = block.get("format")
    groups_block = block.get("config_groups") or {}
    if not isinstance(groups_block, Mapping) or not groups_block:
        raise CheckpointError(f"{where}.config_groups is missing or empty; the checkpoint names no quantized modules.")
    groups = []
    for group_name, group in groups_block.items():
        gwhere = f"{where}.config_groups.{group_name}"
        fmt = group.get("format") or top_format
        if fmt in (None, "mixed-precision"):
            fmt = CT_FORMAT if top_format in (None, "mixed-precision") else top_format
        if fmt != CT_FORMAT:
            raise UnsupportedFormatError(
                f"{gwhere}: format {fmt!r} is not supported ({_format_hint(fmt)}); {_SUPPORTED}."
            )
        for activation in ("input_activations", "output_activations"):
            if group.get(activation):
                raise UnsupportedFormatError(
                    f"{gwhere}.{activation} is set ({_short(group[activation])}): activation quantization (W4A8 / "
                    f"W8A8) is not supported; only weight-only INT4 (W4A16). {_SUPPORTED}."
                )
        weights = group.get("weights")
        if not weights:
            raise UnsupportedFormatError(f"{gwhere}: no weights quantization; {_SUPPORTED}.")
        targets = group.get("targets") or []
        if isinstance(targets, str):
            targets = [targets]
        if not targets:
            raise CheckpointError(f"{gwhere}.targets is empty; the group applies to no module.")
        groups.append(TargetGroup(str(group_name), tuple(targets), _ct_weight_scheme(weights, f"{gwhere}.weights")))
    ignore = block.get("ignore") or []
    if isinstance(ignore, str):
        ignore = [ignore]
    return Int4CheckpointConfig("compressed-tensors", tuple(groups), tuple(ignore), source, copy.deepcopy(block))


def _ct_weight_scheme(weights: Mapping, where: str) -> WeightScheme:
    """QuantizationArgs of the weights -> WeightScheme, following compressed-tensors' strategy inference."""
    kind = weights.get("type", "int")
    num_bits = weights.get("num_bits", 8)  # compressed-tensors' default
    if kind != "int":
        raise UnsupportedFormatError(
            f"{where}: type {kind!r} with {num_bits} bits (a float / FP4 / FP8 format) is not supported; {_SUPPORTED}."
        )
    if num_bits != 4:
        raise UnsupportedFormatError(
            f"{where}: num_bits is {num_bits}, only 4-bit weights are supported; {_SUPPORTED}."
        )
    if weights.get("dynamic") not in (None, False, "false"):
        raise UnsupportedFormatError(
            f"{where}: dynamic={weights['dynamic']!r}; weights must be statically quantized; {_SUPPORTED}."
        )
    group_size = weights.get("group_size")
    strategy = weights.get("strategy")
    if strategy is None:
        strategy = "tensor" if group_size is None else "group" if group_size > 0 else "channel"
    if strategy not in STRATEGIES:
        raise UnsupportedFormatError(
            f"{where}: strategy {strategy!r} is not supported; choose one of {list(STRATEGIES)}. {_SUPPORTED}."
        )
    if strategy == "group":
        if not isinstance(group_size, int) or group_size <= 0:
            raise UnsupportedFormatError(f"{where}: strategy 'group' needs a positive group_size, got {group_size!r}.")
    else:
        group_size = None
    actorder = weights.get("actorder")
    # "dynamic" and true are compressed-tensors' aliases of "group" (a g_idx is stored); "weight" / "static" only
    # change the calibration order and store nothing.
    actorder = {True: "group", "dynamic": "group", "group": "group", "static": None, "weight": None}.get(actorder)
    return WeightScheme(
        format="compressed-tensors",
        group_size=group_size,
        symmetric=bool(weights.get("symmetric", True)),
        strategy=strategy,
        actorder=actorder,
        checkpoint_format=CT_FORMAT,
    )


def _format_hint(fmt: str | None) -> str:
    if fmt is None:
        return "no format given"
    if "fp4" in fmt or "mxfp" in fmt:
        return "a floating-point FP4/MX format"
    if fmt == "marlin-24":
        return "a 2:4-sparse Marlin layout"
    if "sparse" in fmt:
        return "a sparse format"
    if fmt in ("int-quantized", "naive-quantized", "float-quantized"):
        return "unpacked 8-bit storage"
    return "unknown to this toolkit"


# ------------------------------------------------------------------------------------------------------ GPTQ / AWQ


def _parse_gptq(block: dict, source: str) -> Int4CheckpointConfig:
    where = f"{source}: quantization_config (gptq)"
    bits = block.get("bits", 4)
    if bits != 4:
        raise UnsupportedFormatError(f"{where}: bits is {bits}, only 4-bit GPTQ is supported; {_SUPPORTED}.")
    # GPTQModel / transformers 5 write "format"; AutoGPTQ / optimum wrote "checkpoint_format".
    fmt = block.get("format") or block.get("checkpoint_format") or "gptq"
    if fmt not in GPTQ_FORMATS:
        raise UnsupportedFormatError(
            f"{where}: format {fmt!r} is not supported (a Marlin / BitBLAS / other repacked layout); use "
            f"{list(GPTQ_FORMATS)}. {_SUPPORTED}."
        )
    group_size = _group_size_or_channel(block.get("group_size", 128), where)
    desc_act = bool(block.get("desc_act", False))
    scheme = WeightScheme(
        format="gptq",
        group_size=group_size,
        symmetric=bool(block.get("sym", True)),
        strategy="group" if group_size else "channel",
        actorder="group" if desc_act else None,
        checkpoint_format=fmt,
    )
    ignore = list(block.get("modules_to_not_convert") or [])
    if not block.get("lm_head", False):
        ignore.append("lm_head")  # GPTQ writers quantize the decoder blocks only unless told "lm_head": true
    group = TargetGroup("gptq", ("Linear",), scheme)
    return Int4CheckpointConfig("gptq", (group,), tuple(dict.fromkeys(ignore)), source, copy.deepcopy(block))


def _parse_awq(block: dict, source: str) -> Int4CheckpointConfig:
    where = f"{source}: quantization_config (awq)"
    bits = block.get("bits", block.get("w_bit", 4))
    if bits != 4:
        raise UnsupportedFormatError(f"{where}: bits is {bits}, only 4-bit AWQ is supported; {_SUPPORTED}.")
    version = str(block.get("format") or block.get("version") or "gemm").lower()
    if version != "gemm":
        raise UnsupportedFormatError(
            f"{where}: version/format {version!r} is not supported (GEMV, Marlin and ExLlama AWQ layouts are "
            f"repacked differently); only 'gemm'. {_SUPPORTED}."
        )
    if block.get("zero_point") is False:
        raise UnsupportedFormatError(
            f"{where}: zero_point is false, which AWQ GEMM cannot export (it requires zero points); {_SUPPORTED}."
        )
    group_size = _group_size_or_channel(block.get("group_size", block.get("q_group_size", 128)), where)
    scheme = WeightScheme(
        format="awq",
        group_size=group_size,
        symmetric=False,
        strategy="group" if group_size else "channel",
        checkpoint_format="gemm",
    )
    ignore = list(block.get("modules_to_not_convert") or []) + ["lm_head"]
    group = TargetGroup("awq", ("Linear",), scheme)
    return Int4CheckpointConfig("awq", (group,), tuple(dict.fromkeys(ignore)), source, copy.deepcopy(block))


def _group_size_or_channel(group_size, where: str) -> int | None:
    if group_size in (-1, None):
        return None
    if not isinstance(group_size, int) or group_size <= 0:
        raise UnsupportedFormatError(f"{where}: group_size must be a positive integer or -1, got {group_size!r}.")
    return group_size


# --------------------------------------------------------------------------------------------------------- writers


def compressed_tensors_config(
    group_size: int | None = 128,
    symmetric: bool = True,
    strategy: str = "group",
    ignore: Iterable[str] = ("lm_head",),
    targets: Iterable[str] = ("Linear",),
) -> dict:
    """The ``quantization_config`` block compressed-tensors 0.20's ``ModelCompressor.update_config`` writes.

    ``strategy``: ``"group"`` (needs ``group_size``), ``"channel"`` or ``"tensor"``.
    """
    if strategy not in STRATEGIES:
        raise UnsupportedFormatError(f"strategy {strategy!r} is not supported; choose one of {list(STRATEGIES)}.")
    if strategy == "group" and (not isinstance(group_size, int) or group_size <= 0):
        raise UnsupportedFormatError(f"strategy 'group' needs a positive group_size, got {group_size!r}.")
    weights = {
        "dynamic": False,
        "group_size": group_size if strategy == "group" else None,
        "num_bits": 4,
        "strategy": strategy,
        "symmetric": bool(symmetric),
        "type": "int",
    }
    return {
        "config_groups": {
            "group_0": {
                "format": CT_FORMAT,
                "input_activations": None,
                "output_activations": None,
                "targets": list(targets),
                "weights": weights,
            }
        },
        "format": CT_FORMAT,
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_BLOCK_VERSION,
    }


def gptq_config(
    group_size: int | None = 128,
    symmetric: bool = True,
    checkpoint_format: str = "gptq",
    desc_act: bool = False,
    ignore: Iterable[str] = (),
) -> dict:
    """A GPTQ block as GPTQModel writes it (both ``format`` and the legacy ``checkpoint_format`` keys)."""
    if checkpoint_format not in GPTQ_FORMATS:
        raise UnsupportedFormatError(
            f"GPTQ checkpoint_format must be one of {list(GPTQ_FORMATS)}, got {checkpoint_format!r}."
        )
    block = {
        "bits": 4,
        "group_size": group_size if group_size else -1,
        "desc_act": bool(desc_act),
        "sym": bool(symmetric),
        "true_sequential": True,
        "lm_head": False,
        "quant_method": "gptq",
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "pack_dtype": "int32",
    }
    extra = [name for name in ignore if name != "lm_head"]
    if extra:
        block["modules_to_not_convert"] = extra
    return block


def awq_config(group_size: int | None = 128, ignore: Iterable[str] = ()) -> dict:
    """An AutoAWQ GEMM block (``to_transformers_dict``)."""
    extra = [name for name in ignore if name != "lm_head"]
    return {
        "quant_method": "awq",
        "zero_point": True,
        "group_size": group_size if group_size else -1,
        "bits": 4,
        "version": "gemm",
        "modules_to_not_convert": extra or None,
    }


# ----------------------------------------------------------------------------------------------------- matching


def _class_names(module_or_class_name: torch.nn.Module | str | type) -> tuple[str, ...]:
    if isinstance(module_or_class_name, str):
        return (module_or_class_name,)
    cls = module_or_class_name if isinstance(module_or_class_name, type) else type(module_or_class_name)
    return tuple(c.__name__ for c in cls.__mro__)


def _matches(module_name: str, class_names: tuple[str, ...], entry: str) -> bool:
    if entry.startswith("re:"):
        return re.match(entry[3:], module_name) is not None
    if entry == module_name:
        return True
    return entry in class_names or (entry == "Linear" and "LinearBase" in class_names)


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 120 else text[:117] + "..."
