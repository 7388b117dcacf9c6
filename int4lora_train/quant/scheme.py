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

STRATEGIES = ("group", "channel", "tensor")
CT_FORMAT = "pack-quantized"
"""compressed-tensors' name of its INT4 packing (a config group's ``format``)."""


@dataclass(frozen=True)
class WeightScheme:
    """How one module's INT4 weight is stored.

    ``format`` is the name of its format (``quant/formats/``). ``group_size`` is ``None`` for the channel and tensor
    strategies (one scale column per row). ``checkpoint_format`` is ``"pack-quantized"`` (compressed-tensors),
    ``"gptq"`` / ``"gptq_v2"`` (the GPTQ zero-point convention) or ``"gemm"`` (AWQ). ``actorder`` is ``"group"``
    when the checkpoint carries a ``g_idx`` permutation.
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
