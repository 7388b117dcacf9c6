"""What an INT4 checkpoint holds, module by module: format, shape, group size, symmetry, activation order, scale
dtype and bytes (``int4lora-train inspect``). Every INT4 module is read into the canonical layout through the
checkpoint reader, one module at a time, so inspecting also checks the tensors: a corrupt module raises with its name.

A compressed-tensors checkpoint's config groups are listed first, each with its scheme and how the toolkit treats it:
packed INT4 (Int4Linear), dequantized at load (the 8-bit groups of a mixed-precision checkpoint, plain frozen
``nn.Linear``; quant/dequant_at_load.py) or refused (with the reason). :func:`group_lines` works on the raw block, so
the CLI can show the groups of a checkpoint the toolkit refuses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from int4lora_train.quant.checkpoint_config import read_checkpoint_quant_config
from int4lora_train.quant.checkpoint_dir import CheckpointDir
from int4lora_train.quant.formats import detect_format
from int4lora_train.quant.scheme import REFUSED, Int4CheckpointConfig

_HEADER = ("module", "format", "out x in", "group", "sym", "g_idx", "scale", "bytes", "vs bf16")


@dataclass(frozen=True)
class ModuleLayout:
    """One INT4 module as stored."""

    module: str
    format: str
    shape: tuple[int, int]  # (out, in)
    group: int | str  # the group size, or "channel" for one scale per row
    sym: str  # "sym" / "asym"
    g_idx: str  # "yes" / "no"
    scale: str  # the scale dtype, e.g. "bfloat16"
    nbytes: int  # as stored (the module's own tensors, a bias included)
    dense_bytes: int  # the same weight in bf16

    @property
    def kind(self) -> str:
        """``model.layers.3.self_attn.q_proj`` -> ``model.layers.*.self_attn.q_proj``."""
        return ".".join("*" if part.isdigit() else part for part in self.module.split("."))


@dataclass(frozen=True)
class CheckpointLayout:
    """Every INT4 module of a checkpoint, in file order, and the bytes of everything else."""

    path: str
    quant_config: Int4CheckpointConfig
    modules: list[ModuleLayout]
    other_bytes: int
    dequantized: dict[str, tuple[int, int]] = None  # config group -> (modules, stored bytes), dequantized at load

    def table(self, per_module: bool = False) -> str:
        """The report ``inspect`` prints: a line per module (``per_module``) or per kind of module with the same
        layout (``model.layers.*.self_attn.q_proj (x32)``), then the totals."""
        rows = [_HEADER]
        if per_module:
            rows += [_cells(m.module, m, m.nbytes, m.dense_bytes) for m in self.modules]
        else:
            grouped: dict[tuple, list[ModuleLayout]] = {}
            for m in self.modules:
                grouped.setdefault((m.kind, m.format, m.shape, m.group, m.sym, m.g_idx, m.scale), []).append(m)
            for (kind, *_), members in grouped.items():
                name = f"{kind} (x{len(members)})" if len(members) > 1 else members[0].module
                nbytes, dense = sum(m.nbytes for m in members), sum(m.dense_bytes for m in members)
                rows.append(_cells(name, members[0], nbytes, dense))
        widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
        lines = [f"{self.path}: quant_method {self.quant_config.quant_method}, {len(self.modules)} INT4 modules"]
        lines += group_lines(self.quant_config.to_dict(), self.dequantized or {})
        for i, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        int4 = sum(m.nbytes for m in self.modules)
        dense = sum(m.dense_bytes for m in self.modules)
        lines.append(
            f"INT4 linears: {_mib(int4)} (bf16 would be {_mib(dense)}, {dense / max(int4, 1):.2f}x); "
            f"other tensors: {_mib(self.other_bytes)}"
        )
        return "\n".join(lines)


def group_lines(block: dict, dequantized: dict[str, tuple[int, int]] | None = None) -> list[str]:
    """``config groups:`` then one line per compressed-tensors config group: name, targets, scheme, treatment (for
    a refused group, the reason). Empty for GPTQ / AWQ blocks (one scheme for every module)."""
    from int4lora_train.quant.formats.compressed_tensors import classify_group, describe_group

    groups = block.get("config_groups") if block.get("quant_method") == "compressed-tensors" else None
    if not isinstance(groups, dict) or not groups:
        return []
    lines = ["config groups:"]
    for name, group in groups.items():
        if not isinstance(group, dict):
            continue
        scheme, refusal = classify_group(name, group, block.get("format"), "quantization_config")
        treatment = scheme.treatment if scheme is not None else REFUSED
        if scheme is not None and scheme.dequantize and dequantized and name in dequantized:
            count, nbytes = dequantized[name]
            treatment += f" to nn.Linear ({count} modules, {_mib(nbytes)} stored)"
        elif scheme is not None and not scheme.dequantize:
            treatment += " (Int4Linear)"
        targets = group.get("targets")
        line = f"  {name}: targets {targets} -- {describe_group(group, block.get('format'))} -> {treatment}"
        if refusal is not None:
            line += f": {refusal}"
        lines.append(line)
    return lines


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointLayout:
    """Read every INT4 module of the checkpoint at ``path`` (one module's tensors at a time) into its canonical
    layout and describe it; the other tensors are only counted (from the shard headers)."""
    directory = Path(path)
    quant = read_checkpoint_quant_config(directory, required=True)
    checkpoint = CheckpointDir.open(directory)
    modules = []
    for name, weight, tensors in checkpoint.iter_int4_weights(quant):
        out_features, in_features = weight.shape
        modules.append(
            ModuleLayout(
                module=name,
                format=detect_format(tensors),
                shape=(out_features, in_features),
                group=weight.group_size if weight.num_groups > 1 else "channel",
                sym="asym" if weight.zero_points is not None else "sym",
                g_idx="yes" if weight.g_idx is not None else "no",
                scale=str(weight.dtype).removeprefix("torch."),
                nbytes=sum(t.numel() * t.element_size() for t in tensors.values()),
                dense_bytes=out_features * in_features * 2,
            )
        )
    int4_keys = {key for tensors in checkpoint.int4_modules().values() for key in tensors.values()}
    dequantized: dict[str, tuple[int, int]] = {}
    for group, keys in checkpoint.dequantized_modules(quant).values():
        count, nbytes = dequantized.get(group.name, (0, 0))
        dequantized[group.name] = (count + 1, nbytes + sum(checkpoint.catalog[key].nbytes for key in keys.values()))
    other_bytes = sum(info.nbytes for key, info in checkpoint.catalog.items() if key not in int4_keys)
    return CheckpointLayout(str(path), quant, modules, other_bytes, dequantized)


def _cells(name: str, module: ModuleLayout, nbytes: int, dense_bytes: int) -> tuple[str, ...]:
    out_features, in_features = module.shape
    return (
        name,
        module.format,
        f"{out_features} x {in_features}",
        str(module.group),
        module.sym,
        module.g_idx,
        module.scale,
        _mib(nbytes),
        f"{dense_bytes / max(nbytes, 1):.2f}x",
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
