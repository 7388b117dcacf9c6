"""How a checkpoint's modules are quantized, as parsed from its ``quantization_config`` block: one
:class:`WeightScheme` per group of modules, the targets and ignore lists that say which modules a group covers, and
the matching rules (compressed-tensors'). Format-independent: each format's parser (``quant/formats/``) builds these.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from int4lora_train.errors import CheckpointError

STRATEGIES = ("group", "channel", "tensor")
CT_FORMAT = "pack-quantized"
"""compressed-tensors' name of its INT4 packing (a config group's ``format``)."""
PACKED_INT4 = "packed INT4"
DEQUANTIZED_AT_LOAD = "dequantized at load"
REFUSED = "refused"
"""How the toolkit treats a config group (``int4lora-train inspect`` prints it)."""


@dataclass(frozen=True)
class WeightScheme:
    """How one module's INT4 weight is stored.

    ``format`` is the name of its format (``quant/formats/``). ``group_size`` is ``None`` for the channel and tensor
    strategies (one scale column per row). ``checkpoint_format`` is ``"pack-quantized"`` (compressed-tensors),
    ``"gptq"`` / ``"gptq_v2"`` (the GPTQ zero-point convention) or ``"gemm"`` (AWQ). ``actorder`` is ``"group"``
    when the checkpoint carries a ``g_idx`` permutation.

    ``dequantize`` marks a weight-only 8-bit group of a mixed-precision compressed-tensors checkpoint (``type``
    ``"int"`` or ``"float"`` (FP8), ``checkpoint_format`` ``pack-quantized`` / ``int-quantized`` / ``float-quantized``
    / ``naive-quantized``): the loader dequantizes it once into a frozen ``nn.Linear`` (:mod:`..dequant_at_load`)
    instead of keeping it packed.
    """

    format: str = "compressed-tensors"
    group_size: int | None = 128
    symmetric: bool = True
    strategy: str = "group"
    actorder: str | None = None
    checkpoint_format: str = CT_FORMAT
    num_bits: int = 4
    type: str = "int"
    dequantize: bool = False

    @property
    def treatment(self) -> str:
        """``"packed INT4"`` or ``"dequantized at load"``."""
        return DEQUANTIZED_AT_LOAD if self.dequantize else PACKED_INT4

    def describe(self) -> str:
        """E.g. ``"int8 channel sym (pack-quantized)"`` or ``"float8 tensor sym (float-quantized)"``."""
        strategy = f"group {self.group_size}" if self.strategy == "group" else self.strategy
        kind = "fp" if self.type == "float" else "int"
        sym = "sym" if self.symmetric else "asym"
        order = ", actorder" if self.actorder else ""
        return f"{kind}{self.num_bits} {strategy} {sym}{order} ({self.checkpoint_format})"


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
        group = self.group_for(module_name, module_or_class_name)
        return group.scheme if group is not None else None

    def group_for(self, module_name: str, module_or_class_name: torch.nn.Module | str) -> TargetGroup | None:
        """The config group of the module called ``module_name`` (see :meth:`scheme_for`)."""
        class_names = _class_names(module_or_class_name)
        if any(_matches(module_name, class_names, entry) for entry in self.ignore):
            return None
        for group in self.groups:
            if any(_matches(module_name, class_names, entry) for entry in group.targets):
                return group
        return None

    @property
    def default_scheme(self) -> WeightScheme:
        """The scheme of the first group (all of them, for GPTQ / AWQ)."""
        return self.groups[0].scheme

    def to_dict(self) -> dict:
        """The block as it appears in ``config.json`` (a deep copy)."""
        return copy.deepcopy(dict(self.raw))


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


# ------------------------------------------------------------------------------------------ the block's JSON types

_INT_FIELDS = ("group_size", "num_bits", "bits")
_BOOL_FIELDS = ("symmetric", "sym", "desc_act", "zero_point", "lm_head", "dynamic")
_OBJECT_FIELDS = ("weights",)


def check_block_types(block: Mapping, source: str) -> None:
    """Raise :class:`CheckpointError` naming the key, its value and the fix when a ``quantization_config`` block has
    the wrong JSON types (a config group that is not an object, ``group_size: "32"``, ...): what each format's
    parser assumes, checked once here so that no parser fails with an ``AttributeError`` / ``TypeError``."""
    where = f"{source}: quantization_config"
    _check_fields(block, where)
    groups = block.get("config_groups")
    if groups is not None and not isinstance(groups, Mapping):
        raise CheckpointError(
            f"{where}.config_groups is {_shown(groups)}; it must be an object mapping group names to "
            '{"targets": [...], "weights": {...}}. Fix config.json (or re-export the checkpoint).'
        )
    for name, group in (groups or {}).items():
        gwhere = f"{where}.config_groups.{name}"
        if not isinstance(group, Mapping):
            raise CheckpointError(
                f"{gwhere} is {_shown(group)}; each config group must be an object such as "
                '{"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "group_size": 128, ...}}. '
                "Fix config.json (or re-export the checkpoint)."
            )
        targets = group.get("targets")
        if not _is_names(targets):
            raise CheckpointError(f"{gwhere}.targets is {_shown(targets)}; it must be a list of strings.")
        _check_fields(group, gwhere)
        for key in _OBJECT_FIELDS:
            if group.get(key) is not None:
                _check_fields(group[key], f"{gwhere}.{key}")
    for key in ("ignore", "modules_to_not_convert"):
        value = block.get(key)
        if not _is_names(value):
            raise CheckpointError(f"{where}.{key} is {_shown(value)}; it must be a list of module names.")


def _is_names(value: object) -> bool:
    """None, a string, or a list of strings (``targets``, ``ignore``)."""
    return (
        value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    )


def _check_fields(obj: object, where: str) -> None:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where} is {_shown(obj)}; it must be a JSON object. Fix config.json.")
    for key in _INT_FIELDS:
        value = obj.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            fix = (
                f"write it as a number: {value}"
                if isinstance(value, str) and value.lstrip("-").isdigit()
                else ("it must be an integer")
            )
            raise CheckpointError(f"{where}.{key} is {_shown(value)}; {fix} (in config.json).")
    for key in _BOOL_FIELDS:
        value = obj.get(key)
        if value is not None and not isinstance(value, bool) and value not in ("true", "false"):
            raise CheckpointError(f"{where}.{key} is {_shown(value)}; it must be true or false (in config.json).")


def _shown(value: object) -> str:
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} (a {type(value).__name__})"
