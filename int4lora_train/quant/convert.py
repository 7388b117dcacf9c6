"""A dense transformers checkpoint directory -> an INT4 W4A16 checkpoint directory (``int4lora-train quantize``).

:func:`quantize_checkpoint` loads the dense model from disk (never the hub), quantizes every linear with the RTN
packer (:func:`int4lora_train.quant.packer.save_int4_checkpoint`) and measures, per layer, how far the dequantized
weight ``W_q`` lies from the dense ``W``:

    max_rel  = max |W - W_q| / max |W|        the worst element, against the largest weight
    mean_rel = mean |W - W_q| / mean |W|      the typical element, against the typical weight
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from int4lora_train.atomic import is_within, refuse_existing, resolve_path
from int4lora_train.errors import CheckpointError, UnsupportedFormatError
from int4lora_train.quant.dequant import dequantize_torch
from int4lora_train.quant.layout import Int4Weight

logger = logging.getLogger(__name__)

SCHEMES = ("w4a16",)
FORMATS = ("compressed-tensors", "gptq", "awq")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class LayerError:
    """How far one layer's dequantized INT4 weight lies from its dense weight (see the module docstring)."""

    name: str
    shape: tuple[int, int]
    max_rel: float
    mean_rel: float


@dataclass
class QuantizeReport:
    out_dir: Path
    format: str
    group_size: int
    symmetric: bool
    layers: list[LayerError] = field(default_factory=list)

    def summary(self, per_layer: bool = False) -> str:
        """A few lines: the scheme, the layer count, the mean and worst errors (``per_layer``: one line each)."""
        kind = "symmetric" if self.symmetric else "asymmetric"
        lines = [f"wrote {self.format} W4A16 (group {self.group_size}, {kind}) to {self.out_dir}"]
        if not self.layers:
            return lines[0] + "; no linear layer was quantized"
        worst = max(self.layers, key=lambda e: e.mean_rel)
        mean = sum(e.mean_rel for e in self.layers) / len(self.layers)
        lines.append(
            f"{len(self.layers)} linear layers quantized; relative error of the dequantized weights: "
            f"mean_rel {mean:.4f} on average, worst {worst.mean_rel:.4f} ({worst.name}); "
            f"max_rel up to {max(e.max_rel for e in self.layers):.4f}"
        )
        if per_layer:
            width = max(len(e.name) for e in self.layers)
            lines.append(f"{'layer':<{width}}  {'out x in':>12}  {'max_rel':>8}  {'mean_rel':>8}")
            for e in self.layers:
                shape = f"{e.shape[0]} x {e.shape[1]}"
                lines.append(f"{e.name:<{width}}  {shape:>12}  {e.max_rel:8.4f}  {e.mean_rel:8.4f}")
        return "\n".join(lines)


def layer_error(name: str, dense: torch.Tensor, weight: Int4Weight) -> LayerError:
    """:class:`LayerError` of ``weight`` (INT4) against ``dense`` ``[out, in]``, computed in fp32."""
    reference = dense.detach().float()
    diff = (reference - dequantize_torch(weight, torch.float32)).abs()
    magnitude = reference.abs()
    tiny = torch.finfo(torch.float32).tiny  # an all-zero weight quantizes exactly: 0 / tiny = 0
    return LayerError(
        name,
        (int(reference.shape[0]), int(reference.shape[1])),
        float(diff.max() / magnitude.max().clamp_min(tiny)),
        float(diff.mean() / magnitude.mean().clamp_min(tiny)),
    )


