"""The LoRA dropout backward kernels (:mod:`int4lora_train.kernels.lora_dropout`; the CPU interpreter without CUDA,
compiled with it) against a float64 reference of the same math, and the torch references (today's arithmetic) against
the ops they replace."""

from __future__ import annotations

import pytest
import torch

from int4lora_train.modeling.lora_layer import add_dropped_lora_grad_x_torch, dropped_lora_grad_a_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
P = 0.25
SCALE = 1.0 / (1.0 - P)
CASES = [  # tokens, input width, member ranks
    pytest.param(40, 96, (4,), id="one-r4"),
    pytest.param(64, 128, (16,), id="one-r16"),
    pytest.param(70, 200, (16, 8), id="two-unequal-ragged"),
    pytest.param(130, 64, (16, 16, 16), id="three-r16"),
    pytest.param(33, 160, (3, 24, 7), id="three-unequal-odd"),
    pytest.param(20, 48, (2, 5, 3, 9), id="four-two-launches"),
]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def kernels(triton_kernels):
    return triton_kernels.lora_dropout


def _case(tokens, width, ranks, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed + tokens * 7 + width)
    total = sum(ranks)
    grad_x = torch.randn(tokens, width, generator=gen)
    gs = torch.randn(tokens, total, generator=gen)
    a_cat = torch.randn(total, width, generator=gen) / 4
    x2 = torch.randn(tokens, width, generator=gen)
    masks = [torch.rand(tokens, width, generator=gen) >= P for _ in ranks]
    return [t.to(dtype).to(DEVICE) for t in (grad_x, gs, a_cat, x2)] + [[m.to(DEVICE) for m in masks]]


def _reference_grad_x(grad_x, gs, a_cat, masks, ranks):
    out = grad_x.double().clone()
    for gs_i, a_i, mask in zip(gs.double().split(list(ranks), 1), a_cat.double().split(list(ranks)), masks):
        out += (gs_i @ a_i) * mask * SCALE
    return out


def _reference_grad_a(x2, gs, masks, ranks):
    return [gs_i.t() @ (x2.double() * mask * SCALE) for gs_i, mask in zip(gs.double().split(list(ranks), 1), masks)]


def _tolerances(dtype, reference, launches=1):
    """fp32: summation order; bf16: the one rounding of the store (the CPU interpreter truncates: a whole ulp), and
    with more members than one launch takes, the rounding of each launch's partial sum (up to an ulp of the
    largest value)."""
    peak = reference.abs().max().item()
    if dtype == torch.float32:
        return {"rtol": 1e-5, "atol": 1e-5 * peak}
    return {"rtol": 2**-7, "atol": (1e-3 if launches == 1 else 2**-7) * peak}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("tokens", "width", "ranks"), CASES)
def test_grad_x_kernel_matches_the_float64_math(kernels, tokens, width, ranks, dtype):
    grad_x, gs, a_cat, _, masks = _case(tokens, width, ranks, dtype)
    reference = _reference_grad_x(grad_x, gs, a_cat, masks, ranks)
    out = grad_x.clone()
    result = kernels.add_dropped_lora_grad_x(out, gs, a_cat, masks, ranks, SCALE)
    assert result is out and out.dtype == dtype
    launches = -(-len(ranks) // kernels.MAX_MEMBERS)
    torch.testing.assert_close(out.double(), reference, **_tolerances(dtype, reference, launches))
    if kernels.INTERPRETED and dtype != torch.float32:
        return  # the interpreter truncates to bf16 where the GPU rounds to nearest
    # no worse than the torch path, which rounds every product, dropout and sum
    torch_path = add_dropped_lora_grad_x_torch(grad_x.clone(), gs, a_cat, masks, ranks, SCALE)
    kernel_err = (out.double() - reference).abs().max()
    assert kernel_err <= (torch_path.double() - reference).abs().max() * 1.01 + 1e-6 * reference.abs().max()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("tokens", "width", "ranks"), CASES)
