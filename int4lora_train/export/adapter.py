"""Export a trained LoRA adapter for vLLM, and check an adapter's base when it is loaded.

:func:`export_adapter` takes a ``PeftModel`` (or a saved adapter directory) and writes a PEFT adapter directory that
vLLM loads on the INT4 base it was trained on::

    out_dir/
      adapter_config.json          PEFT's config (vLLM reads r, lora_alpha, target_modules, use_rslora, ...)
      adapter_model.safetensors    base_model.model.<module>.lora_A.weight [r, in] / .lora_B.weight [out, r]
      int4lora_base.json           the base's identity: quantization_config + INT4 fingerprint (fingerprint.py)

Every vLLM rule (:mod:`int4lora_train.export.vllm_rules`) is checked first; all violations are reported together in
one :class:`~int4lora_train.errors.ExportError`, each with its fix. The directory is written to a temporary sibling
and renamed into place, so a failed export never leaves half an adapter, and an existing directory is replaced only
with ``overwrite=True``.

Per-module scales (``rank_pattern`` / ``alpha_pattern``) that differ from the global ``lora_alpha / r`` are refused,
or with ``fold_scaling=True`` folded into ``lora_B``::

    lora_B_i  <-  lora_B_i * s_i / s        s_i = alpha_i / r_i (PEFT's scale of module i),  s = alpha / r

after which ``alpha_pattern`` is rewritten so that every module's ``alpha_i / r_i`` equals ``s``. ``rank_pattern``
stays (PEFT needs it to build the tensors' shapes), so the adapter is right on PEFT, on vLLM releases that honour
the patterns (0.32) and on those that ignore them (which apply ``s`` everywhere).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from int4lora_train.atomic import atomic_directory, fault_point, is_within, resolve_path
from int4lora_train.errors import CheckpointError, ExportError
from int4lora_train.export import vllm_rules
from int4lora_train.export.fingerprint import (
    SIDECAR_NAME,
    BaseIdentity,
    checkpoint_identity,
    compare_identities,
    model_identity,
    read_sidecar,
    write_sidecar,
)

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class BaseMismatchWarning(UserWarning):
    """An adapter is being loaded onto an INT4 base other than the one it was trained on."""


@dataclass
class ExportReport:
    """What :func:`export_adapter` wrote and how to serve it."""

    out_dir: Path
    r: int
    lora_alpha: float
    use_rslora: bool
    max_lora_rank: int
    modules: list[str]
    num_tensors: int
    folded: dict[str, float] = field(default_factory=dict)
    dropped_keys: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    base: BaseIdentity | None = None
    commands: dict[str, str] = field(default_factory=dict)

    @property
    def target_modules(self) -> list[str]:
        """The distinct module suffixes that carry LoRA (``q_proj``, ...)."""
        return sorted({m.rsplit(".", 1)[-1] for m in self.modules})

    def summary(self) -> str:
        """A few lines for people: what was exported, the base it needs, and the serve commands."""
        scale = vllm_rules.lora_scale(self.r, self.lora_alpha, self.use_rslora)
        lines = [
            f"Exported LoRA adapter to {self.out_dir}",
            f"  r={self.r} lora_alpha={self.lora_alpha:g}{' rsLoRA' if self.use_rslora else ''} (scale {scale:g}), "
            f"{len(self.modules)} modules {self.target_modules}, {self.num_tensors} tensors",
            f"  serve with --max-lora-rank {self.max_lora_rank}",
        ]
        if self.folded:
            lines.append(f"  folded per-module scales into lora_B of {len(self.folded)} modules")
        if self.base is not None:
            lines.append(
                f"  base: {self.base.base_model or '?'} ({self.base.num_modules} INT4 modules, fingerprint "
                f"{self.base.fingerprint[:16]}...)"
            )
        lines += [f"  warning: {w}" for w in self.warnings]
        if self.commands:
            lines += [
                "",
                "Serve (OpenAI-compatible server):",
                f"  {self.commands['api_server']}",
                "or, with upstream vLLM's CLI:",
                f"  {self.commands['vllm_serve']}",
                "Offline:",
                *("  " + line for line in self.commands["offline"].rstrip().splitlines()),
            ]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------ export


def export_adapter(
    source,
    out_dir: str | Path,
    base_model_dir: str | Path | None = None,
    *,
    adapter_name: str = "default",
    fold_scaling: bool = False,
    overwrite: bool = False,
    force: bool = False,
    dtype: torch.dtype | None = None,
    lora_name: str | None = None,
    serve_dtype: str = "auto",
    model_type: str | None = None,
) -> ExportReport:
    """Write a vLLM-ready PEFT adapter directory from ``source`` (a ``PeftModel`` or an adapter directory).

    ``base_model_dir``: the INT4 checkpoint the adapter will be served on; used for the serve command, the
    architecture check and the base identity (checked against the adapter's recorded one when both exist).
    ``fold_scaling``: fold per-module scales into ``lora_B`` instead of refusing them (module docstring).
    ``overwrite``: replace an existing ``out_dir`` that the toolkit wrote (and that holds nothing else); ``force``:
    replace it even when it holds other files (they are lost). ``dtype``: cast the adapter tensors (default: keep, usually fp32). ``lora_name``: the name the adapter gets in
    the serve commands (default: ``out_dir``'s name). Raises :class:`ExportError` listing every rule the adapter
    breaks, with how to fix each.
    """
    out_dir = resolve_path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory; choose another out_dir.")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir} already exists; choose another out_dir or pass overwrite=True to replace it.")
    if isinstance(source, (str, os.PathLike)):
        source_dir = resolve_path(source)
        if is_within(out_dir, source_dir) or is_within(source_dir, out_dir):
            relation = "is" if out_dir == source_dir else "lies inside" if is_within(out_dir, source_dir) else "holds"
            raise ExportError(
                f"out_dir {out_dir} {relation} the adapter being exported ({source_dir}); choose an out_dir beside it."
            )
    with tempfile.TemporaryDirectory(prefix="int4lora-export-") as scratch:
        config, tensors, identity, source_model_type = _read_source(source, adapter_name, Path(scratch))
        return _export(
            config,
            tensors,
            identity,
            out_dir,
            # Absolute: the recorded base and the printed serve command must work from any directory.
            base_model_dir=Path(base_model_dir).expanduser().absolute() if base_model_dir is not None else None,
            fold_scaling=fold_scaling,
            overwrite=overwrite,
            force=force,
            dtype=dtype,
            lora_name=lora_name or out_dir.name,
            serve_dtype=serve_dtype,
            model_type=model_type or source_model_type,
        )


def _read_source(source, adapter_name: str, scratch: Path) -> tuple[dict, dict, BaseIdentity | None, str | None]:
    """``(adapter_config dict, {key: tensor}, recorded base identity, model_type)`` from a PeftModel or a dir."""
    if isinstance(source, (str, os.PathLike)):
        adapter_dir = Path(source)
        config, tensors = read_adapter_dir(adapter_dir)
        return config, tensors, read_sidecar(adapter_dir), None
    peft_config = getattr(source, "peft_config", None)
    if not isinstance(peft_config, Mapping) or not hasattr(source, "save_pretrained"):
        raise ExportError(
            f"export_adapter needs a peft.PeftModel or an adapter directory, got {type(source).__name__}."
        )
    if adapter_name not in peft_config:
        raise ExportError(f"adapter {adapter_name!r} not found; the model has {sorted(peft_config)}.")
    # PEFT's own saving gives exactly the keys and config it would write; vLLM's rules are then checked on those.
    source.save_pretrained(str(scratch), selected_adapters=[adapter_name], save_embedding_layers=False)
    saved = scratch if adapter_name == "default" else scratch / adapter_name
    config, tensors = read_adapter_dir(saved)
    identity = model_identity(source)
    if identity.base_model and Path(identity.base_model).is_dir():  # the directory the model was loaded from
        identity = dataclasses.replace(identity, base_model=str(Path(identity.base_model).absolute()))
    model_type = identity.model_type
    if identity.num_modules == 0:
        logger.warning("the model holds no INT4 modules; the adapter records no base fingerprint")
        identity = None
    return config, tensors, identity, model_type


def read_adapter_dir(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config.json as a dict, adapter tensors)``; only safetensors weights are read."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.is_file():
        raise CheckpointError(f"{adapter_dir}: no {ADAPTER_CONFIG}; is it a PEFT adapter directory?")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc}).") from exc
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = [p.name for p in adapter_dir.glob("adapter_model.*")]
        hint = (
            f" It has {pickled}: pickled weights are not read; load the adapter with PEFT and save it again with "
            "save_pretrained(..., safe_serialization=True)."
            if pickled
            else ""
        )
        raise CheckpointError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}.{hint}")
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for truncated / corrupt files
        raise CheckpointError(f"{weights}: cannot be read ({exc}); the file is truncated or corrupt.") from exc
    return config, tensors


def _export(
    config: dict,
    tensors: dict[str, torch.Tensor],
    identity: BaseIdentity | None,
    out_dir: Path,
    *,
    base_model_dir: Path | None,
    fold_scaling: bool,
    overwrite: bool,
    force: bool = False,
    dtype: torch.dtype | None = None,
    lora_name: str,
    serve_dtype: str,
    model_type: str | None,
) -> ExportReport:
    config = copy.deepcopy(config)
    problems = vllm_rules.config_violations(config)
    warns: list[str] = []

    if base_model_dir is not None:
        identity = _reconcile_base(identity, base_model_dir)
        model_type = model_type or identity.model_type
    if model_type is None and identity is not None:
        model_type = identity.model_type

    kept, dropped, ranks, key_problems = _parse_tensors(tensors)
    problems += key_problems
    module_errors, module_warnings = vllm_rules.module_violations(model_type, ranks)
    problems += module_errors
    warns += module_warnings

    folded: dict[str, float] = {}
    if ranks and config.get("r") and config.get("lora_alpha") is not None:
        factors = vllm_rules.mis_scaled_modules(config, ranks)
        if factors and not fold_scaling:
            problems.append(_mis_scaled_message(config, ranks, factors))
        elif factors:
            folded = _fold_scaling(config, kept, ranks, factors)
    if not ranks and not key_problems:
        problems.append("the adapter holds no LoRA tensors; was it saved before get_peft_model attached LoRA?")
    if problems:
        raise ExportError(
            f"the adapter cannot be served by vLLM as configured ({len(problems)} problem(s)):\n"
            + "\n".join(f"  {i}. {p}" for i, p in enumerate(problems, 1))
        )

    rank_pattern = config.get("rank_pattern") or {}
    max_rank = max([int(config["r"]), *map(int, rank_pattern.values()), *ranks.values()])
    max_lora_rank = vllm_rules.max_lora_rank_for(max_rank)
    if dtype is not None:
        kept = {k: v.to(dtype) for k, v in kept.items()}
    config["inference_mode"] = True
    if base_model_dir is not None:
        config["base_model_name_or_path"] = str(base_model_dir)

    _write_atomically(out_dir, config, kept, identity, overwrite, force)
    recorded_base = identity.base_model if identity is not None else None
    base_for_commands = str(
        base_model_dir or recorded_base or config.get("base_model_name_or_path") or "<INT4_BASE_MODEL_DIR>"
    )
    report = ExportReport(
        out_dir=out_dir,
        r=int(config["r"]),
        lora_alpha=float(config["lora_alpha"]),
        use_rslora=bool(config.get("use_rslora")),
        max_lora_rank=max_lora_rank,
        modules=sorted(ranks),
        num_tensors=len(kept),
        folded=folded,
        dropped_keys=dropped,
        warnings=warns,
        base=identity,
        commands=vllm_rules.serve_commands(base_for_commands, str(out_dir), max_lora_rank, lora_name, serve_dtype),
    )
    for w in warns:
        logger.warning(w)
    logger.info(
        "exported a LoRA adapter (r=%d, %d modules) to %s; serve with --max-lora-rank %d",
        report.r,
        len(report.modules),
        out_dir,
        max_lora_rank,
    )
    return report


def _reconcile_base(recorded: BaseIdentity | None, base_model_dir: Path) -> BaseIdentity:
    """The identity of ``base_model_dir``; an error when the adapter recorded a different base."""
    actual = checkpoint_identity(base_model_dir)
    if recorded is not None:
        problems = compare_identities(recorded, actual)
        if problems:
            raise ExportError(
                f"the adapter was trained on a different INT4 base than {base_model_dir}: "
                + "; ".join(problems)
                + ". Serve it on the base it was trained on, or retrain on this one."
            )
    return actual


def _parse_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[dict, list[str], dict[str, int], list[str]]:
    """``(canonical key -> tensor, dropped keys, module -> rank, problems)``."""
    kept: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    parts: dict[str, dict[str, torch.Tensor]] = {}
    problems: list[str] = []
    for key in sorted(tensors):
        try:
            parsed = vllm_rules.parse_lora_key(key)
        except ExportError as exc:
            problems.append(str(exc))
            continue
        if parsed is None:
            dropped.append(key)
            continue
        kept[parsed.key()] = tensors[key].contiguous()
        parts.setdefault(parsed.module, {})[parsed.part] = tensors[key]
    ranks: dict[str, int] = {}
    for module, found in parts.items():
        a = found.get("lora_A", found.get("lora_embedding_A"))
        b = found.get("lora_B", found.get("lora_embedding_B"))
        if a is None or b is None:
            problems.append(
                f"module {module!r} has only {sorted(found)}; LoRA needs both A and B. Re-save the adapter."
            )
            continue
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            problems.append(
                f"module {module!r}: lora A {tuple(a.shape)} and B {tuple(b.shape)} do not share a rank "
                "(expected A [r, in], B [out, r]); the adapter file is inconsistent."
            )
            continue
        ranks[module] = int(a.shape[0])
    if dropped:
        logger.info("dropping %d base-embedding tensors vLLM skips: %s", len(dropped), dropped[:3])
    return kept, dropped, ranks, problems


def _mis_scaled_message(config: Mapping, ranks: Mapping[str, int], factors: Mapping[str, float]) -> str:
    first = sorted(factors)[0]
    scales = vllm_rules.module_scales(config, {first: ranks[first]})[first]
    return (
        f"rank_pattern / alpha_pattern give {len(factors)} module(s) a LoRA scale other than the global "
        f"lora_alpha/r = {scales[1]:g} (first: {first}: {scales[0]:g}). vLLM releases up to at least 2026-05 ignore "
        "these patterns and would serve those modules mis-scaled (0.32 honours them). Fix: export with "
        "fold_scaling=True (folds each module's scale into its lora_B; exact on every vLLM), or train with one "
        "alpha/r ratio for all modules."
    )


def _fold_scaling(
    config: dict, kept: dict[str, torch.Tensor], ranks: Mapping[str, int], factors: Mapping[str, float]
) -> dict[str, float]:
    """``lora_B *= factor`` (in fp32, cast back) for every mis-scaled module; rewrite alpha_pattern to match."""
    for module, factor in factors.items():
        key = vllm_rules.LoraKey(module, "lora_B").key()
        if key not in kept:
            key = vllm_rules.LoraKey(module, "lora_embedding_B").key()
        kept[key] = (kept[key].to(torch.float32) * factor).to(kept[key].dtype)
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    ratio = (lambda rank: math.sqrt(rank / r)) if config.get("use_rslora") else (lambda rank: rank / r)
    rank_pattern = dict(config.get("rank_pattern") or {})
    # Same keys in the same order as rank_pattern, so PEFT's first-match rule picks the same entry for both.
    config["alpha_pattern"] = {key: alpha * ratio(int(rank)) for key, rank in rank_pattern.items() if int(rank) != r}
    remaining = vllm_rules.mis_scaled_modules(config, ranks)
    if remaining:  # pragma: no cover - would mean the pattern rules changed under us
        raise ExportError(f"could not fold the per-module scales of {sorted(remaining)[:3]}; please report this.")
    return dict(factors)


def _write_atomically(
    out_dir: Path,
    config: dict,
    tensors: dict[str, torch.Tensor],
    identity: BaseIdentity | None,
    overwrite: bool,
    force: bool = False,
) -> None:
    """Write into a temporary sibling of ``out_dir``, then rename; an old ``out_dir`` goes only after that."""
    from safetensors.torch import save_file

    try:
        with atomic_directory(out_dir, overwrite, kind="adapter", force=force, what="adapter directory") as tmp:
            (tmp / ADAPTER_CONFIG).write_text(adapter_config_json(config))
            fault_point(f"wrote {ADAPTER_CONFIG}")
            save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            fault_point(f"wrote {ADAPTER_WEIGHTS}")
            if identity is not None:
                write_sidecar(identity, tmp)
                fault_point(f"wrote {SIDECAR_NAME}")
    except CheckpointError as exc:  # the ownership rule refused the target
        raise ExportError(str(exc)) from None
    except OSError as exc:
        raise ExportError(
            f"writing the adapter to {out_dir} failed: {exc.strerror or exc} ({exc.filename or out_dir}); nothing "
            "was replaced. Free disk space or fix the permissions of its parent directory, or choose another out_dir."
        ) from exc


def adapter_config_json(config: Mapping) -> str:
    """``adapter_config.json``'s text, byte-identical for the same config: keys sorted, ``target_modules`` (a set in
    PEFT, saved in hash order) sorted."""
    config = dict(config)
    if isinstance(config.get("target_modules"), (list, tuple, set, frozenset)):
        config["target_modules"] = sorted(config["target_modules"])
    return json.dumps(_jsonable(config), indent=2, sort_keys=True) + "\n"


def normalize_adapter_config(adapter_dir: str | Path) -> None:
    """Rewrite ``adapter_dir/adapter_config.json`` (as PEFT's ``save_pretrained`` wrote it) deterministically."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    path.write_text(adapter_config_json(json.loads(path.read_text())))


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------------ base check


def check_base_fingerprint(model: torch.nn.Module, adapter_dir: str | Path, strict: bool = False) -> list[str]:
    """Compare the base an adapter recorded (``int4lora_base.json``) with ``model``'s INT4 weights.

    Returns the differences (empty when the base matches). A difference is a :class:`BaseMismatchWarning`, or with
    ``strict=True`` a :class:`~int4lora_train.errors.CheckpointError`. An adapter without a record only warns.
    """
    adapter_dir = Path(adapter_dir)
    recorded = read_sidecar(adapter_dir)
    if recorded is None:
        message = (
            f"{adapter_dir} has no {SIDECAR_NAME}, so the INT4 base it was trained on is unknown; re-export it "
            "with int4lora_train.export.export_adapter to record it."
        )
        if strict:
            raise CheckpointError(message)
        warnings.warn(message, BaseMismatchWarning, stacklevel=2)
        return [message]
    problems = compare_identities(recorded, model_identity(model))
    if problems:
        message = (
            f"adapter {adapter_dir} was trained on another INT4 base ({recorded.base_model or 'unknown'}): "
            + "; ".join(problems)
            + ". Its outputs on this base will differ from training; load it onto the base it was trained on."
        )
        if strict:
            raise CheckpointError(message)
        warnings.warn(message, BaseMismatchWarning, stacklevel=2)
    return problems


def load_adapter(
    model: torch.nn.Module,
    adapter_dir: str | Path,
    *,
    strict: bool = False,
    adapter_name: str = "default",
    is_trainable: bool = False,
):
    """Load a PEFT adapter onto an INT4 ``model`` after checking the base it was trained on
    (:func:`check_base_fingerprint`: a :class:`BaseMismatchWarning`, or with ``strict`` an error); a ``PeftModel``."""
    from int4lora_train.modeling.peft_integration import load_adapter as peft_load_adapter

    check_base_fingerprint(model, adapter_dir, strict=strict)
    return peft_load_adapter(model, str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable)
