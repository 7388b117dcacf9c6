"""Int4Experts' forward and backward: the logits of a tiny MoE model through the toolkit equal a dense transformers
model built from the dequantized weights; backward saves no dense weight; the grouped Triton dequantization is
bit-identical to the torch reference (Triton's CPU interpreter without CUDA)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from moe_helpers import GROUP_SIZE, MOE_ARCHS, tiny_moe

from int4lora_train.modeling import load_int4_model, quantize_model_rtn
from int4lora_train.modeling.int4_experts import Int4Experts
from int4lora_train.modeling.moe import dequantized_moe_copy, quantize_experts_rtn
from int4lora_train.quant.experts import Int4ExpertStack, dequantize_experts, dequantize_experts_torch
from int4lora_train.quant.packer import quantize_rtn

TOKENS = torch.tensor([[1, 5, 9, 200, 33, 7, 81, 12, 64, 3, 99, 150, 17, 2, 250, 40]])


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_logits_equal_dense_reference(moe_checkpoints, arch):
    _, path = moe_checkpoints(arch, "compressed-tensors", False)
    model = load_int4_model(path, dtype=torch.float32)
    reference = dequantized_moe_copy(model)
    assert not any(isinstance(m, Int4Experts) for m in reference.modules())
    with torch.no_grad():
        got = model(TOKENS).logits
        want = reference(TOKENS).logits
    assert (got - want).abs().max().item() <= 1e-5
    # the experts matter: zeroing one layer's experts moves the logits far more than the tolerance
    with torch.no_grad():
        reference.model.layers[0].mlp.experts.down_proj.zero_()
        moved = reference(TOKENS).logits
    assert (moved - want).abs().max().item() > 1e-2


def _routing(tokens=24, hidden=128, experts=4, top_k=2, seed=0, skip_expert=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    logits = torch.randn(tokens, experts, generator=gen)
    if skip_expert is not None:
        logits[:, skip_expert] = -1e9
    weights, index = torch.softmax(logits, -1).topk(top_k, -1)
    return x, index, weights


def _experts_pair(symmetric=True, seed=0):
    """A dense transformers experts module and its RTN INT4 twin (Int4Experts) + the dequantized dense twin."""
    model = tiny_moe("qwen3_moe", seed=seed)
    dense = model.model.layers[0].mlp.experts
    quantize_experts_rtn(model, GROUP_SIZE, symmetric=symmetric)
    int4 = model.model.layers[0].mlp.experts
    reference = dequantized_moe_copy(model).model.layers[0].mlp.experts
    return dense, int4, reference


@pytest.mark.parametrize("symmetric", [True, False])
def test_forward_backward_match_dense_and_save_no_dense_weight(symmetric):
    _, int4, reference = _experts_pair(symmetric)
    x, index, weights = _routing(skip_expert=2)  # an expert with no tokens is never dequantized
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y1 = int4(x1, index, weights)
    y2 = reference(x2, index, weights)
    assert (y1 - y2).abs().max().item() <= 1e-5
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    assert (x1.grad - x2.grad).abs().max().item() <= 1e-5
    dense_shapes = {(4, 128, 128), (4, 128, 64), (3, 128, 128), (3, 128, 64), (128, 128), (128, 64), (64, 128)}
    float_saved = [shape for shape, dtype in saved if dtype.is_floating_point and shape in dense_shapes]
    assert not float_saved, f"dense weights saved for backward: {float_saved}"
    assert any(dtype == torch.uint8 for _, dtype in saved), "the packed stacks are what backward keeps"


def test_chunked_dequantization_is_identical():
    _, int4, _ = _experts_pair(False)
    x, index, weights = _routing(tokens=40)
    full = int4(x, index, weights)
    int4.max_dense_experts = 1
    assert torch.equal(int4(x, index, weights), full)


def test_slot_routed_to_no_expert_is_skipped():
    """transformers' experts skip index num_experts (expert parallelism's "not local"): so does Int4Experts."""
    _, int4, _ = _experts_pair()
    x, index, weights = _routing(tokens=8)
    zero_weight = weights.clone()
    zero_weight[0, 1] = 0.0
    want = int4(x, index, zero_weight)
    index[0, 1] = 4
    assert (int4(x, index, weights) - want).abs().max().item() <= 1e-6


def test_rtn_surgery_keeps_linears_and_experts_int4():
    model = tiny_moe("qwen2_moe")
    quantize_model_rtn(model, GROUP_SIZE, symmetric=False)
    quantize_experts_rtn(model, GROUP_SIZE, symmetric=False)
    reference = dequantized_moe_copy(model)
    with torch.no_grad():
        assert (model(TOKENS).logits - reference(TOKENS).logits).abs().max().item() <= 1e-5


KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
"""Where the grouped Triton kernel runs in these tests: compiled on CUDA, else Triton's CPU interpreter."""


def _on_kernel_device(stack: Int4ExpertStack) -> Int4ExpertStack:
    moved = {f: getattr(stack, f) for f in ("packed", "scales", "zero_points")}
    return dataclasses.replace(stack, **{k: v.to(KERNEL_DEVICE) for k, v in moved.items() if v is not None})


