"""What an INT4 format is (:class:`Int4Format`), what a reader is told about a module (:class:`ReadParams`), and
the tensor checks every reader shares.

A format object answers every question the toolkit asks about one storage format: the tensors a module of that
format holds, whether a module's tensors are in it, how to read them into the canonical
:class:`~int4lora_train.quant.layout.Int4Weight` and write them back, and how a checkpoint in it describes itself in
``config.json`` (``quantization_config``). The registry (:mod:`int4lora_train.quant.formats`) holds one object per
format; the loader, the packer, the fingerprint, inspection and surgery ask it instead of testing format names.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import torch

from int4lora_train.errors import Int4FormatError, UnsupportedFormatError
from int4lora_train.quant.layout import (
    Int4Weight,
    infer_group_size,
    int32_words,
    num_groups,
    pack_nibbles,
    unpack_nibbles,
)
from int4lora_train.quant.scheme import Int4CheckpointConfig, TargetGroup, WeightScheme

INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


@dataclass(frozen=True)
class ReadParams:
    """What the quantization scheme (and, for a module, its attributes) says about one weight; None = not said.

    ``group_size`` -1 means one group per row (channel or tensor strategy). ``checkpoint_format`` is the scheme's
    (``WeightScheme.checkpoint_format``: GPTQ's zero-point convention for GPTQ).
    """

    group_size: int | None = None
    strategy: str | None = None
    num_bits: int | None = None
    checkpoint_format: str | None = None
    in_features: int | None = None
    symmetric: bool | None = None

    @classmethod
    def from_scheme(cls, scheme, name: str) -> ReadParams:
        """From a :class:`WeightScheme`, a compressed-tensors ``QuantizationScheme`` (``.weights``) /
        ``QuantizationArgs``, or None. ``name`` (the module) is used in errors."""
        args = getattr(scheme, "weights", scheme)
        if args is None:  # no scheme, or a compressed-tensors scheme that quantizes only activations
            return cls()
        num_bits = getattr(args, "num_bits", None)
        kind = getattr(args, "type", "int")
        kind = getattr(kind, "value", kind)
        if kind not in (None, "int"):
            raise UnsupportedFormatError(
                f"{name}: the quantization scheme has {num_bits}-bit {kind} weights; only INT4 is supported."
            )
        strategy = getattr(args, "strategy", None)
        strategy = getattr(strategy, "value", strategy)
        group_size = getattr(args, "group_size", None)
        if strategy in ("channel", "tensor") or group_size in (-1, 0):
            group_size = -1
        return cls(
            group_size=group_size,
            strategy=strategy,
            num_bits=num_bits,
            checkpoint_format=getattr(args, "checkpoint_format", None),
            symmetric=getattr(args, "symmetric", None),
        )


class Int4Format:
    """One INT4 storage format. Subclass it in one file of this package, set the attributes, implement the methods,
    and put one instance in :data:`int4lora_train.quant.formats.FORMATS` (docs/formats.md shows a skeleton).

    ``tensors`` arguments are a module's own tensors by module-local name (``weight_packed``, ``qweight``, ...);
    values may be None (absent). ``matches`` looks only at names, dtypes and shapes.
    """

    name: str = ""
    """The format's name: ``WeightScheme.format``, ``write_int4_checkpoint(format=...)``, reports."""
    quant_method: str | None = None
    """``quantization_config.quant_method`` of checkpoints in this format; None for an in-memory layout only."""
    tensor_names: tuple[str, ...] = ()
    """Every tensor a module of this format may hold."""
    marker: str = ""
    """The tensor that says a module holds an INT4 weight in this format (formats may share one: GPTQ and AWQ)."""
    summary: str = ""
    """What is supported, for 'supported: ...' in error messages."""
    layout: str = ""
    """The tensors' shapes, for errors about tensors that match no format."""

    def __repr__(self) -> str:
        return f"<INT4 format {self.name!r}>"

    # -------------------------------------------------------------------------------------------- recognising

    def matches(self, tensors: Mapping[str, torch.Tensor | None]) -> bool:
        """Whether these tensors are stored in this format (by names, dtypes and shapes; values are not read)."""
        raise NotImplementedError

    def is_readable(self, tensors: Mapping[str, torch.Tensor | None]) -> bool:
        """False for matching tensors that are a variant this format cannot read (then ``read`` says why)."""
        return True

    def required_tensor_names(self, scheme: WeightScheme | None = None) -> tuple[str, ...]:
        """The tensors a module stored with ``scheme`` must hold."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- converting

    def read(self, tensors: Mapping[str, torch.Tensor | None], name: str, params: ReadParams) -> Int4Weight:
        """This format's tensors -> canonical. ``name`` (the module) is used in errors."""
        raise NotImplementedError

    def read_module(
        self, module: torch.nn.Module, tensors: Mapping[str, torch.Tensor | None], name: str, params: ReadParams
    ) -> Int4Weight:
        """Like :meth:`read`, for tensors held by a live module (whose attributes may complete ``params``)."""
        return self.read(tensors, name, params)

    def write(self, weight: Int4Weight, scheme: WeightScheme, name: str) -> dict[str, torch.Tensor]:
        """Canonical -> this format's tensors (module-local names), as a checkpoint with ``scheme`` stores them.
        Checkpoint formats only (``quant_method`` set), as are the two methods below."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ config.json

    def parse_config(self, block: dict, source: str) -> Int4CheckpointConfig:
        """A ``quantization_config`` block whose ``quant_method`` is this format's -> the parsed config."""
        raise NotImplementedError

    def config_block(
        self,
        group_size: int | None,
        symmetric: bool,
        strategy: str,
        ignore: Iterable[str],
        checkpoint_format: str,
    ) -> dict:
        """The ``quantization_config`` block of a checkpoint written in this format with these settings."""
        raise NotImplementedError


class QuantLinearFormat(Int4Format):
    """GPTQ and AWQ: quant-linear modules (``qweight``, ``qzeros``, ``scales`` [, ``g_idx``]) told apart by shapes,
    whose config block quantizes every ``Linear`` with one scheme."""

    tensor_names = ("qweight", "qzeros", "scales", "g_idx")
    marker = "qweight"

    def matches(self, tensors):
        qweight, scales = tensors.get("qweight"), tensors.get("scales")
        both_2d = all(t is not None and len(t.shape) == 2 for t in (qweight, scales))
        return both_2d and self.shapes_match(qweight.shape, scales.shape)

    def shapes_match(self, qweight_shape: torch.Size, scales_shape: torch.Size) -> bool:
        """Whether 2-D ``qweight`` and ``scales`` of these shapes are this format's."""
        raise NotImplementedError

    def required_tensor_names(self, scheme=None):
        return ("qweight", "qzeros", "scales")

    def read_module(self, module, tensors, name, params):
        return self.read(tensors, name, quant_linear_params(module, params))

    def parse_config(self, block, source):
        scheme, ignore = self.parse_scheme(block, source)
        group = TargetGroup(self.name, ("Linear",), scheme)
        return Int4CheckpointConfig(
            self.quant_method, (group,), tuple(dict.fromkeys(ignore)), source, copy.deepcopy(block)
        )

    def parse_scheme(self, block: dict, source: str) -> tuple[WeightScheme, list[str]]:
        """The block -> the one scheme of every ``Linear``, and the modules it leaves dense."""
        raise NotImplementedError


def supported() -> str:
    """``supported: ...`` with every registered checkpoint format, for the end of an error message."""
    from int4lora_train.quant.formats import checkpoint_formats  # the registry imports this module first

    summaries = [fmt.summary for fmt in checkpoint_formats()]
    listed = ", ".join(summaries[:-1]) + f" and {summaries[-1]}" if len(summaries) > 1 else "".join(summaries)
    return f"supported: {listed}"


# ------------------------------------------------------------------------------------------------ shared checks


def resolve_group_size(
    group_size: int | None, strategy: str | None, in_features: int, groups: int, g_idx, name: str
) -> int:
    """The group size to build the weight with: the scheme's (-1 = whole row), else inferred from the scales."""
    if strategy in ("channel", "tensor") or group_size == -1:
        if groups != 1:
            raise Int4FormatError(
                f"{name}: the scheme is per {'channel' if strategy != 'tensor' else 'tensor'} but the scales have "
                f"{groups} groups; expected one scale per row (or one in all)."
            )
        return in_features
    if group_size is not None:
        if group_size <= 0:
            raise Int4FormatError(f"{name}: group_size must be positive or -1 (per channel), got {group_size}.")
        # With or without a g_idx, a writer makes ceil(in / group_size) groups.
        if num_groups(in_features, group_size) != groups:
            raise Int4FormatError(
                f"{name}: the scales have {groups} groups, but in_features={in_features} with group_size="
                f"{group_size} needs {num_groups(in_features, group_size)}; the checkpoint's group_size does not "
                "match its scales."
            )
        return group_size
    if g_idx is not None:
        return num_groups(in_features, groups)
    return infer_group_size(in_features, groups, name)


def group_size_or_channel(group_size, where: str) -> int | None:
    """A config block's ``group_size``: None for -1 / null (per channel), else a positive integer."""
    if group_size in (-1, None):
        return None
    if not isinstance(group_size, int) or group_size <= 0:
        raise UnsupportedFormatError(f"{where}: group_size must be a positive integer or -1, got {group_size!r}.")
    return group_size


def word_aligned_bytes(weight: Int4Weight) -> torch.Tensor:
    """uint8 ``[out, 4*ceil(in/8)]`` with the padding nibbles beyond ``in`` zero, as compressed-tensors pads."""
    in_features = weight.in_features
    if weight.packed.shape[1] == 4 * int32_words(in_features) and in_features % 8 == 0:
        return weight.packed
    return pack_nibbles(unpack_nibbles(weight.packed)[:, :in_features])


def none_if_all_zero(zero_points: torch.Tensor) -> torch.Tensor | None:
    """None for all-zero zero points (a symmetric weight written by a format that always stores them)."""
    return None if bool((zero_points == 0).all()) else zero_points


def check_zero_point_range(zero_points: torch.Tensor, low: int, high: int, fmt: str) -> None:
    if zero_points.numel() and (int(zero_points.min()) < low or int(zero_points.max()) > high):
        raise UnsupportedFormatError(
            f"zero points range over [{int(zero_points.min())}, {int(zero_points.max())}]; {fmt} stores [{low}, "
            f"{high}] (a GPTQ v1 zero of 16 has no {fmt} equivalent)."
        )


def check_g_idx(g_idx: torch.Tensor, in_features: int, label: str) -> torch.Tensor:
    if g_idx.dtype not in INT_DTYPES or g_idx.dim() != 1 or g_idx.shape[0] != in_features:
        raise Int4FormatError(
            f"{label} is {describe(g_idx)}; expected an int32 [{in_features}] group per input column."
        )
    if g_idx.numel() and bool((g_idx == -1).all()):
        raise Int4FormatError(
            f"{label} is all -1: the activation-order index was never filled (compressed-tensors initialises it to "
            "-1 before GPTQ calibration); the checkpoint is incomplete."
        )
    return g_idx.to(torch.int32)


def check_tensor(t, label: str, dtypes, dims: int | None, expected: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in dtypes or (dims is not None and t.dim() != dims):
        raise Int4FormatError(f"{label} is {describe(t)}; expected {expected}.")


def check_scales(scales, label: str, dims: int | None = None, expected: str = "[1], [out, 1] or [out, G]") -> None:
    if (
        not isinstance(scales, torch.Tensor)
        or scales.dtype not in (torch.float16, torch.bfloat16, torch.float32)
        or (dims is not None and scales.dim() != dims)
    ):
        raise Int4FormatError(f"{label} is {describe(scales)}; expected float16 / bfloat16 / float32 {expected}.")
    if not bool(torch.isfinite(scales).all()):
        bad = (~torch.isfinite(scales)).nonzero()[0].tolist()
        raise Int4FormatError(
            f"{label} ({describe(scales)}) contains NaN or inf (first at {bad}); the checkpoint is corrupt or was "
            "quantized from a diverged model."
        )


def require(tensors: Mapping[str, torch.Tensor | None], key: str, name: str, fmt: str) -> torch.Tensor:
    value = tensors.get(key)
    if value is None:
        raise Int4FormatError(f"{name}.{key} is missing; a {fmt} INT4 module needs it (found {describe_all(tensors)}).")
    return value


def describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} {list(t.shape)}"
    return "missing" if t is None else type(t).__name__


def describe_all(tensors: Mapping[str, torch.Tensor | None]) -> str:
    return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in tensors.items()) + "}"


def quant_linear_params(module: torch.nn.Module, params: ReadParams) -> ReadParams:
    """A GPTQ / AWQ quant-linear module's ``group_size`` and ``infeatures`` / ``in_features`` attributes fill what
    the scheme left unsaid."""
    group_size, in_features = params.group_size, params.in_features
    if group_size is None:
        value = getattr(module, "group_size", None)
        group_size = value if isinstance(value, int) else None
    if in_features is None:
        in_features = next(
            (v for v in (getattr(module, a, None) for a in ("infeatures", "in_features")) if isinstance(v, int)), None
        )
    return replace(params, group_size=group_size, in_features=in_features)


def quant_linear_group_size(fmt: str, group_size: int | None, strategy: str) -> int | None:
    """GPTQ / AWQ config blocks: the group size for ``strategy`` (None per channel); they have no tensor strategy."""
    if strategy == "tensor":
        raise UnsupportedFormatError(f"{fmt} has no per-tensor strategy; use 'group' or 'channel'.")
    return group_size if strategy == "group" else None
