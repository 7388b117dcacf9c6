"""Many experts' INT4 weights of one projection, stacked: the canonical layout with a leading expert axis.

::

    packed       uint8 [E, out, P]   expert e's canonical ``packed`` (column 2b in the low nibble of byte b, q + 8)
    scales       float [E, out, G]
    zero_points  int8  [E, out, G]   optional (asymmetric)

Every expert of a stack shares ``in_features``, ``out_features``, ``group_size``, the scales' dtype and the
symmetry; activation order (``g_idx``) is refused (no MoE writer stores one per expert that differs from the
trivial order, and the grouped kernel does not read one).

Rows are independent in the dequantization rule (``W[r, c]`` needs row ``r``'s bytes, scales and zero points
only), so the experts ``ids`` of a stack, viewed as one ``[n * out, P]`` weight (:meth:`Int4ExpertStack.rows`), dequantize to
exactly the ``n`` experts' dense weights one after the other: that is the torch reference of the grouped
dequantization (:func:`dequantize_experts_torch`), bit-identical to dequantizing each expert alone and so to
compressed-tensors' own per-expert decompression.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from int4lora_train.errors import Int4FormatError, UnsupportedFormatError
from int4lora_train.quant.dequant import dequantize_torch
from int4lora_train.quant.layout import Int4Weight


@dataclass(frozen=True)
class Int4ExpertStack:
    """One projection's INT4 weights for ``E`` experts (see the module docstring)."""

    packed: torch.Tensor
    scales: torch.Tensor
    in_features: int
    group_size: int
    zero_points: torch.Tensor | None = None

    @classmethod
    def from_weights(cls, weights: Sequence[Int4Weight], name: str = "experts") -> Int4ExpertStack:
        """Stack per-expert canonical weights (a copy of the packed bytes: the INT4 size, never a dense one)."""
        if not weights:
            raise Int4FormatError(f"{name}: no expert weights to stack.")
        first = weights[0]
        for e, weight in enumerate(weights):
            where = f"{name}.{e}"
            if weight.g_idx is not None:
                raise UnsupportedFormatError(
                    f"{where}: activation-order (g_idx) INT4 experts are not supported; re-quantize the experts "
                    "without actorder=group / desc_act (GPTQ static order stores no permutation)."
                )
            if weight.shape != first.shape or weight.group_size != first.group_size:
                raise Int4FormatError(
                    f"{where}: weight {list(weight.shape)} with group_size {weight.group_size} differs from expert 0's "
                    f"{list(first.shape)} with group_size {first.group_size}; every expert of a projection must share "
                    "one shape and scheme."
                )
            if weight.packed.shape != first.packed.shape or weight.scales.dtype != first.scales.dtype:
                raise Int4FormatError(
                    f"{where}: packed {tuple(weight.packed.shape)} / scales {weight.scales.dtype} differ from expert "
                    f"0's {tuple(first.packed.shape)} / {first.scales.dtype}."
                )
        shared_symmetry(weights, name)
        packed = torch.stack([w.packed for w in weights])
        scales = torch.stack([w.scales.contiguous() for w in weights])
        zero_points = None if first.zero_points is None else torch.stack([w.zero_points for w in weights])
        return cls(packed, scales, first.in_features, first.group_size, zero_points)

    @property
    def num_experts(self) -> int:
        return self.packed.shape[0]

    @property
    def out_features(self) -> int:
        return self.packed.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def expert(self, e: int) -> Int4Weight:
        """Expert ``e``'s canonical weight (views, no copy)."""
        zero_points = None if self.zero_points is None else self.zero_points[e]
        return Int4Weight(self.packed[e], self.scales[e], self.in_features, self.group_size, zero_points)

    def rows(self, ids: torch.Tensor | None = None) -> Int4Weight:
        """Experts ``ids`` (all when None: a view, no copy) as one ``[n * out, in]`` weight, expert after expert."""
        packed, scales, zero_points = self.packed, self.scales, self.zero_points
        if ids is not None and not (ids.numel() == self.num_experts and _is_arange(ids)):
            packed, scales = packed.index_select(0, ids), scales.index_select(0, ids)
            zero_points = None if zero_points is None else zero_points.index_select(0, ids)
        rows = packed.shape[0] * packed.shape[1]
        return Int4Weight(
            packed.reshape(rows, packed.shape[2]),
            scales.reshape(rows, scales.shape[2]),
            self.in_features,
            self.group_size,
            None if zero_points is None else zero_points.reshape(rows, zero_points.shape[2]),
        )

    def to(self, device) -> Int4ExpertStack:
        zero_points = None if self.zero_points is None else self.zero_points.to(device)
        return Int4ExpertStack(
            self.packed.to(device), self.scales.to(device), self.in_features, self.group_size, zero_points
        )


def shared_symmetry(weights: Sequence[Int4Weight], name: str = "experts") -> bool:
    """Whether the experts' weights of one projection are symmetric (no zero points); an error naming the first
    expert that differs from expert 0, since a stack holds zero points for all its experts or for none."""
    symmetric = weights[0].zero_points is None
    for e, weight in enumerate(weights):
        if (weight.zero_points is None) != symmetric:
            first, other = ("symmetric", "asymmetric") if symmetric else ("asymmetric", "symmetric")
            raise Int4FormatError(
                f"{name}: expert 0 is {first} but expert {e} is {other}; every expert of a projection must share "
                "one scheme."
            )
    return symmetric


def _is_arange(ids: torch.Tensor) -> bool:
    return bool((ids.cpu() == torch.arange(ids.numel())).all())


def dequantize_experts_torch(
    stack: Int4ExpertStack, ids: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Dense ``[n, out, in]`` weights of experts ``ids`` (int64 ``[n]``): the reference (see the module docstring)."""
    dense = dequantize_torch(stack.rows(ids), dtype)
    return dense.reshape(ids.numel(), stack.out_features, stack.in_features)


def dequantize_experts(
    stack: Int4ExpertStack,
    ids: torch.Tensor,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense ``[n, out, in]`` weights of experts ``ids`` in ``dtype`` (default: the scales'), one kernel launch on
    the Triton path (:mod:`int4lora_train.kernels.grouped_dequant`), the torch reference elsewhere; the backend is
    chosen by :func:`int4lora_train.kernels.backend.use_triton`. Bit-identical either way."""
    from int4lora_train.kernels.backend import use_triton  # the kernels package builds on this one

    if use_triton(stack.device, backend):
        from int4lora_train.kernels.grouped_dequant import dequantize_experts_triton

        return dequantize_experts_triton(stack, ids, dtype, out)
    dense = dequantize_experts_torch(stack, ids, dtype)
    return dense if out is None else out.copy_(dense)
