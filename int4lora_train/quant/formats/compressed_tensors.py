"""compressed-tensors ``pack-quantized`` (llm-compressor W4A16 / W4A16_ASYM; FORMATS.md §1).

::

    weight_packed      int32 [out, ceil(in/8)]   K packed sequentially: column j in word j // 8, nibble slot j % 8
    weight_shape       int   [2]                 [out, in]
    weight_scale       [1] / [out, 1] / [out, G]
    weight_zero_point  int32 [ceil(out/8), G]    asymmetric only; packed along the OUTPUT axis (tensor strategy: int8 [1])
    weight_g_idx       int32 [in]                activation order only

``weight_packed`` viewed as bytes is the canonical ``packed`` (zero copy); the stored nibble is ``q + 8`` in both.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping

import torch

from int4lora_train.errors import CheckpointError, Int4FormatError, UnsupportedFormatError
from int4lora_train.quant.dequant_at_load import DEQUANT_FORMATS
from int4lora_train.quant.formats.base import (
    INT_DTYPES,
    Int4Format,
    ReadParams,
    check_g_idx,
    check_scales,
    check_tensor,
    check_zero_point_range,
    describe,
    require,
    resolve_group_size,
    supported,
    word_aligned_bytes,
)
from int4lora_train.quant.layout import (
    NIBBLE_OFFSET,
    Int4Weight,
    int32_to_packed,
    int32_words,
    nibbles_to_signed,
    pack_int32_along_rows,
    packed_to_int32,
    signed_to_nibbles,
    unpack_int32_along_rows,
)
from int4lora_train.quant.scheme import CT_FORMAT, STRATEGIES, Int4CheckpointConfig, TargetGroup, WeightScheme

logger = logging.getLogger(__name__)

CT_BLOCK_VERSION = "0.20.0"
"""The compressed-tensors release whose ``quantization_config`` layout :func:`compressed_tensors_config` mimics."""


def from_compressed_tensors(
    tensors: Mapping[str, torch.Tensor],
    name: str = "weight",
    group_size: int | None = None,
    strategy: str | None = None,
) -> Int4Weight:
    """compressed-tensors ``pack-quantized`` tensors -> canonical (zero copy for ``weight_packed``).

    ``tensors`` holds the module-local names ``weight_packed`` int32 ``[out, ceil(in/8)]``, ``weight_shape`` int
    ``[2]``, ``weight_scale`` ``[1] / [out, 1] / [out, G]``, and optionally ``weight_zero_point`` (int32
    ``[ceil(out/8), G]`` packed along the output axis, or int8 ``[1]`` for the tensor strategy, or already unpacked
    int8 ``[out, G]``) and ``weight_g_idx`` int32 ``[in]``. ``group_size`` should come from the quantization scheme;
    it is inferred from the scales only when that is unambiguous. ``name`` (the module) is used in errors.
    """
    words = require(tensors, "weight_packed", name, "compressed-tensors")
    if words.dtype == torch.uint8:
        raise UnsupportedFormatError(
            f"{name}.weight_packed is {describe(words)}: uint8 weight_packed is compressed-tensors' FP4 layout "
            "(nvfp4 / mxfp4-pack-quantized), which is not supported; only INT4 pack-quantized (int32) is."
        )
    check_tensor(words, f"{name}.weight_packed", (torch.int32,), 2, "[out, ceil(in/8)] int32")
    scale = require(tensors, "weight_scale", name, "compressed-tensors")
    shape = require(tensors, "weight_shape", name, "compressed-tensors")
    check_tensor(shape, f"{name}.weight_shape", INT_DTYPES, None, "[2] integer tensor holding [out, in]")
    if shape.numel() != 2:
        raise Int4FormatError(f"{name}.weight_shape is {describe(shape)} = {shape.tolist()}; expected [out, in].")
    out_features, in_features = (int(v) for v in shape.reshape(-1).tolist())
    if out_features != words.shape[0] or in_features <= 0:
        raise Int4FormatError(
            f"{name}.weight_shape says [{out_features}, {in_features}] but weight_packed is {describe(words)}; "
            f"expected weight_packed [{out_features}, {int32_words(max(in_features, 1))}]."
        )
    if words.shape[1] != int32_words(in_features):
        _raise_bit_width(name, words, in_features)
    check_scales(scale, f"{name}.weight_scale")
    if (global_scale := tensors.get("weight_global_scale")) is not None:
        raise UnsupportedFormatError(
            f"{name}.weight_global_scale ({describe(global_scale)}) marks an FP4 (nvfp4) weight; only INT4 is "
            "supported."
        )

    groups = 1 if scale.numel() == 1 or scale.dim() == 1 else scale.shape[1]
    g_idx = tensors.get("weight_g_idx")
    if g_idx is not None:
        g_idx = check_g_idx(g_idx, in_features, f"{name}.weight_g_idx")
    group_size = resolve_group_size(group_size, strategy, in_features, groups, g_idx, name)
    zero_points = tensors.get("weight_zero_point")
    if zero_points is not None:
        zero_points = _unpack_zero_points(zero_points, out_features, groups, name)
    return Int4Weight.create(
        int32_to_packed(words), scale, in_features, group_size, zero_points=zero_points, g_idx=g_idx, name=name
    )


def to_compressed_tensors(weight: Int4Weight, strategy: str | None = None) -> dict[str, torch.Tensor]:
    """Canonical -> exactly the tensors compressed-tensors' ``PackedQuantizationCompressor.compress`` writes.

    ``strategy`` (``"group"`` / ``"channel"`` / ``"tensor"``) only matters for the tensor strategy (scale ``[1]``
    and an unpacked int8 ``[1]`` zero point); by default it is detected from a per-tensor (stride-0) scale.
    """
    out_features, in_features = weight.shape
    is_tensor = strategy == "tensor" or (strategy is None and out_features > 1 and weight.scales.stride(0) == 0)
    tensors = {"weight_packed": packed_to_int32(word_aligned_bytes(weight))}
    if is_tensor:
        _require_per_tensor(weight)
        tensors["weight_scale"] = weight.scales[:1, 0].clone()
    else:
        tensors["weight_scale"] = weight.scales.contiguous()
    tensors["weight_shape"] = torch.tensor([out_features, in_features], dtype=torch.int64, device=weight.device)
    if weight.zero_points is not None:
        check_zero_point_range(weight.zero_points, -NIBBLE_OFFSET, NIBBLE_OFFSET - 1, "compressed-tensors")
        if is_tensor:
            tensors["weight_zero_point"] = weight.zero_points[:1, 0].to(torch.int8).clone()
        else:
            tensors["weight_zero_point"] = pack_int32_along_rows(signed_to_nibbles(weight.zero_points))
    if weight.g_idx is not None:
        tensors["weight_g_idx"] = weight.g_idx.to(torch.int32).contiguous()
    return tensors


def _unpack_zero_points(zero_points: torch.Tensor, out_features: int, groups: int, name: str) -> torch.Tensor:
    """Packed int32 ``[ceil(out/8), G]`` -> int8 ``[out, G]``; unpacked (tensor strategy) ones pass through."""
    label = f"{name}.weight_zero_point"
    if zero_points.dtype not in INT_DTYPES:
        raise Int4FormatError(f"{label} is {describe(zero_points)}; expected an int32 packed or int8 tensor.")
    if zero_points.dtype == torch.int32 and zero_points.dim() == 2:
        expected = (int32_words(out_features), groups)
        if tuple(zero_points.shape) != expected:
            raise Int4FormatError(
                f"{label} is {describe(zero_points)}; a zero point packed along the output axis for {out_features} "
                f"rows and {groups} groups must be int32 {list(expected)}."
            )
        return nibbles_to_signed(unpack_int32_along_rows(zero_points, out_features))
    return zero_points


def _raise_bit_width(name: str, words: torch.Tensor, in_features: int) -> None:
    # W8A16 is the other width llm-compressor packs; any other mismatch is more likely a corrupt tensor.
    if words.shape[1] == -(-in_features // 4):
        raise UnsupportedFormatError(
            f"{name}.weight_packed is {describe(words)} for in_features={in_features}: that is 8-bit packing; "
            "only 4-bit weights are supported."
        )
    raise Int4FormatError(
        f"{name}.weight_packed is {describe(words)} but weight_shape has in_features={in_features}; expected "
        f"[{words.shape[0]}, {int32_words(in_features)}] int32 (8 INT4 values per word)."
    )


def _require_per_tensor(weight: Int4Weight) -> None:
    if weight.num_groups != 1 or not bool((weight.scales == weight.scales[:1, :1]).all()):
        raise Int4FormatError("strategy 'tensor' needs a single scale, but the weight has per-row scales.")
    if weight.zero_points is not None and not bool((weight.zero_points == weight.zero_points[:1, :1]).all()):
        raise Int4FormatError("strategy 'tensor' needs a single zero point, but the weight has per-row zero points.")


# ------------------------------------------------------------------------------------------- quantization_config


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


def _parse_config(block: dict, source: str) -> Int4CheckpointConfig:
    """``config_groups`` of ``{targets, weights, input_activations, ...}`` plus a top-level ``ignore``:
    ``pack-quantized`` INT4 weights (W4A16, W4A16_ASYM, channel / tensor variants, ``actorder``), and beside them
    weight-only 8-bit int / FP8 groups that the loader dequantizes at load (:func:`classify_group`)."""
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
                f"supported; {supported()}."
            )
    if block.get("kv_cache_scheme"):
        logger.warning("%s.kv_cache_scheme is set; it only affects vLLM's attention cache and is ignored here", where)
    top_format = block.get("format")
    groups_block = block.get("config_groups") or {}
    if not isinstance(groups_block, Mapping) or not groups_block:
        raise CheckpointError(f"{where}.config_groups is missing or empty; the checkpoint names no quantized modules.")
    groups = []
    for group_name, group in groups_block.items():
        scheme, refusal = classify_group(group_name, group, top_format, where)
        if refusal is not None:
            raise refusal
        targets = group.get("targets") or []
        if isinstance(targets, str):
            targets = [targets]
        if not targets:
            raise CheckpointError(
                f"{where}.config_groups.{group_name}.targets is empty; the group applies to no module."
            )
        groups.append(TargetGroup(str(group_name), tuple(targets), scheme))
    dequantized = [g for g in groups if g.scheme.dequantize]
    if dequantized and not any(not g.scheme.dequantize for g in groups):
        raise UnsupportedFormatError(
            f"{where}: every config group is 8-bit ({', '.join(f'{g.name}: {g.scheme.describe()}' for g in groups)}); "
            "this toolkit trains LoRA on INT4 (W4A16) bases and dequantizes 8-bit groups only beside INT4 ones. "
            "Quantize the model to W4A16 (llm-compressor, or int4lora-train quantize), or train LoRA on the dense "
            f"model. {supported()}."
        )
    ignore = block.get("ignore") or []
    if isinstance(ignore, str):
        ignore = [ignore]
    return Int4CheckpointConfig("compressed-tensors", tuple(groups), tuple(ignore), source, copy.deepcopy(block))


def classify_group(
    group_name: str, group: Mapping, top_format: str | None, where: str
) -> tuple[WeightScheme | None, UnsupportedFormatError | None]:
    """One ``config_groups`` entry -> ``(scheme, None)`` when the toolkit can load it (packed INT4, or an 8-bit
    weight-only group dequantized at load), else ``(None, the error naming the group, its scheme and the fix)``."""
    gwhere = f"{where}.config_groups.{group_name}"
    fmt = group.get("format") or top_format
    if fmt in (None, "mixed-precision"):
        fmt = CT_FORMAT if top_format in (None, "mixed-precision") else top_format
    weights = group.get("weights")
    if fmt != CT_FORMAT and fmt not in DEQUANT_FORMATS:
        return None, UnsupportedFormatError(
            f"{gwhere}: format {fmt!r} is not supported ({_format_hint(fmt)}); {supported()}."
        )
    for activation in ("input_activations", "output_activations"):
        if group.get(activation):
            bits = (weights or {}).get("num_bits", 8) if isinstance(weights, Mapping) else "?"
            return None, UnsupportedFormatError(
                f"{gwhere}.{activation} is set ({_short(group[activation])}): activation quantization (W{bits}A8 "
                f"/ W4A8 / W8A8 / FP8 with quantized activations) is not supported; only weight-only groups: INT4 "
                "(W4A16), or 8-bit int / FP8 weights dequantized at load (W8A16). Fix: re-quantize with a weight-only "
                f"scheme for this group, or list its modules in ignore to keep them dense. {supported()}."
            )
    if not weights:
        return None, UnsupportedFormatError(f"{gwhere}: no weights quantization; {supported()}.")
    try:
        return _weight_scheme(weights, f"{gwhere}.weights", fmt), None
    except UnsupportedFormatError as exc:
        return None, exc


def describe_group(group: Mapping, top_format: str | None = None) -> str:
    """A config group's scheme in a few words (also for a group the toolkit refuses), e.g.
    ``"int8 channel sym, input_activations int8 (int-quantized)"``."""
    weights = group.get("weights") if isinstance(group.get("weights"), Mapping) else {}
    fmt = group.get("format") or top_format or CT_FORMAT
    kind = "fp" if weights.get("type") == "float" else "int"
    strategy = weights.get("strategy") or ("group" if weights.get("group_size") else "channel")
    if strategy == "group" and weights.get("group_size"):
        strategy = f"group {weights['group_size']}"
    text = f"{kind}{weights.get('num_bits', 8)} {strategy} {'sym' if weights.get('symmetric', True) else 'asym'}"
    acts = group.get("input_activations")
    if isinstance(acts, Mapping):
        text += f", input_activations {'fp' if acts.get('type') == 'float' else 'int'}{acts.get('num_bits', 8)}"
    return f"{text} ({fmt})"


def _weight_scheme(weights: Mapping, where: str, fmt: str = CT_FORMAT) -> WeightScheme:
    """QuantizationArgs of the weights -> WeightScheme, following compressed-tensors' strategy inference."""
    kind = weights.get("type", "int")
    num_bits = weights.get("num_bits", 8)  # compressed-tensors' default
    dequantize = num_bits == 8 and (
        (kind == "int" and fmt in ("pack-quantized", "int-quantized", "naive-quantized"))
        or (kind == "float" and fmt in ("float-quantized", "naive-quantized"))
    )
    if not dequantize and (kind != "int" or num_bits != 4 or fmt != CT_FORMAT):
        if kind not in ("int", "float"):
            what = f"type {kind!r} with {num_bits} bits"
        elif kind == "float":
            what = f"type 'float' with {num_bits} bits (an FP4 / FP8 format)"
        else:
            what = f"num_bits is {num_bits}"
        raise UnsupportedFormatError(
            f"{where}: {what} in format {fmt!r} is not supported: packed INT4 (num_bits 4, pack-quantized) is kept "
            "packed and weight-only 8-bit groups (int8 pack-quantized / int-quantized, FP8 float-quantized) are "
            "dequantized at load; nothing else. Fix: re-quantize this group with W4A16 (or W8A16 / FP8 weight-only), "
            f"or list its modules in ignore to keep them dense. {supported()}."
        )
    if weights.get("dynamic") not in (None, False, "false"):
        raise UnsupportedFormatError(
            f"{where}: dynamic={weights['dynamic']!r}; weights must be statically quantized; {supported()}."
        )
    group_size = weights.get("group_size")
    strategy = weights.get("strategy")
    if strategy is None:
        strategy = "tensor" if group_size is None else "group" if group_size > 0 else "channel"
    if strategy not in STRATEGIES:
        raise UnsupportedFormatError(
            f"{where}: strategy {strategy!r} is not supported; choose one of {list(STRATEGIES)}. {supported()}."
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
    if dequantize and actorder is not None:
        raise UnsupportedFormatError(
            f"{where}: an 8-bit group with actorder={weights.get('actorder')!r} (a g_idx) is not supported; "
            "re-quantize it with actorder 'static' (or none)."
        )
    return WeightScheme(
        format="compressed-tensors",
        group_size=group_size,
        symmetric=bool(weights.get("symmetric", True)),
        strategy=strategy,
        actorder=actorder,
        checkpoint_format=fmt if dequantize else CT_FORMAT,
        num_bits=num_bits,
        type=kind,
        dequantize=dequantize,
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


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


# ---------------------------------------------------------------------------------------------------- the format


class CompressedTensorsFormat(Int4Format):
    name = "compressed-tensors"
    quant_method = "compressed-tensors"
    tensor_names = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
    marker = "weight_packed"
    summary = (
        "compressed-tensors pack-quantized INT4 weights (W4A16 / W4A16_ASYM; group, channel or tensor strategy) "
        "with unquantized activations (weight-only int8 / FP8 groups beside them are dequantized at load)"
    )
    layout = "compressed-tensors (weight_packed int32 [out, in/8], weight_shape, weight_scale)"

    def matches(self, tensors):
        return tensors.get("weight_packed") is not None

    def is_readable(self, tensors):
        return tensors["weight_packed"].dtype == torch.int32  # uint8 is FP4 (nvfp4-pack-quantized)

    def required_tensor_names(self, scheme=None):
        required = ("weight_packed", "weight_scale", "weight_shape")
        return required if scheme is None or scheme.symmetric else (*required, "weight_zero_point")

    def read(self, tensors, name, params: ReadParams):
        return from_compressed_tensors(tensors, name, params.group_size, params.strategy)

    def read_module(self, module, tensors, name, params: ReadParams):
        if params.symmetric and tensors.get("weight_zero_point") is not None:
            # A symmetric scheme's zero point is an initialised-but-unused parameter (compressed-tensors drops it
            # when it compresses); reading it would shift every value.
            tensors = {k: v for k, v in tensors.items() if k != "weight_zero_point"}
        return self.read(tensors, name, params)

    def write(self, weight, scheme, name):
        if not scheme.symmetric and weight.zero_points is None:
            # An asymmetric scheme expects a zero point on every module; a symmetric weight has zero ones.
            weight = dataclasses.replace(weight, zero_points=weight.zero_points_or_zeros())
        return to_compressed_tensors(weight, strategy=scheme.strategy)

    def parse_config(self, block, source):
        return _parse_config(block, source)

    def config_block(self, group_size, symmetric, strategy, ignore, checkpoint_format):
        return compressed_tensors_config(group_size, symmetric, strategy, ignore)


FORMAT = CompressedTensorsFormat()
