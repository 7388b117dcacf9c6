"""The Triton RoPE kernels (CPU interpreter without CUDA, compiled with it) and their torch references, bit for bit
against transformers' ``apply_rotary_pos_emb`` and autograd's gradient of it."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from int4lora_train.kernels.rope import rope_bwd_torch, rope_fwd_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [  # batch, seq, q heads, k heads, head dim, cos batch
    pytest.param(2, 5, 4, 2, 64, 2, id="gqa-odd-seq-d64"),
    pytest.param(1, 7, 3, 1, 128, 1, id="odd-heads-d128"),
    pytest.param(3, 4, 4, 4, 80, 1, id="mha-d80-cos-broadcast"),  # half 40: masked columns; cos [1, T, D]
]


@pytest.fixture(scope="module")
def rope(triton_kernels):
    return triton_kernels.rope


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit patterns (so that -0 and +0, equal as values, differ)."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _case(dtype, batch, seq, q_heads, k_heads, dim, cos_batch, grouped: bool = False):
    """q and k as the attention hands them over: ``[B, H, T, D]`` views of the projections' ``[B, T, H, D]``
    output (``grouped``: column slices of one q/k/v output, as a projection group makes them); cos / sin
    ``[cos_batch, T, D]``; gradients for the outputs. Some zeros of either sign, to pin the sign of zero results."""
    gen = torch.Generator().manual_seed(dim * 31 + seq)
    width = (q_heads + 2 * k_heads) * dim if grouped else (q_heads + k_heads) * dim
    # on the device before slicing: copying a slice to another device would make it contiguous
    projections = (torch.randn(batch, seq, width, generator=gen) * 3).to(dtype).to(DEVICE)
    q = projections[..., : q_heads * dim].view(batch, seq, q_heads, dim).transpose(1, 2)
    k = projections[..., q_heads * dim : (q_heads + k_heads) * dim].view(batch, seq, k_heads, dim).transpose(1, 2)
    cos = torch.randn(cos_batch, seq, dim, generator=gen).to(dtype)
    sin = torch.randn(cos_batch, seq, dim, generator=gen).to(dtype)
    cos[0, 0], sin[0, 0, : dim // 2] = 0.0, -0.0
    grad_q = torch.randn(q.shape, generator=gen).to(dtype)
    grad_k = torch.randn(k.shape, generator=gen).to(dtype)
    grad_q[0, 0, 1], grad_k[0, 0, 2] = 0.0, -0.0
    return [t.to(DEVICE) for t in (q, k, cos, sin, grad_q, grad_k)]


def _transformers(q, k, cos, sin, grad_q, grad_k):
    """transformers' outputs and autograd's gradients for q and k."""
    q, k = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
    q_out, k_out = apply_rotary_pos_emb(q, k, cos, sin)
    torch.autograd.backward((q_out, k_out), (grad_q, grad_k))
    return q_out.detach(), k_out.detach(), q.grad, k.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,seq,q_heads,k_heads,dim,cos_batch", SHAPES)
def test_kernels_and_references_equal_transformers_bit_for_bit(
    rope, dtype, batch, seq, q_heads, k_heads, dim, cos_batch
):
    q, k, cos, sin, grad_q, grad_k = _case(dtype, batch, seq, q_heads, k_heads, dim, cos_batch)
    want = _transformers(q, k, cos, sin, grad_q, grad_k)
    refs = (
        rope_fwd_torch(q, cos, sin),
        rope_fwd_torch(k, cos, sin),
        rope_bwd_torch(grad_q, cos, sin),
        rope_bwd_torch(grad_k, cos, sin),
    )
    got = (*rope.rope_fwd(q, k, cos, sin), *rope.rope_bwd(grad_q, grad_k, cos, sin))
    for name, w, r, g in zip(("q", "k", "grad q", "grad k"), want, refs, got):
        assert _same_bits(r, w), f"torch reference, {name}"
        assert _same_bits(g, w), f"Triton kernel, {name}"
    for out in got:  # new tensors laid out as [B, T, H, D]: a view for flash / varlen attention and the projection
        assert out.transpose(1, 2).is_contiguous()


def test_gradient_zeros_are_positive_as_autograd_makes_them(rope):
    """A zero gradient (g = 0 where cos and sin are 0) is +0 from autograd, even from -0 products; so from the
    kernel (without its + 0.0 the sum of two -0 would stay -0)."""
    dim = 64
    cos = torch.zeros(1, 1, dim).to(DEVICE)
    sin = torch.zeros(1, 1, dim).to(DEVICE)
    grad = torch.full((1, 1, 1, dim), -1.0).to(DEVICE)  # -1 * +0 = -0 in every product
    q = torch.zeros(1, 1, 1, dim).to(DEVICE)
    want = _transformers(q, q, cos, sin, grad, grad)[2]
    assert not torch.signbit(want).any()
    got = rope.rope_bwd(grad, None, cos, sin)[0]
    assert _same_bits(got, want) and _same_bits(rope_bwd_torch(grad, cos, sin), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_strided_inputs_and_gradients(rope, dtype):
    """q / k as column slices of a grouped q/k/v output; gradients as non-contiguous views; a head dim whose elements
    are not adjacent (copied first)."""
    q, k, cos, sin, grad_q, grad_k = _case(dtype, 2, 3, 4, 2, 64, 2, grouped=True)
    assert not q.is_contiguous() and q.stride(0) == 3 * (4 + 2 * 2) * 64
    grad_q = grad_q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, T, H, D] storage
    grad_k = torch.cat((grad_k, grad_k), dim=-1)[..., ::2]  # head-dim stride 2
    assert grad_k.stride(-1) == 2
    want = _transformers(q, k, cos, sin, grad_q, grad_k)
    got = (*rope.rope_fwd(q, k, cos, sin), *rope.rope_bwd(grad_q, grad_k, cos, sin))
    assert all(_same_bits(g, w) for g, w in zip(got, want))


def test_backward_for_one_of_q_and_k(rope):
    q, k, cos, sin, grad_q, grad_k = _case(torch.bfloat16, 1, 3, 2, 1, 64, 1)
    _, _, want_q, want_k = _transformers(q, k, cos, sin, grad_q, grad_k)
    only_q, none = rope.rope_bwd(grad_q, None, cos, sin)
    assert _same_bits(only_q, want_q) and none is None
    none, only_k = rope.rope_bwd(None, grad_k, cos, sin)
    assert none is None and _same_bits(only_k, want_k)
    assert rope.rope_bwd(None, None, cos, sin) == (None, None)
