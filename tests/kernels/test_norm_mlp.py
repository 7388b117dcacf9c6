"""The Triton RMSNorm and SwiGLU kernels against the torch references of int4lora_train.speed.fused_ops (CPU
interpreter without CUDA, compiled with it)."""

from __future__ import annotations

import pytest
import torch
from modeling_helpers import rel_diff

from int4lora_train.speed.fused_ops import rms_norm_bwd_torch, rms_norm_fwd_torch, swiglu_bwd_torch, swiglu_fwd_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def norm_mlp(triton_kernels):
    return triton_kernels.norm_mlp


def test_rms_norm_kernels_equal_torch(norm_mlp):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 48, generator=gen) * 3).to(DEVICE)  # 48: not a power of two, masked tail
    w = (torch.rand(48, generator=gen) + 0.5).to(DEVICE)
    g = torch.randn(5, 48, generator=gen).to(DEVICE)
    ref_y, ref_rstd = rms_norm_fwd_torch(x, w, 1e-6)
    ref_dx = rms_norm_bwd_torch(g, x, w, ref_rstd)
    for _ in range(2):  # the second launch of a specialization goes straight to the compiled kernel (on CUDA)
        y, rstd = norm_mlp.rms_norm_fwd(x, w, 1e-6)
        assert rel_diff(y, ref_y) <= 1e-6 and rel_diff(rstd, ref_rstd) <= 1e-6
        assert rel_diff(norm_mlp.rms_norm_bwd(g, x, w, rstd), ref_dx) <= 1e-6


def test_swiglu_kernels_equal_torch(norm_mlp):
    gen = torch.Generator().manual_seed(0)
    # 1100 columns: a partial block; gate and up as column slices of one [3, 2200] buffer, as a projection group
    # hands them over (strided rows)
    both = torch.randn(3, 2200, generator=gen).to(DEVICE) * 4
    gate, up = both[:, :1100], both[:, 1100:]
    dh = torch.randn(3, 1100, generator=gen).to(DEVICE)
    for _ in range(2):  # the second launch goes straight to the compiled kernel (on CUDA)
        assert rel_diff(norm_mlp.swiglu_fwd(gate, up), swiglu_fwd_torch(gate, up)) <= 1e-6
        for got, ref in zip(norm_mlp.swiglu_bwd(dh, gate, up), swiglu_bwd_torch(dh, gate, up)):
            assert rel_diff(got, ref) <= 1e-6