def quantize_checkpoint(
    dense_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    scheme: str = "w4a16",
    format: str = "compressed-tensors",
    group_size: int = 128,
    symmetric: bool = True,
    ignore: Iterable[str] = ("lm_head",),
    dtype: str = "auto",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    max_shard_bytes: int | None = 5 * 1024**3,
    on_layer: Callable[[LayerError, int], None] | None = None,
) -> QuantizeReport:
    """Quantize the dense causal LM in ``dense_dir`` to an INT4 checkpoint at ``out_dir``; the report has every
    layer's error. ``on_layer(error, total)`` is called after each linear (for a progress bar).

    ``dtype``: ``auto`` (the checkpoint's) or ``bfloat16`` / ``float16`` / ``float32``: the dtype of the dense
    tensors and the scales. GPTQ asymmetric checkpoints are written as ``gptq_v2`` (v1 cannot store every zero
    point). ``out_dir`` is checked before the model loads: a non-empty one is refused unless ``overwrite``, and then
    only replaced when the toolkit wrote all of it (``int4lora_train.atomic``).

    Raises:
        UnsupportedFormatError: an unknown scheme, format or dtype, or a group size that does not divide a layer.
        CheckpointError: a missing or already quantized ``dense_dir``, or an ``out_dir`` that may not be replaced.
    """
    if scheme not in SCHEMES:
        raise UnsupportedFormatError(f"scheme {scheme!r} is not supported; choose one of {list(SCHEMES)}")
    if format not in FORMATS:
        raise UnsupportedFormatError(f"format {format!r} is not supported; choose one of {list(FORMATS)}")
    if dtype != "auto" and dtype not in DTYPES:
        raise UnsupportedFormatError(f"dtype {dtype!r} is not supported; choose auto or one of {list(DTYPES)}")
    if group_size <= 0:
        raise UnsupportedFormatError(f"group size must be positive, got {group_size}")
    source, target = resolve_path(dense_dir), resolve_path(out_dir)
    _check_dense_dir(source)
    if target == source or is_within(target, source):
        raise CheckpointError(f"the output {target} lies inside the dense checkpoint {source}; choose another path")
    refuse_existing(target, overwrite, what="INT4 checkpoint directory")

    import transformers

    logger.info("loading the dense model from %s", source)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        source,
        dtype=DTYPES.get(dtype, "auto"),
        local_files_only=True,
        trust_remote_code=trust_remote_code,
    )
    model.eval()
    if next(model.parameters()).dtype == torch.float32:
        logger.warning(
            "%s is float32, so the INT4 scales and dense tensors will be too; vLLM serves bfloat16 / float16 "
            "checkpoints (pass --dtype bfloat16)",
            source,
        )
    tokenizer = _load_tokenizer(source, trust_remote_code)
    report = QuantizeReport(target, format, group_size, symmetric)

    def measure(name: str, dense: torch.Tensor, weight: Int4Weight, total: int) -> None:
        error = layer_error(name, dense, weight)
        report.layers.append(error)
        logger.debug("%s: max_rel %.4f mean_rel %.4f", name, error.max_rel, error.mean_rel)
        if on_layer is not None:
            on_layer(error, total)

    from int4lora_train.quant.packer import save_int4_checkpoint

    with torch.no_grad():
        save_int4_checkpoint(
            model,
            target,
            format=format,
            group_size=group_size,
            symmetric=symmetric,
            ignore=tuple(ignore),
            tokenizer=tokenizer,
            max_shard_bytes=max_shard_bytes,
            overwrite=overwrite,
            checkpoint_format="gptq" if symmetric else "gptq_v2",
            on_quantized=measure,
        )
    return report


def _check_dense_dir(directory: Path) -> None:
    import json

    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{directory} is not a transformers checkpoint directory (no config.json); save the dense model with "
            "save_pretrained, or download it first (huggingface-cli download MODEL --local-dir DIR)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: cannot be read as JSON ({exc})") from exc
    if isinstance(config, dict) and config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise CheckpointError(
            f"{directory} is already quantized (quantization_config.quant_method: {method}); quantize needs the "
            "dense (bf16 / fp16 / fp32) checkpoint"
        )


def _load_tokenizer(directory: Path, trust_remote_code: bool):
    """The checkpoint's tokenizer, copied into the output, or None (with a warning) if it has none."""
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        logger.warning("%s has no tokenizer files; the INT4 checkpoint is written without a tokenizer", directory)
        return None
    import transformers

    return transformers.AutoTokenizer.from_pretrained(
        directory, local_files_only=True, trust_remote_code=trust_remote_code
    )
