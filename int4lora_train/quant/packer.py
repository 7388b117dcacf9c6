"""Round-to-nearest INT4 quantization and INT4 checkpoint directories (compressed-tensors, GPTQ, AWQ).

:func:`quantize_rtn` reproduces compressed-tensors' default observer and quantizer bit for bit (FORMATS.md §1.3):
min / max widened to include 0; symmetric ``scale = max|x| / 7.5``; asymmetric ``scale = (max - min) / 15`` and
``zp = round(clamp(-8 - min / scale, -8, 7))``; ``q = clamp(round(x / scale + zp), -8, 7)``, every step in the same
dtype and order as the library so that a weight quantized here equals one quantized there.

:func:`write_int4_checkpoint` streams ``(name, tensor | Int4Weight)`` pairs into safetensors shards (a huge model
never has to be held), then adds ``config.json`` with the matching ``quantization_config``, the shard index, the
tokenizer and the generation config; the directory is assembled next to the target and renamed into place.
:func:`save_int4_checkpoint` does it for an in-memory dense model, one linear at a time.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from int4lora_train.atomic import atomic_directory
from int4lora_train.errors import CheckpointError, Int4FormatError, UnsupportedFormatError
from int4lora_train.quant.checkpoint_config import parse_quantization_config
from int4lora_train.quant.checkpoint_dir import SAFE_INDEX, SINGLE_FILE
from int4lora_train.quant.formats import Int4Format, format_named
from int4lora_train.quant.layout import (
    FLOAT_DTYPES,
    NIBBLE_OFFSET,
    Int4Weight,
    num_groups,
    pack_nibbles,
    signed_to_nibbles,
)
from int4lora_train.quant.scheme import STRATEGIES, WeightScheme

logger = logging.getLogger(__name__)

Q_MIN, Q_MAX = -NIBBLE_OFFSET, NIBBLE_OFFSET - 1


# ------------------------------------------------------------------------------------------------------- quantize


def quantize_rtn(
    dense: torch.Tensor,
    group_size: int | None = 128,
    symmetric: bool = True,
    strategy: str = "group",
    scale_dtype: torch.dtype | None = None,
    name: str = "weight",
) -> Int4Weight:
    """Dense ``[out, in]`` -> canonical INT4 with compressed-tensors' min-max observer (round to nearest).

    ``strategy``: ``"group"`` (``group_size`` columns per scale; a last partial group is allowed), ``"channel"``
    (one scale per row) or ``"tensor"`` (one scale). Scales are computed in the weight's dtype, as the library does,
    then stored in ``scale_dtype`` (default: the weight's dtype). An all-zero group gets the dtype's epsilon as its
    scale (the library's guard against division by zero) and quantizes to zeros.
    """
    _check_dense(dense, name)
    if strategy not in STRATEGIES:
        raise UnsupportedFormatError(
            f"{name}: strategy {strategy!r} is not supported; choose one of {list(STRATEGIES)}."
        )
    out_features, in_features = dense.shape
    if strategy == "group":
        if not isinstance(group_size, int) or group_size <= 0:
            raise UnsupportedFormatError(f"{name}: strategy 'group' needs a positive group_size, got {group_size!r}.")
        groups = num_groups(in_features, group_size)
        # Zero padding leaves min / max alone: both are widened to include 0 anyway.
        grouped = torch.nn.functional.pad(dense, (0, groups * group_size - in_features))
        grouped = grouped.reshape(out_features, groups, group_size)
        min_vals, max_vals = grouped.amin(-1), grouped.amax(-1)  # [out, G]
    elif strategy == "channel":
        group_size = in_features
        min_vals, max_vals = dense.amin(1, keepdim=True), dense.amax(1, keepdim=True)  # [out, 1]
    else:
        group_size = in_features
        min_vals, max_vals = dense.amin().reshape(1), dense.amax().reshape(1)  # [1]
    scales, zero_points = _min_max_qparams(min_vals, max_vals, symmetric)
    if scale_dtype is not None and scale_dtype != scales.dtype:
        if scale_dtype not in FLOAT_DTYPES:
            raise UnsupportedFormatError(f"{name}: scale_dtype must be one of {FLOAT_DTYPES}, got {scale_dtype}.")
        scales = _guard_zero(scales.to(scale_dtype))
    q = _quantize(dense, scales, zero_points, group_size if strategy == "group" else None)
    packed = pack_nibbles(signed_to_nibbles(q))
    return Int4Weight.create(
        packed, scales, in_features, group_size, zero_points=None if symmetric else zero_points, name=name
    )


def _min_max_qparams(
    min_vals: torch.Tensor, max_vals: torch.Tensor, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' ``calculate_qparams`` for 4-bit ints: scales in the input dtype, int8 zero points."""
    dtype = min_vals.dtype
    min_vals = torch.min(min_vals, torch.zeros_like(min_vals))
    max_vals = torch.max(max_vals, torch.zeros_like(max_vals))
    bit_range = torch.tensor(float(Q_MAX - Q_MIN), dtype=dtype)
    if symmetric:
        max_abs = torch.max(torch.abs(min_vals), torch.abs(max_vals))
        scales = max_abs / (bit_range / 2)
        zero_points = torch.zeros(scales.shape, dtype=torch.int8)
    else:
        scales = (max_vals - min_vals) / bit_range
        # The library computes the zero point before it guards scale == 0, so 0 / 0 gives NaN, which its int8 cast
        # turns into 0; that is spelled out here instead of relying on the cast.
        zero_points = torch.tensor(float(Q_MIN)) - (min_vals / scales)
        zero_points = torch.clamp(zero_points, Q_MIN, Q_MAX)
        zero_points = torch.nan_to_num(zero_points, nan=0.0)
        zero_points = torch.round(zero_points).to(torch.int8)
    return _guard_zero(scales), zero_points.to(min_vals.device)


def _guard_zero(scales: torch.Tensor) -> torch.Tensor:
    eps = torch.tensor(torch.finfo(scales.dtype).eps, dtype=scales.dtype, device=scales.device)
    return torch.where(scales == 0, eps, scales)


def _quantize(
    dense: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, group_size: int | None
) -> torch.Tensor:
    """int8 ``[out, in]`` in [-8, 7]: ``clamp(round(x / scale + zp))`` in the library's dtype and order."""
    out_features, in_features = dense.shape
    if group_size is not None:
        groups = scales.shape[1]
        padded = torch.nn.functional.pad(dense, (0, groups * group_size - in_features))
        x = padded.reshape(out_features, groups, group_size)
        scales, zero_points = scales.unsqueeze(-1), zero_points.unsqueeze(-1)
    else:
        x = dense
    scaled = x / scales
    scaled = scaled + zero_points.to(scaled.dtype)
    q = torch.round(torch.clamp(scaled, Q_MIN, Q_MAX)).to(torch.int8)
    return q.reshape(out_features, -1)[:, :in_features]


def _check_dense(dense: torch.Tensor, name: str) -> None:
    if not isinstance(dense, torch.Tensor) or dense.dim() != 2 or dense.dtype not in FLOAT_DTYPES:
        got = f"{dense.dtype} {list(dense.shape)}" if isinstance(dense, torch.Tensor) else type(dense).__name__
        raise Int4FormatError(f"{name}: expected a 2-D float16 / bfloat16 / float32 weight [out, in], got {got}.")
    if not bool(torch.isfinite(dense).all()):
        raise Int4FormatError(
            f"{name}: the dense weight {list(dense.shape)} contains NaN or inf; it cannot be quantized."
        )


# ----------------------------------------------------------------------------------------------------- checkpoints


def write_int4_checkpoint(
    config,
    named_tensors: Iterable[tuple[str, torch.Tensor | Int4Weight]],
    out_dir: str | os.PathLike,
    format: str = "compressed-tensors",
    group_size: int | None = 128,
    symmetric: bool = True,
    strategy: str = "group",
    ignore: Iterable[str] = ("lm_head",),
    checkpoint_format: str = "gptq",
    tokenizer=None,
    generation_config=None,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a checkpoint directory from a stream of ``(name, value)`` pairs and return its path.

    ``value`` is a dense tensor, written under ``name`` as is, or an :class:`Int4Weight`, written as the tensors of
    ``format`` (a name in the format registry) under the module prefix ``name`` (a trailing ``.weight`` is
    dropped). ``config`` is a transformers
    config (or its dict); ``config.json`` gets ``quantization_config`` for ``format`` with these settings (every
    INT4 weight must match them; dense linears must be listed in ``ignore``). ``dtype`` is recorded as the
    model dtype. With ``max_shard_bytes`` shards are flushed as they fill, so only one shard is held at a time;
    otherwise everything goes into one ``model.safetensors``. An existing non-empty ``out_dir`` is refused unless
    ``overwrite``; nothing appears at ``out_dir`` until the whole directory is complete.
    """
    ignore = tuple(ignore)
    fmt = format_named(format, in_checkpoints=True)
    block = fmt.config_block(group_size, symmetric, strategy, ignore, checkpoint_format)
    # Every INT4 weight is written and checked with the scheme a reader will parse from the block.
    scheme = parse_quantization_config(block, source="write_int4_checkpoint").default_scheme
    with atomic_directory(out_dir, overwrite) as tmp_dir:
        writer = ShardWriter(tmp_dir, max_shard_bytes)
        for name, value in named_tensors:
            writer.add(_stored_tensors(name, value, fmt, scheme))
        writer.finish()
        _write_config(tmp_dir, config, block, dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp_dir)
        if generation_config is not None:
            generation_config.save_pretrained(tmp_dir)
    logger.info("wrote %s checkpoint to %s (%d shard(s))", format, out_dir, writer.num_shards)
    return out_dir


def save_int4_checkpoint(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    format: str = "compressed-tensors",
    group_size: int | None = 128,
    symmetric: bool = True,
    ignore: Iterable[str] = ("lm_head",),
    tokenizer=None,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
    strategy: str = "group",
    checkpoint_format: str = "gptq",
    on_quantized: Callable[[str, torch.Tensor, Int4Weight, int], None] | None = None,
) -> Path:
    """Quantize every ``nn.Linear`` of a dense transformers ``model`` with :func:`quantize_rtn` (except ``ignore``:
    exact names or ``re:`` regexes) and write it as an INT4 checkpoint (see :func:`write_int4_checkpoint`).

    Embeddings, norms, biases and ignored linears are written in the model's dtype; a weight tied to one written
    earlier (``lm_head`` with tied embeddings) is skipped, as transformers does. Scales take the model's dtype.
    ``on_quantized(module_name, dense [out, in], int4, total)`` is called after each linear is quantized (``total``:
    how many will be), for progress and error reports.
    """
    block = format_named(format, in_checkpoints=True).config_block(
        group_size, symmetric, strategy, ignore, checkpoint_format
    )
    scheme_config = parse_quantization_config(block, source="save_int4_checkpoint")
    quantized = {}
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and scheme_config.scheme_for(module_name, module) is not None:
            _check_group_size(module_name, module.in_features, format, group_size, strategy)
            quantized[module_name] = module
    dense_linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized]
    dtype, config = model_checkpoint_config(model)
    generation_config = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", lambda: False)()
    return write_int4_checkpoint(
        config,
        _model_stream(model, quantized, group_size, symmetric, strategy, on_quantized),
        out_dir,
        format=format,
        group_size=group_size,
        symmetric=symmetric,
        strategy=strategy,
        ignore=tuple(dict.fromkeys([*ignore, *dense_linears])),
        checkpoint_format=checkpoint_format,
        tokenizer=tokenizer,
        generation_config=generation_config if can_generate else None,
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
        dtype=dtype,
    )


def model_checkpoint_config(model: torch.nn.Module) -> tuple[torch.dtype | None, dict]:
    """``(dtype of the model's floating tensors, its config as a dict)`` for a checkpoint written from ``model``;
    ``architectures`` filled in (``from_config()`` leaves it unset; vLLM and AutoModel pick the model class from it)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    config = model.config.to_dict()
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    return dtype, config


def _model_stream(
    model: torch.nn.Module,
    quantized: dict,
    group_size: int | None,
    symmetric: bool,
    strategy: str,
    on_quantized: Callable[[str, torch.Tensor, Int4Weight, int], None] | None = None,
) -> Iterator[tuple[str, torch.Tensor | Int4Weight]]:
    """The model's state, one tensor or one freshly quantized linear at a time, tied duplicates skipped."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    weight_names = {f"{name}.weight": name for name in quantized}
    for key, tensor in model.state_dict().items():
        identity = (tensor.data_ptr(), tuple(tensor.shape))
        if identity in seen and tensor.numel():
            logger.debug("skipping %s: tied to a tensor already written", key)
            continue
        seen.add(identity)
        if key in weight_names:
            module_name = weight_names[key]
            weight = quantized[module_name].weight.detach()
            int4 = quantize_rtn(weight, group_size, symmetric, strategy, name=module_name)
            if on_quantized is not None:
                on_quantized(module_name, weight, int4, len(quantized))
            yield module_name, int4
        else:
            yield key, tensor.detach()


def _check_group_size(module_name: str, in_features: int, format: str, group_size, strategy: str) -> None:
    if strategy == "group" and in_features % group_size:
        raise UnsupportedFormatError(
            f"{module_name}: in_features={in_features} is not a multiple of group_size={group_size}; "
            f"{format} readers (compressed-tensors, vLLM) need whole groups. Choose a group size that divides "
            f"{in_features}, or strategy='channel'."
        )


def _stored_tensors(name: str, value, fmt: Int4Format, scheme: WeightScheme) -> dict[str, torch.Tensor]:
    """One stream item -> the tensors to store (full names)."""
    if isinstance(value, torch.Tensor):
        return {name: value}
    if not isinstance(value, Int4Weight):
        raise CheckpointError(f"{name}: expected a tensor or an Int4Weight, got {type(value).__name__}.")
    prefix = name.removesuffix(".weight")
    _check_matches_scheme(prefix, value, scheme)
    return {f"{prefix}.{key}": tensor for key, tensor in fmt.write(value, scheme, prefix).items()}


def _check_matches_scheme(prefix: str, weight: Int4Weight, scheme: WeightScheme) -> None:
    if weight.g_idx is not None:
        raise CheckpointError(
            f"{prefix}: the weight has an activation-order g_idx; this writer makes checkpoints without act-order "
            "(desc_act / actorder off), which readers would then ignore. Quantize without act-order."
        )
    if scheme.symmetric and weight.zero_points is not None:
        raise CheckpointError(
            f"{prefix}: the weight has zero points but the checkpoint is written as symmetric; pass symmetric=False."
        )
    if scheme.strategy == "group" and weight.num_groups > 1 and weight.group_size != scheme.group_size:
        raise CheckpointError(
            f"{prefix}: group_size {weight.group_size} differs from the checkpoint's {scheme.group_size}."
        )
    if scheme.strategy != "group" and weight.num_groups != 1:
        raise CheckpointError(
            f"{prefix}: strategy {scheme.strategy!r} needs one scale per row, the weight has {weight.num_groups}."
        )


class ShardWriter:
    """Writes safetensors shards into a directory: accumulates tensors and flushes a shard when the next module
    would overflow ``max_shard_bytes``; :meth:`finish` names the shards and writes the index."""

    def __init__(self, directory: Path, max_shard_bytes: int | None):
        if max_shard_bytes is not None and max_shard_bytes <= 0:
            raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}.")
        self.directory, self.max_shard_bytes = directory, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []  # tensor names per flushed shard
        self.written: set[str] = set()
        self.total_bytes = 0

    @property
    def num_shards(self) -> int:
        return len(self.files)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.max_shard_bytes is not None and self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        for key, tensor in tensors.items():
            if key in self.written:
                raise CheckpointError(f"tensor {key} was given twice; every tensor name must be unique.")
            self.written.add(key)
            self.pending[key] = _storable(tensor)
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.pending, self.directory / f"shard-{len(self.files):05d}.tmp", metadata={"format": "pt"})
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        if self.pending or not self.files:
            self._flush()
        if len(self.files) == 1:
            (self.directory / "shard-00000.tmp").rename(self.directory / SINGLE_FILE)
            return
        total = len(self.files)
        weight_map = {}
        for i, names in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            (self.directory / f"shard-{i:05d}.tmp").rename(self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _storable(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor that owns its memory (safetensors refuses views sharing storage)."""
    tensor = tensor.detach().to("cpu")
    if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.contiguous().clone()
    return tensor


def _write_config(directory: Path, config, block: dict, dtype: torch.dtype | None) -> None:
    data = dict(config) if isinstance(config, dict) else config.to_dict()
    data["quantization_config"] = block
    if dtype is not None:
        # transformers 5 reads "dtype", 4.x (and older vLLM) "torch_dtype"; both name the non-quantized tensors' dtype.
        data["dtype"] = data["torch_dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
