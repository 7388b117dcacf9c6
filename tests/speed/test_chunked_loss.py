"""The chunked causal-LM loss against transformers' own loss (values and gradients, fp32), and its per-chunk maths
against ``F.cross_entropy``. The Triton row kernel against the torch rows: tests/kernels/test_cross_entropy.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from modeling_helpers import logits_case, rel_diff, tiny_int4_lora_model

from int4lora_train.errors import UnsupportedFormatError
from int4lora_train.speed.chunked_loss import (
    chunked_causal_lm_loss,
    chunked_loss_enabled,
    cross_entropy_rows_torch,
    default_chunk_size,
    disable_chunked_loss,
    enable_chunked_loss,
    linear_cross_entropy,
)


def _reference_rows(logits: torch.Tensor, targets: torch.Tensor, scale: float, softcap: float | None):
    """Per-row losses and ``scale * d(sum of losses)/d(logits)`` by autograd through F.cross_entropy."""
    z = logits.detach().float().requires_grad_(True)
    capped = torch.tanh(z / softcap) * softcap if softcap else z
    rows = F.cross_entropy(capped, targets, ignore_index=-100, reduction="none")
    (rows.sum() * scale).backward()
    return rows.detach(), z.grad


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_torch_rows_equal_cross_entropy_and_its_gradient(softcap):
    logits, targets = logits_case()
    ref_loss, ref_grad = _reference_rows(logits, targets, 0.25, softcap)
    work = logits.clone()
    loss = cross_entropy_rows_torch(work, targets, torch.tensor(0.25), softcap)
    assert rel_diff(loss, ref_loss) <= 1e-6 and loss[1] == 0
    assert rel_diff(work, ref_grad) <= 1e-6
    assert torch.equal(work[1], torch.zeros_like(work[1]))  # the ignored row gets no gradient


def test_linear_cross_entropy_equals_cross_entropy_of_full_logits():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=gen).requires_grad_(True)
    weight = torch.randn(50, 16, generator=gen).requires_grad_(True)
    bias = torch.randn(50, generator=gen).requires_grad_(True)
    targets = torch.randint(0, 50, (37,), generator=gen)
    targets[::5] = -100
    for num_items in (None, 11):
        for p in (hidden, weight, bias):
            p.grad = None
        loss = linear_cross_entropy(hidden, weight, targets, bias, chunk_size=8, num_items_in_batch=num_items)
        loss.backward()
        got = [loss.detach(), hidden.grad, weight.grad, bias.grad]
        for p in (hidden, weight, bias):
            p.grad = None
        reduction = "mean" if num_items is None else "sum"
        ref = F.cross_entropy(F.linear(hidden, weight, bias), targets, ignore_index=-100, reduction=reduction)
        ref = ref if num_items is None else ref / num_items
        (2 * ref).backward()  # a non-unit incoming gradient
        assert rel_diff(got[0], ref.detach()) <= 1e-6
        assert rel_diff(2 * got[1], hidden.grad) <= 1e-5  # got[1] was for an incoming gradient of 1
        assert rel_diff(2 * got[2], weight.grad) <= 1e-5
        assert rel_diff(2 * got[3], bias.grad) <= 1e-5


def test_linear_cross_entropy_rejects_bad_shapes():
    with pytest.raises(UnsupportedFormatError, match="must agree on H"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 6), torch.zeros(4, dtype=torch.long))
    with pytest.raises(UnsupportedFormatError, match="targets must have shape"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(UnsupportedFormatError, match="backend"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), backend="cuda")


def test_default_chunk_size_is_whole_tiles():
    assert default_chunk_size(128256) == 512 and default_chunk_size(128256, "triton") == 2048
    assert default_chunk_size(320) % 64 == 0 and default_chunk_size(10**9) == 64


def _peft_model(arch: str):
    return tiny_int4_lora_model(arch)


def _batch():
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (2, 12), generator=gen)
    labels = tokens.clone()
    labels[0, :4] = -100  # a prompt without loss
    labels[1, -2:] = -100
    return tokens, labels


def _loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: final-logit softcapping
@pytest.mark.parametrize("num_items", [None, 13])
def test_chunked_causal_lm_loss_equals_transformers_loss(arch, num_items):
    model = _peft_model(arch)
    tokens, labels = _batch()
    extra = {} if num_items is None else {"num_items_in_batch": num_items}
    ref_loss, ref_grads = _loss_and_grads(model, lambda: model(input_ids=tokens, labels=labels, **extra).loss)
    loss, grads = _loss_and_grads(
        model, lambda: chunked_causal_lm_loss(model, tokens, labels, chunk_size=5, num_items_in_batch=num_items)
    )
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, abs(ref_loss.item()))
    assert set(grads) == set(ref_grads) and len(grads) > 0
    assert max(rel_diff(grads[n], ref_grads[n]) for n in grads) <= 1e-5


def test_enable_chunked_loss_patches_forward_through_peft_and_undoes():
    model = _peft_model("qwen3")
    tokens, labels = _batch()
    ref_out = model(input_ids=tokens, labels=labels)
    ref_loss, ref_grads = _loss_and_grads(model, lambda: model(input_ids=tokens, labels=labels).loss)
    enable_chunked_loss(model, chunk_size=7)
    assert chunked_loss_enabled(model)
    out = model(input_ids=tokens, labels=labels)
    assert out.logits is None
    loss, grads = _loss_and_grads(model, lambda: model(input_ids=tokens, labels=labels).loss)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, abs(ref_loss.item()))
    assert max(rel_diff(grads[n], ref_grads[n]) for n in grads) <= 1e-5
    assert torch.equal(model(input_ids=tokens).logits, ref_out.logits)  # without labels: the model's own forward
    assert disable_chunked_loss(model) and not chunked_loss_enabled(model)
    assert model(input_ids=tokens, labels=labels).logits is not None


def test_chunked_loss_under_bf16_autocast_is_close_to_transformers():
    model = _peft_model("llama")
    tokens, labels = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(input_ids=tokens, labels=labels).loss
        loss = chunked_causal_lm_loss(model, tokens, labels, chunk_size=5)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= 1e-2 * abs(ref.item())


def test_unsupported_models_are_refused_with_the_fix():
    model = _peft_model("llama")
    model.base_model.model.config.model_type = "cohere"
    with pytest.raises(UnsupportedFormatError, match="train.chunked_loss: false"):
        enable_chunked_loss(model)
    with pytest.raises(UnsupportedFormatError, match="chunk_size must be a positive integer"):
        enable_chunked_loss(_peft_model("llama"), chunk_size=0)
