"""The Triton cross-entropy row kernel against the torch rows of int4lora_train.speed.chunked_loss (CPU interpreter
without CUDA, compiled with it)."""

from __future__ import annotations

import pytest
import torch
from modeling_helpers import logits_case, rel_diff

from int4lora_train.errors import UnsupportedFormatError
from int4lora_train.speed.chunked_loss import cross_entropy_rows_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def cross_entropy(triton_kernels):
    return triton_kernels.cross_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_triton_rows_equal_torch_rows(cross_entropy, dtype, softcap):
    logits, targets = logits_case(seed=3, rows=5, vocab=100, dtype=dtype)
    logits, targets = logits.to(DEVICE), targets.to(DEVICE)
    scale = torch.tensor(0.5, device=DEVICE)
    ref = logits.clone()
    ref_loss = cross_entropy_rows_torch(ref, targets, scale, softcap)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 gradients: one rounding each, ties may differ
    for _ in range(2):  # the second launch goes straight to the compiled kernel (on CUDA)
        work = logits.clone()
        loss = cross_entropy.cross_entropy_rows_triton(work, targets, scale, softcap, block=32)  # 4 blocks, 1 partial
        assert rel_diff(loss, ref_loss) <= 1e-5
        assert rel_diff(work, ref) <= tol
    untouched = logits.clone()
    loss_only = cross_entropy.cross_entropy_rows_triton(
        untouched, targets, scale, softcap, compute_grad=False, block=32
    )
    assert torch.equal(untouched, logits) and rel_diff(loss_only, ref_loss) <= 1e-5


def test_triton_rows_reject_strided_logits(cross_entropy):
    logits = torch.randn(4, 10).t()
    with pytest.raises(UnsupportedFormatError, match="unit column stride"):
        cross_entropy.cross_entropy_rows_triton(logits, torch.zeros(10, dtype=torch.long), torch.tensor(1.0))
