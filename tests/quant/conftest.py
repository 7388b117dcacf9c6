"""Shared fixtures for the INT4 tests: independent reference packers written from FORMATS.md's formulas (plain
integer loops that share no code with int4lora_train.quant), a float reference dequantizer, and the real
compressed-tensors library's quantize + pack."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch


def _to_int32(words: np.ndarray) -> torch.Tensor:
    """uint32 / int64 words -> a torch int32 tensor with the same bits."""
    return torch.from_numpy(np.ascontiguousarray(words.astype(np.uint32)).view(np.int32))


def pack_sequential(u: np.ndarray) -> torch.Tensor:
    """u [rows, cols] in 0..15 -> int32 [rows, ceil(cols/8)]: column j in word j // 8, bits 4*(j%8).. (zero padded)."""
    rows, cols = u.shape
    words = np.zeros((rows, -(-cols // 8)), dtype=np.uint64)
    for j in range(cols):
        words[:, j // 8] |= u[:, j].astype(np.uint64) << np.uint64(4 * (j % 8))
    return _to_int32(words)


def pack_gptq(u_kn: np.ndarray, zeros_gn: np.ndarray, v1: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoGPTQ's QuantLinear.pack loops: qweight [in/8, out] from u [in, out]; qzeros [G, out/8] from z [G, out]
    (v1 stores z - 1)."""
    k, n = u_kn.shape
    qweight = np.zeros((k // 8, n), dtype=np.uint64)
    i, row = 0, 0
    while row < qweight.shape[0]:
        for j in range(i, i + 8):
            qweight[row] |= u_kn[j].astype(np.uint64) << np.uint64(4 * (j - i))
        i += 8
        row += 1
    stored = zeros_gn.astype(np.int64) - (1 if v1 else 0)
    assert stored.min() >= 0, "v1 cannot store a zero of 0"
    groups = stored.shape[0]
    qzeros = np.zeros((groups, -(-n // 8)), dtype=np.uint64)
    i, col = 0, 0
    while col < qzeros.shape[1]:
        for j in range(i, min(i + 8, n)):
            qzeros[:, col] |= stored[:, j].astype(np.uint64) << np.uint64(4 * (j - i))
        i += 8
        col += 1
    return _to_int32(qweight), _to_int32(qzeros)


AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]


def pack_awq(u_kn: np.ndarray, zeros_gn: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoAWQ's WQLinear_GEMM.from_linear loops: slot i of word c holds column c*8 + order_map[i]."""

    def pack(values: np.ndarray) -> np.ndarray:
        rows, cols = values.shape
        words = np.zeros((rows, cols // 8), dtype=np.uint64)
        for col in range(cols // 8):
            for i in range(8):
                words[:, col] |= values[:, col * 8 + AWQ_ORDER_MAP[i]].astype(np.uint64) << np.uint64(i * 4)
        return words

    return _to_int32(pack(u_kn)), _to_int32(pack(zeros_gn))


def reference_dense(
    q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, group_of_column: torch.Tensor
) -> torch.Tensor:
    """W[r, c] = (q[r, c] - zp[r, g(c)]) * s[r, g(c)] in float64 (exact), rounded once to the scale's dtype."""
    s = scales.to(torch.float64)[:, group_of_column]
    value = q.to(torch.float64)
    if zero_points is not None:
        value = value - zero_points.to(torch.float64)[:, group_of_column]
    return (value * s).to(scales.dtype)


def random_case(out_features: int, in_features: int, groups: int, dtype: torch.dtype, asym: bool, seed: int = 0):
    """Random signed q [out, in] in [-8, 7], scales [out, G] (some negative, as GPTQ can write), zp [out, G]."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (out_features, in_features), generator=gen, dtype=torch.int16)
    scales = (torch.randn(out_features, groups, generator=gen) * 0.05).to(dtype)
    zero_points = torch.randint(-8, 8, (out_features, groups), generator=gen, dtype=torch.int16) if asym else None
    return q, scales, zero_points


def ct_quantize(weight: torch.Tensor, strategy: str, group_size: int | None, symmetric: bool):
    """The compressed-tensors library: observer (calculate_qparams) -> compress -> decompress.

    Returns (compressed tensors, the library's dense dequantization, scale, zero point, int8 q, scheme).
    """
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    out_features = weight.shape[0]
    args = QuantizationArgs(num_bits=4, strategy=strategy, group_size=group_size, symmetric=symmetric)
    if strategy == "group":
        grouped = weight.reshape(out_features, -1, group_size)
        min_vals, max_vals = grouped.amin(-1), grouped.amax(-1)
    elif strategy == "channel":
        min_vals, max_vals = weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
    else:
        min_vals, max_vals = weight.amin(), weight.amax()
    scale, zero_point = calculate_qparams(min_vals, max_vals, args)
    q = quantize(weight, scale, zero_point, args, dtype=torch.int8)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    compressed = PackedQuantizationCompressor.compress(
        {"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point}, scheme
    )
    dense = PackedQuantizationCompressor.decompress(dict(compressed), scheme)["weight"]
    return SimpleNamespace(
        tensors=compressed, dense=dense, scale=scale, zero_point=zero_point, q=q, scheme=scheme, args=args
    )


@pytest.fixture(scope="session")
def ref() -> SimpleNamespace:
    """The reference packers and dequantizer (session-scoped so hypothesis tests can use them)."""
    return SimpleNamespace(
        pack_sequential=pack_sequential,
        pack_gptq=pack_gptq,
        pack_awq=pack_awq,
        dense=reference_dense,
        random_case=random_case,
    )


@pytest.fixture(scope="session")
def ct() -> SimpleNamespace:
    """The compressed-tensors library (tests that need it are skipped where it is not installed)."""
    pytest.importorskip("compressed_tensors")
    return SimpleNamespace(quantize=ct_quantize)