def test_grad_a_kernel_matches_the_float64_math(kernels, tokens, width, ranks, dtype):
    _, gs, _, x2, masks = _case(tokens, width, ranks, dtype)
    grads = kernels.dropped_lora_grad_a(x2, gs, masks, ranks, SCALE)
    assert [tuple(g.shape) for g in grads] == [(r, width) for r in ranks]
    for grad, reference in zip(grads, _reference_grad_a(x2, gs, masks, ranks)):
        assert grad.dtype == torch.float32
        # fp32 sums of exact products (bf16 x bf16 is exact in fp32): tight for every dtype
        torch.testing.assert_close(grad.double(), reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


def test_grad_a_splits_the_tokens_and_sums_the_slices(kernels, monkeypatch):
    """Few columns, many token tiles: several slices (partial sums added afterwards), a ragged last tile."""
    monkeypatch.setattr(kernels, "TARGET_PROGRAMS", 8)
    tokens, width, ranks = 300, 32, (4, 16)
    assert kernels.token_slices(tokens, width) == (1, 5)
    _, gs, _, x2, masks = _case(tokens, width, ranks, torch.float32)
    for grad, reference in zip(
        kernels.dropped_lora_grad_a(x2, gs, masks, ranks, SCALE), _reference_grad_a(x2, gs, masks, ranks)
    ):
        torch.testing.assert_close(grad.double(), reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


def test_token_slices_fill_a_large_gpu(kernels):
    bt, bin_ = kernels.GRAD_A_BLOCK
    for tokens in (2048, 4096, 8192):
        for width in (4096, 14336):
            per_slice, slices = kernels.token_slices(tokens, width)
            assert slices * -(-width // bin_) >= kernels.TARGET_PROGRAMS
            assert per_slice * slices * bt >= tokens > (slices - 1) * per_slice * bt
            assert per_slice & (per_slice - 1) == 0 and per_slice <= kernels.MAX_SLICE_TILES


def test_strided_gs_and_empty_inputs(kernels):
    grad_x, gs, a_cat, x2, masks = _case(24, 64, (4, 8), torch.float32)
    wide = torch.zeros(24, 20, device=DEVICE)
    wide[:, 3:15] = gs  # gs as a column slice (row stride 20)
    strided = wide[:, 3:15]
    out = kernels.add_dropped_lora_grad_x(grad_x.clone(), strided, a_cat, masks, (4, 8), SCALE)
    reference = _reference_grad_x(grad_x, gs, a_cat, masks, (4, 8))
    torch.testing.assert_close(out.double(), reference, **_tolerances(torch.float32, reference))
    grads = kernels.dropped_lora_grad_a(x2, strided, masks, (4, 8), SCALE)
    for grad, ref in zip(grads, _reference_grad_a(x2, gs, masks, (4, 8))):
        torch.testing.assert_close(grad.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    empty = torch.empty(0, 64, device=DEVICE)
    no_masks = [torch.empty(0, 64, dtype=torch.bool, device=DEVICE)]
    assert kernels.add_dropped_lora_grad_x(empty, empty[:, :4], a_cat[:4], no_masks, (4,), SCALE).numel() == 0
    assert torch.equal(
        kernels.dropped_lora_grad_a(empty, empty[:, :4], no_masks, (4,), SCALE)[0], torch.zeros(4, 64, device=DEVICE)
    )


def test_bad_arguments_are_refused(kernels):
    grad_x, gs, a_cat, x2, masks = _case(8, 32, (4, 4), torch.float32)
    with pytest.raises(ValueError, match="one mask per member"):
        kernels.add_dropped_lora_grad_x(grad_x, gs, a_cat, masks[:1], (4, 4), SCALE)
    with pytest.raises(ValueError, match="bool"):
        kernels.dropped_lora_grad_a(x2, gs, [m.float() for m in masks], (4, 4), SCALE)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.add_dropped_lora_grad_x(grad_x.t().contiguous().t(), gs, a_cat, masks, (4, 4), SCALE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_references_are_the_ops_they_replace(dtype):
    """Bit for bit what the fused nodes' backward ran before the kernels: per member the dropout backward of
    ``gs_i @ a_i`` with its saved mask added into grad_x, and ``gs_i.T @`` the dropout of ``x2``."""

    def dropped(t, mask):
        return torch.ops.aten.native_dropout_backward(t, mask, SCALE)

    ranks = (4, 16, 8)
    grad_x, gs, a_cat, x2, masks = _case(36, 80, ranks, dtype)
    expected = grad_x.clone()
    for gs_i, a_i, mask in zip(gs.split(list(ranks), 1), a_cat.split(list(ranks)), masks):
        expected.add_(dropped(gs_i @ a_i, mask))
    assert torch.equal(add_dropped_lora_grad_x_torch(grad_x.clone(), gs, a_cat, masks, ranks, SCALE), expected)
    grads = dropped_lora_grad_a_torch(x2, gs, masks, ranks, SCALE)
    for grad, gs_i, mask in zip(grads, gs.split(list(ranks), 1), masks):
        assert torch.equal(grad, gs_i.t() @ dropped(x2, mask))


# ------------------------------------------------------------------------------------------------ the forward

PROJECTION_CASES = [  # tokens, input width (a multiple of 4), member ranks
    pytest.param(40, 96, (4,), id="one-r4"),
    pytest.param(70, 200, (16, 8), id="two-unequal-ragged"),
    pytest.param(33, 520, (3, 24, 7), id="three-unequal-two-steps"),
    pytest.param(20, 48, (2, 5, 3, 9), id="four-two-launches"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("tokens", "width", "ranks"), PROJECTION_CASES)
def test_projection_kernel_matches_the_float64_math_of_its_masks(kernels, tokens, width, ranks, dtype):
    _, _, a_cat, x2, _ = _case(tokens, width, ranks, dtype)
    torch.manual_seed(3)
    xa, masks = kernels.dropped_lora_projection(x2, a_cat, ranks, P)
    assert xa.shape == (tokens, sum(ranks)) and xa.dtype == dtype
    assert len(masks) == len(ranks) and all(m.dtype == torch.bool and m.shape == x2.shape for m in masks)
    reference = torch.cat(
        [(x2.double() * m) @ a.double().t() * SCALE for m, a in zip(masks, a_cat.split(list(ranks)))], dim=1
    )
    torch.testing.assert_close(xa.double(), reference, **_tolerances(dtype, reference))
    # every member draws its own mask (the member index is part of the Philox counter)
    assert all(not torch.equal(masks[0], m) for m in masks[1:])


def test_projection_masks_keep_one_minus_p_and_follow_the_generator(kernels):
    x2 = torch.randn(64, 1024, device=DEVICE)
    a_cat = torch.randn(16, 1024, device=DEVICE)
    for p in (0.05, 0.5):
        _, (mask,) = kernels.dropped_lora_projection(x2, a_cat, (16,), p)
        kept, n = mask.float().mean().item(), mask.numel()
        assert abs(kept - (1 - p)) < 6 * (p * (1 - p) / n) ** 0.5, (p, kept)
        quarters = mask.view(64, 4, 256).float()
        agree = (quarters[:, 0] == quarters[:, 1]).float().mean().item()  # independent: p^2 + (1-p)^2
        assert abs(agree - (p * p + (1 - p) ** 2)) < 0.02, (p, agree)
    torch.manual_seed(11)
    first = kernels.dropped_lora_projection(x2, a_cat, (8, 8), 0.25)
    torch.manual_seed(11)
    again = kernels.dropped_lora_projection(x2, a_cat, (8, 8), 0.25)  # the generator as before: the same masks
    later = kernels.dropped_lora_projection(x2, a_cat, (8, 8), 0.25)  # the generator moved on: other masks
    assert torch.equal(first[0], again[0]) and all(torch.equal(a, b) for a, b in zip(first[1], again[1]))
    assert not torch.equal(first[1][0], later[1][0])
    assert kernels.dropout_threshold(0.0) == 0 and kernels.dropout_threshold(0.5) == 2**30


def test_projection_refuses_what_it_cannot_take(kernels):
    x2 = torch.randn(8, 30, device=DEVICE)
    with pytest.raises(ValueError, match="divisible by 4"):
        kernels.dropped_lora_projection(x2, torch.randn(4, 30, device=DEVICE), (4,), P)
    with pytest.raises(ValueError, match="a_cat"):
        kernels.dropped_lora_projection(x2[:, :28], torch.randn(4, 28, device=DEVICE).double(), (4,), P)
    with pytest.raises(ValueError, match="dropout probability"):
        kernels.dropout_threshold(1.0)
