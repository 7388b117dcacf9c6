"""The fused LoRA-dropout kernels against the torch references of int4lora_train.modeling.lora_dropout (CPU
interpreter without CUDA, compiled with it): the mask bits, the forward and backward products, and the masks'
statistics."""

from __future__ import annotations

import pytest
import torch
from modeling_helpers import rel_diff

from int4lora_train.errors import UnsupportedFormatError
from int4lora_train.modeling.lora_dropout import (
    dropout_keep_mask,
    dropout_lora_a_backward_torch,
    dropout_lora_a_torch,
    philox4x32,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEEDS = (123, 456_789, 2**31 - 2)


@pytest.fixture(scope="module")
def kernels(triton_kernels):
    return triton_kernels.lora_dropout


def _case(rows: int, width: int, ranks: tuple[int, ...], dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=gen)
    a = torch.randn(sum(ranks), width, generator=gen) / width**0.5
    gs = torch.randn(rows, sum(ranks), generator=gen)
    grad_x = torch.randn(rows, width, generator=gen)
    return (t.to(DEVICE, dtype) for t in (x, a, gs, grad_x))


def test_philox_reference_matches_the_random123_known_answer():
    # Random123's kat_vectors: philox4x32, 10 rounds, counter 0, key 0 -> 6627e8d5 e169c58d bc57ac4c 9b00dbd8
    words = philox4x32(torch.zeros(1, dtype=torch.int64), 0, rounds=10)
    assert [w.item() for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("p", [0.1, 0.7])  # 0.7: a threshold above 2**31 (its sign bit set)
def test_kernel_masks_are_the_reference_masks(kernels, p):
    rows, width = 37, 100  # a partial quad, a partial row block and a partial column block
    ones = torch.ones(rows, width, device=DEVICE)
    grad_x = torch.zeros(rows, width, device=DEVICE)
    # gs = 1, A = 1: the grad_x increment is keep / (1 - p) itself
    kernels.dropout_lora_a_backward(
        ones,
        torch.ones(rows, 1, device=DEVICE),
        torch.ones(1, width, device=DEVICE),
        (1,),
        (SEEDS[1],),
        p,
        grad_x,
        False,
    )
    keep = dropout_keep_mask(SEEDS[1], rows, width, p, device=DEVICE)
    assert 0 < keep.float().mean().item() < 1
    assert torch.equal(grad_x, keep.float() / (1 - p))


@pytest.mark.parametrize(
    "rows,ranks,split",
    [(1, (4,), 1), (70, (4, 8, 4), 1), (70, (4, 8, 4), 2), (130, (5, 19), 2)],  # r not a multiple of 16; T = 1
)
def test_forward_equals_reference(kernels, rows, ranks, split):
    width, p = 100, 0.25
    x, a, _, _ = _case(rows, width, ranks)
    seeds = SEEDS[: len(ranks)]
    ref = dropout_lora_a_torch(x, a, ranks, seeds, p)
    xa = kernels.dropout_lora_a(x, a, ranks, seeds, p, k_splits=split)
    assert xa.dtype == x.dtype and xa.shape == (rows, sum(ranks))
    assert rel_diff(xa, ref) <= 1e-6


@pytest.mark.parametrize("rows,ranks,t_blocks", [(1, (4,), 1), (70, (4, 8, 4), 1), (130, (5, 19), 2)])
def test_backward_equals_reference(kernels, rows, ranks, t_blocks):
    width, p = 100, 0.25
    x, a, gs, grad_x = _case(rows, width, ranks)
    seeds = SEEDS[: len(ranks)]
    ref_dx, ref_da = dropout_lora_a_backward_torch(x, gs, a, ranks, seeds, p)
    updated = grad_x.clone()
    grad_a = kernels.dropout_lora_a_backward(x, gs, a, ranks, seeds, p, updated, True, t_blocks=t_blocks)
    assert grad_a.dtype == torch.float32 and grad_a.shape == a.shape
    assert rel_diff(updated, grad_x + ref_dx) <= 1e-6
    assert rel_diff(grad_a, ref_da) <= 1e-6
    # Each output alone: grad_x untouched without grad_A, and grad_A without grad_x.
    alone = grad_x.clone()
    assert kernels.dropout_lora_a_backward(x, gs, a, ranks, seeds, p, alone, False, t_blocks=t_blocks) is None
    assert torch.equal(alone, updated)
    assert rel_diff(kernels.dropout_lora_a_backward(x, gs, a, ranks, seeds, p, None, True), ref_da) <= 1e-6


@pytest.mark.skipif(DEVICE != "cuda", reason="Triton's interpreter multiplies bf16 bit patterns in tl.dot")
def test_bf16_forward_and_backward_are_close_to_the_fp32_reference(kernels):
    rows, width, ranks, p = 70, 100, (8, 8), 0.1
    x, a, gs, grad_x = _case(rows, width, ranks, dtype=torch.bfloat16)
    ref = dropout_lora_a_torch(x, a, ranks, SEEDS[:2], p)
    ref_dx, ref_da = dropout_lora_a_backward_torch(x, gs, a, ranks, SEEDS[:2], p)
    xa = kernels.dropout_lora_a(x, a, ranks, SEEDS[:2], p)
    assert xa.dtype == torch.bfloat16 and rel_diff(xa, ref) <= 1e-2
    updated = grad_x.clone()
    grad_a = kernels.dropout_lora_a_backward(x, gs, a, ranks, SEEDS[:2], p, updated, True)
    assert rel_diff(updated, grad_x.float() + ref_dx) <= 1e-2  # one rounding of the sum to bf16
    assert rel_diff(grad_a, ref_da) <= 1e-5  # bf16 products, fp32 sums


def test_masks_keep_one_minus_p_and_look_independent():
    p, rows, width = 0.1, 512, 1024
    masks = [dropout_keep_mask(seed, rows, width, p) for seed in (1, 2)]
    n = rows * width
    tolerance = 5 * (p * (1 - p) / n) ** 0.5  # 5 standard deviations of a rate over n elements
    for keep in masks:
        assert abs(keep.float().mean().item() - (1 - p)) <= tolerance
    agree = (1 - p) ** 2 + p**2  # two independent masks agree this often
    pairs = {
        "two seeds": (masks[0], masks[1]),
        "rows of one draw": (masks[0][0::4], masks[0][1::4]),  # words 0 and 1 of the same Philox draws
        "next column": (masks[0][:, :-1], masks[0][:, 1:]),
        "next quad of rows": (masks[0][:-4], masks[0][4:]),
    }
    for name, (m1, m2) in pairs.items():
        rate = (m1 == m2).float().mean().item()
        assert abs(rate - agree) <= 5 * (agree * (1 - agree) / m1.numel()) ** 0.5, name


def test_bf16_is_refused_in_the_interpreter(kernels):
    if not kernels.INTERPRETED:
        pytest.skip("compiled kernels: bf16 runs (the test above)")
    x, a, _, _ = _case(4, 16, (4,))
    with pytest.raises(UnsupportedFormatError, match="bf16"):
        kernels.dropout_lora_a(x.bfloat16(), a.bfloat16(), (4,), (1,), 0.1)


def test_masks_depend_on_the_width():
    # The counter is (t div 4) * K + k: a row's mask at width K is not the next rows' at another width.
    narrow, wide = dropout_keep_mask(9, 8, 64, 0.5), dropout_keep_mask(9, 8, 128, 0.5)
    assert torch.equal(narrow[:4], dropout_keep_mask(9, 4, 64, 0.5))  # rows do not depend on how many there are
    assert not torch.equal(narrow, wide[:, :64])