def _stack(experts=5, out=96, in_features=128, group_size=32, symmetric=True, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weights = [
        quantize_rtn(
            torch.randn(out, in_features, generator=gen).to(dtype),
            group_size=group_size,
            symmetric=symmetric,
            strategy="group" if group_size else "channel",
        )
        for _ in range(experts)
    ]
    return Int4ExpertStack.from_weights(weights)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 128, None])
def test_grouped_triton_dequant_bit_exact(grouped_dequant, dtype, symmetric, group_size):
    stack = _stack(group_size=group_size, symmetric=symmetric, dtype=dtype)
    on_device = _on_kernel_device(stack)
    for ids in (torch.tensor([3, 0, 4]), torch.arange(5), torch.tensor([2])):
        want = dequantize_experts_torch(stack, ids)
        got = grouped_dequant.dequantize_experts_triton(on_device, ids.to(KERNEL_DEVICE)).cpu()
        assert got.shape == (ids.numel(), 96, 128)
        assert torch.equal(got, want)
        for i, e in enumerate(ids.tolist()):  # and each equals the expert dequantized alone
            from int4lora_train.quant.dequant import dequantize_torch

            assert torch.equal(got[i], dequantize_torch(stack.expert(e)))
    ids = torch.tensor([1, 2])
    out32 = grouped_dequant.dequantize_experts_triton(on_device, ids.to(KERNEL_DEVICE), torch.float32).cpu()
    assert torch.equal(out32, dequantize_experts_torch(stack, ids, torch.float32))


def test_grouped_triton_dequant_in_features_not_word_multiple(grouped_dequant):
    stack = _stack(experts=3, out=40, in_features=72, group_size=24, symmetric=False, dtype=torch.float16)
    ids = torch.tensor([2, 0])
    got = grouped_dequant.dequantize_experts_triton(_on_kernel_device(stack), ids.to(KERNEL_DEVICE)).cpu()
    assert torch.equal(got, dequantize_experts_torch(stack, ids))


def test_experts_module_on_the_triton_backend_matches_torch(grouped_dequant):
    _, int4, _ = _experts_pair(False)
    int4 = int4.to(KERNEL_DEVICE)  # both backends on the kernel's device: the same matmuls around the dequant
    x, index, weights = (t.to(KERNEL_DEVICE) for t in _routing())
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_torch = int4(x1, index, weights)
    int4.backend = "triton"
    one = torch.tensor([1], device=KERNEL_DEVICE)
    assert dequantize_experts(int4.stack("down"), one, backend="triton").shape == (1, 128, 64)
    y_triton = int4(x2, index, weights)
    assert torch.equal(y_torch, y_triton)
    grad = torch.randn_like(y_torch)
    y_torch.backward(grad)
    y_triton.backward(grad)
    assert torch.equal(x1.grad, x2.grad)


@pytest.mark.parametrize("gate_symmetric", [True, False])
def test_gate_and_up_of_different_symmetry_keep_both_zero_points(gate_symmetric):
    """A symmetric gate beside an asymmetric up (or the reverse) stacks into gate_up with the symmetric one's zero
    points as zeros: every expert's gate_up dequantizes to its gate then its up."""
    from int4lora_train.modeling.moe import experts_from_weights
    from int4lora_train.quant.dequant import dequantize_torch

    module = tiny_moe("qwen3_moe").model.layers[0].mlp.experts
    gate_up, down = module.gate_up_proj.detach(), module.down_proj.detach()
    inter = gate_up.shape[1] // 2
    gates = [quantize_rtn(w[:inter] + 0.05, GROUP_SIZE, symmetric=gate_symmetric) for w in gate_up]
    ups = [quantize_rtn(w[inter:] + 0.05, GROUP_SIZE, symmetric=not gate_symmetric) for w in gate_up]
    downs = [quantize_rtn(w, GROUP_SIZE) for w in down]
    int4 = experts_from_weights(module, gates, ups, downs, "experts")
    want = torch.stack([torch.cat([dequantize_torch(g), dequantize_torch(u)]) for g, u in zip(gates, ups)])
    assert torch.equal(int4.dequantize("gate_up"), want)
    stored = [w.zero_points is None for e, _, w in int4.expert_int4_weights() if e == 0]
    assert stored == [gate_symmetric, not gate_symmetric, True]  # each projection as given, without implied zeros


def test_experts_of_one_projection_with_different_symmetry_are_refused():
    """gate_up holds zero points per projection half for every expert or for none, so a gate symmetric in one
    expert and asymmetric in another is refused by name rather than fingerprinted with zeros it does not have."""
    from int4lora_train.errors import Int4FormatError
    from int4lora_train.modeling.moe import experts_from_weights

    module = tiny_moe("qwen3_moe").model.layers[0].mlp.experts
    gate_up, down = module.gate_up_proj.detach(), module.down_proj.detach()
    inter = gate_up.shape[1] // 2
    gates = [quantize_rtn(w[:inter], GROUP_SIZE, symmetric=e != 2) for e, w in enumerate(gate_up)]
    ups = [quantize_rtn(w[inter:], GROUP_SIZE) for w in gate_up]
    downs = [quantize_rtn(w, GROUP_SIZE) for w in down]
    with pytest.raises(Int4FormatError, match=r"experts\.gate_proj: expert 0 is symmetric but expert 2 is asymm"):
        experts_from_weights(module, gates, ups, downs, "experts")
