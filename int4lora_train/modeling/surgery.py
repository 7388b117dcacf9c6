"""Model surgery: replace every INT4 linear of a transformers model by :class:`Int4Linear`, in place, same names.

Recognised by their tensors (:func:`int4lora_train.quant.formats.read_module_int4_weight`), never by importing the
libraries that made them:

- ``nn.Linear`` carrying compressed-tensors parameters (``weight_packed`` / ``weight_scale`` / ``weight_shape`` /
  ``weight_zero_point`` / ``weight_g_idx``): what transformers 5.x with compressed-tensors >= 0.15 leaves before its
  first forward (its decompress-everything hook is removed here);
- the older ``CompressedLinear`` (compressed-tensors <= 0.14);
- GPTQ / AWQ quant-linear modules (``qweight`` / ``qzeros`` / ``scales`` [/ ``g_idx``]);
- a uint8 ``weight`` with ``weight_scale`` (two nibbles per byte).

Module names do not change, so PEFT adapter keys are those of the dense model. :func:`quantize_model_rtn` does the
same for a dense model, quantizing in memory with the toolkit's RTN packer (tests, the demo).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from int4lora_train.errors import CheckpointError, UnsupportedFormatError
from int4lora_train.modeling.architectures import check_no_int4_fused_experts
from int4lora_train.modeling.int4_linear import MODES, Int4Linear
from int4lora_train.quant.checkpoint_config import (
    Int4CheckpointConfig,
    compressed_tensors_config,
    parse_quantization_config,
)
from int4lora_train.quant.formats import detect_format, module_tensors, read_module_int4_weight
from int4lora_train.quant.layout import Int4Weight

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertedModule:
    """One linear that became an :class:`Int4Linear`."""

    name: str
    source_format: str  # "compressed-tensors", "gptq", "awq", "uint8" or "rtn"
    in_features: int
    out_features: int
    group_size: int
    symmetric: bool
    g_idx: bool
    nbytes: int


@dataclass(frozen=True)
class DenseModule:
    """One linear left dense, and why."""

    name: str
    reason: str
    shape: tuple[int, ...] = ()


@dataclass
class SurgeryReport:
    """What :func:`convert_to_int4`, :func:`quantize_model_rtn` or the loader did to a model."""

    converted: list[ConvertedModule] = field(default_factory=list)
    left_dense: list[DenseModule] = field(default_factory=list)
    removed_hooks: list[str] = field(default_factory=list)
    mode: str = "on_the_fly"

    @property
    def int4_bytes(self) -> int:
        return sum(m.nbytes for m in self.converted)

    def converted_names(self) -> list[str]:
        return [m.name for m in self.converted]

    def dense_names(self) -> list[str]:
        return [m.name for m in self.left_dense]

    def summary(self) -> str:
        """A few human-readable lines: counts by format, INT4 bytes, and every dense linear with its reason."""
        by_format: dict[str, int] = {}
        for module in self.converted:
            by_format[module.source_format] = by_format.get(module.source_format, 0) + 1
        formats = ", ".join(f"{count} {fmt}" for fmt, count in sorted(by_format.items())) or "none"
        lines = [
            f"INT4 surgery: {len(self.converted)} linear layers -> Int4Linear ({formats}; "
            f"{self.int4_bytes / 2**20:.1f} MiB packed, mode={self.mode}), {len(self.left_dense)} left dense"
        ]
        lines += [f"  dense: {m.name} {list(m.shape)} ({m.reason})" for m in self.left_dense]
        lines += [f"  removed hook: {hook}" for hook in self.removed_hooks]
        return "\n".join(lines)

    __str__ = summary

    def to_dict(self) -> dict:
        return {
            "converted": [dataclasses.asdict(m) for m in self.converted],
            "left_dense": [dataclasses.asdict(m) for m in self.left_dense],
            "removed_hooks": list(self.removed_hooks),
            "mode": self.mode,
            "int4_bytes": self.int4_bytes,
        }


def convert_to_int4(
    model: nn.Module,
    quant_config: Int4CheckpointConfig | None = None,
    *,
    mode: str = "on_the_fly",
    cache_max_bytes: int | None = None,
    compute_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> SurgeryReport:
    """Replace every INT4 linear of ``model`` by an :class:`Int4Linear` in place; return the report.

    ``quant_config`` (default: parsed from ``model.config.quantization_config`` when present) supplies each module's
    scheme (group size, strategy, GPTQ version) and its ``ignore`` list: modules it does not quantize stay dense, and
    one of them carrying INT4 tensors is a :class:`CheckpointError`. ``mode="cache"`` gives every layer one shared
    budgeted dense-weight cache (``cache_max_bytes``, None = unbounded). The report is also stored on
    ``model.int4_report`` and the config on ``model.int4_checkpoint_config``.
    """
    check_no_int4_fused_experts(model)
    if quant_config is None:
        block = getattr(getattr(model, "config", None), "quantization_config", None)
        if block is not None:
            quant_config = parse_quantization_config(block, source=f"{type(model).__name__}.config")
    cache = make_cache(mode, cache_max_bytes)
    report = SurgeryReport(mode=mode, removed_hooks=remove_decompress_hooks(model))
    unignored = dataclasses.replace(quant_config, ignore=()) if quant_config is not None else None
    earlier = _earlier_entries(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, Int4Linear):  # converted before (a second call is a no-op for it)
            report.converted.append(earlier.get(name) or converted_entry(name, "int4linear", module.int4_weight()))
            continue
        scheme = quant_config.scheme_for(name, module) if quant_config is not None else None
        if scheme is None and quant_config is not None and not isinstance(module, nn.Linear):
            # GPTQ / AWQ quant-linear classes (QuantLinear, WQLinear_GEMM) stand in for the nn.Linear the config's
            # "Linear" target meant; ignore entries still apply by name.
            scheme = quant_config.scheme_for(name, "Linear")
        weight = read_module_int4_weight(module, name, scheme)
        if weight is None:
            if isinstance(module, nn.Linear):
                report.left_dense.append(
                    DenseModule(name, dense_reason(name, module, quant_config, unignored), _weight_shape(module))
                )
            continue
        if quant_config is not None and scheme is None:
            raise CheckpointError(
                f"{name}: {type(module).__name__} carries INT4 tensors, but the quantization config "
                f"({quant_config.source}) does not quantize it (ignored or not targeted); the checkpoint and its "
                "config.json disagree. Fix the config's ignore/targets, or pass a matching quant_config."
            )
        source = detect_format(module_tensors(module)) or "int4"
        _replace(model, name, _make_linear(name, weight, _bias_of(module), compute_dtype, cache, backend))
        report.converted.append(converted_entry(name, source, weight))
    _record(model, report, quant_config)
    logger.info("%s", report.summary())
    return report


def quantize_model_rtn(
    model: nn.Module,
    group_size: int | None = 128,
    symmetric: bool = True,
    strategy: str = "group",
    ignore: Iterable[str] = ("lm_head",),
    targets: Iterable[str] = ("Linear",),
    *,
    scale_dtype: torch.dtype | None = None,
    mode: str = "on_the_fly",
    cache_max_bytes: int | None = None,
    compute_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> SurgeryReport:
    """Quantize every targeted dense ``nn.Linear`` of ``model`` with round-to-nearest INT4 (the toolkit's packer)
    and replace it by an :class:`Int4Linear`, in place.

    ``ignore`` / ``targets`` follow compressed-tensors' rules (module names, class names, ``re:`` patterns); the
    equivalent compressed-tensors ``quantization_config`` is recorded on ``model.int4_checkpoint_config``.
    """
    from int4lora_train.quant.packer import quantize_rtn

    quant_config = parse_quantization_config(
        compressed_tensors_config(group_size, symmetric, strategy, ignore=ignore, targets=targets),
        source="quantize_model_rtn",
    )
    unignored = dataclasses.replace(quant_config, ignore=())
    cache = make_cache(mode, cache_max_bytes)
    report = SurgeryReport(mode=mode)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, Int4Linear):
            continue
        if quant_config.scheme_for(name, module) is None:
            report.left_dense.append(
                DenseModule(name, dense_reason(name, module, quant_config, unignored), _weight_shape(module))
            )
            continue
        dense = module.weight.detach()
        weight = quantize_rtn(
            dense, group_size=group_size, symmetric=symmetric, strategy=strategy, scale_dtype=scale_dtype
        )
        _replace(model, name, _make_linear(name, weight, _bias_of(module), compute_dtype, cache, backend))
        report.converted.append(converted_entry(name, "rtn", weight))
    _record(model, report, quant_config)
    logger.info("%s", report.summary())
    return report


def dequantized_copy(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A deep copy of ``model`` with every :class:`Int4Linear` replaced by an ``nn.Linear`` holding its dequantized
    weight in ``dtype`` (same names, same bias): the dense model the INT4 one computes, for references and debugging.
    Needs the dense memory; the original model is not changed."""
    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if isinstance(module, Int4Linear):
            linear = nn.Linear(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                device=module.packed.device,
                dtype=dtype,
            )
            linear.weight.data.copy_(module.dequantize(dtype))
            if module.bias is not None:
                linear.bias.data.copy_(module.bias.detach())
            linear.requires_grad_(False)
            _replace(dense, name, linear)
    return dense


def make_cache(mode: str, cache_max_bytes: int | None):
    """The dense-weight cache for ``mode`` (a fresh :class:`INT4Unpacker` per model, so module names used as keys
    cannot collide across models), or None on the fly."""
    if mode not in MODES:
        raise UnsupportedFormatError(f"mode must be one of {list(MODES)}, got {mode!r}.")
    if mode == "on_the_fly":
        if cache_max_bytes is not None:
            logger.warning("cache_max_bytes=%s is ignored in on_the_fly mode", cache_max_bytes)
        return None
    from int4lora_train.quant.unpacker import INT4Unpacker

    return INT4Unpacker(max_cache_bytes=cache_max_bytes)


def remove_decompress_hooks(model: nn.Module) -> list[str]:
    """Remove compressed-tensors' decompress-on-first-forward hook (``ModelCompressor.add_decompress_hook``), which
    would otherwise turn every packed linear into a dense bf16 copy. Returns ``"<module>: <hook>"`` per removal."""
    removed = []
    for name, module in model.named_modules():
        for hook_id, hook in list(module._forward_pre_hooks.items()):
            if getattr(hook, "__name__", "") == "ct_decompress_hook":
                del module._forward_pre_hooks[hook_id]
                removed.append(f"{name or type(module).__name__}: ct_decompress_hook")
        if "ct_decompress_hook" in module.__dict__:
            del module.__dict__["ct_decompress_hook"]
    return removed


# ------------------------------------------------------------------------------------------------------- helpers


def _make_linear(name, weight: Int4Weight, bias, compute_dtype, cache, backend) -> Int4Linear:
    return Int4Linear(weight, bias=bias, compute_dtype=compute_dtype, cache=cache, cache_key=name, backend=backend)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise UnsupportedFormatError("the root module itself is an INT4 linear; wrap it in a model first.")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _bias_of(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.is_floating_point():
        return bias
    return None


def converted_entry(name: str, source: str, weight: Int4Weight) -> ConvertedModule:
    """The report entry of a module converted from ``source`` (a format name)."""
    return ConvertedModule(
        name=name,
        source_format=source,
        in_features=weight.in_features,
        out_features=weight.out_features,
        group_size=weight.group_size,
        symmetric=weight.zero_points is None,
        g_idx=weight.g_idx is not None,
        nbytes=weight.nbytes,
    )


def _earlier_entries(model: nn.Module) -> dict[str, ConvertedModule]:
    previous = getattr(model, "int4_report", None)
    return {m.name: m for m in previous.converted} if isinstance(previous, SurgeryReport) else {}


def dense_reason(name: str, module: nn.Module, quant_config, unignored=None) -> str:
    """Why a linear stays dense; ``unignored`` is ``quant_config`` without its ignore list."""
    if quant_config is not None and unignored is None:
        unignored = dataclasses.replace(quant_config, ignore=())
    if quant_config is None:
        return "dense weight, no INT4 tensors"
    group = quant_config.group_for(name, module)
    if group is not None and group.scheme.dequantize:
        return f"dequantized at load from config group {group.name}: {group.scheme.describe()}"
    if unignored.scheme_for(name, module) is not None:
        return "in the quantization config's ignore list"
    return "not targeted by the quantization config"


def _weight_shape(module: nn.Module) -> tuple[int, ...]:
    weight = getattr(module, "weight", None)
    return tuple(weight.shape) if isinstance(weight, torch.Tensor) else ()


def _record(model: nn.Module, report: SurgeryReport, quant_config: Int4CheckpointConfig | None) -> None:
    """Attach the report and the quantization config (export fingerprints the base from it)."""
    model.int4_report = report
    if quant_config is not None or getattr(model, "int4_checkpoint_config", None) is None:
        model.int4_checkpoint_config = quant_config
