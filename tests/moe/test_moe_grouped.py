"""The grouped-GEMM path of Int4Experts (``experts_impl="grouped"``: one ``torch._grouped_mm`` per dequantization
chunk, grouped per-expert LoRA) equals the per-expert loop (``"loop"``): forward output, input gradients and LoRA
gradients, with experts that receive no tokens, a single used expert and chunks smaller than the used experts.

Each comparison runs twice: on torch's own grouped GEMM where this build has one for the dtype on the CPU (torch >=
2.9; skipped otherwise), and on a pure-torch emulation of ``grouped_mm`` patched in, which checks the offsets and
operand layouts that the module passes on any build. Tolerances, relative to the largest reference value: float32
1e-6 (torch 2.13's CPU kernel is per-group GEMMs and came out bit-identical to the loop, in bf16 too; the margin
is for other builds); bfloat16 2e-2, for CUDA, where CUTLASS's grouped GEMM and cuBLAS round bf16 products
accumulated in a different order (the CUDA test, on the GPU image only).
"""

from __future__ import annotations

import pytest
import torch
from moe_helpers import GROUP_SIZE, tiny_moe
from peft import LoraConfig, get_peft_model

from int4lora_train.errors import UnsupportedFormatError
from int4lora_train.modeling import int4_experts, load_int4_model, prepare_for_training
from int4lora_train.modeling.int4_experts import (
    ExpertLora,
    Int4Experts,
    grouped_mm_aligned,
    grouped_mm_supported,
)
from int4lora_train.modeling.moe import quantize_experts_rtn

NATIVE_FP32 = grouped_mm_supported(torch.device("cpu"), torch.float32)
NATIVE_BF16 = grouped_mm_supported(torch.device("cpu"), torch.bfloat16)


def _emulated_grouped_mm(x, weight, offs=None):
    """``grouped_mm``'s contract in plain torch: rows ``[offs[g-1], offs[g])`` of ``x`` times ``weight[g]``; rows past
    ``offs[-1]`` are left unset (zeros here). Asserts what the kernels require of the operands."""
    assert offs is not None and offs.dtype == torch.int32 and offs.dim() == 1
    assert x.dim() == 2 and weight.dim() == 3 and offs.numel() == weight.shape[0]
    assert x.shape[1] == weight.shape[1], (x.shape, weight.shape)
    assert x.stride(1) == 1, "mat_a must be row-major"
    assert weight.stride(-1) == 1 or weight.stride(-2) == 1, "mat_b must be row- or column-major per group"
    ends = offs.tolist()
    assert ends == sorted(ends) and ends[-1] <= x.shape[0]
    parts, start = [], 0
    for g, end in enumerate(ends):
        parts.append(x[start:end] @ weight[g])
        start = end
    parts.append(x.new_zeros(x.shape[0] - start, weight.shape[-1]))
    return torch.cat(parts)


class GroupedOp(list):
    """The calls (``mat_a`` shapes) of the grouped GEMM that the grouped path used; ``kind``: native or emulated."""

    kind = "native"


@pytest.fixture(params=["native", "emulated"])
def grouped_op(request, monkeypatch):
    """Which grouped GEMM the grouped path calls; counts the calls."""
    calls = GroupedOp()
    calls.kind = request.param
    if request.param == "native":
        if not NATIVE_FP32:
            pytest.skip(f"torch {torch.__version__} has no CPU grouped_mm")
        native = int4_experts._grouped_mm_op()

        def op(*args, **kwargs):
            calls.append(args[0].shape)
            return native(*args, **kwargs)

    else:

        def op(*args, **kwargs):
            calls.append(args[0].shape)
            return _emulated_grouped_mm(*args, **kwargs)

        monkeypatch.setattr(int4_experts, "grouped_mm_supported", lambda device, dtype: True)
    monkeypatch.setattr(int4_experts, "_grouped_mm_op", lambda: op)
    return calls


def _experts(symmetric=False, seed=0) -> Int4Experts:
    """Layer 0's experts of the tiny Qwen3-MoE (hidden 128, 4 experts of width 64), RTN INT4."""
    model = tiny_moe("qwen3_moe", seed=seed)
    quantize_experts_rtn(model, GROUP_SIZE, symmetric=symmetric)
    return model.model.layers[0].mlp.experts


def _routing(tokens=24, experts=4, top_k=2, seed=0, only=None, skip=()):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 128, generator=gen)
    logits = torch.randn(tokens, experts, generator=gen)
    for e in skip:
        logits[:, e] = -1e9
    if only is not None:
        logits[:, only] = 1e9
    weights, index = torch.softmax(logits, -1).topk(top_k, -1)
    return x, index, weights


def _lora(experts: Int4Experts, rank=8, seed=1, dtype=torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    e, h, i = experts.num_experts, experts.hidden_dim, experts.intermediate_dim
    shapes = {"gate_A": (e, rank, h), "gate_B": (e, i, rank), "up_A": (e, rank, h), "up_B": (e, i, rank),
              "down_A": (e, rank, i), "down_B": (e, h, rank)}  # fmt: skip
    return {k: (torch.randn(s, generator=gen) * 0.1).to(dtype) for k, s in shapes.items()}


def _run(experts, impl, x, index, weights, lora=None, dtype=None, seed=2):
    """Output, input gradient and LoRA gradients of one forward/backward with ``experts_impl=impl``."""
    experts.experts_impl = impl
    x = x.clone().to(dtype or x.dtype).requires_grad_()
    params = {k: v.clone().requires_grad_() for k, v in (lora or {}).items()}
    adapter = ExpertLora(**params, scaling=2.0) if lora else None
    y = experts.forward_with_lora(x, index, weights.to(x.dtype), adapter)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device, y.dtype)
    y.backward(grad)
    return y.detach(), x.grad, {k: p.grad for k, p in params.items()}


def _assert_close(got, want, tol, what):
    scale = max(want.abs().max().item(), 1e-6)
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} over scale {scale:.3g}"


CASES = {
    "all experts": dict(),
    "expert without tokens": dict(skip=(2,)),
    "two experts without tokens": dict(skip=(0, 3)),
    "single expert": dict(top_k=1, only=1),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("max_dense_experts", [None, 1, 3])
@pytest.mark.parametrize("with_lora", [False, True])
def test_grouped_equals_loop_fp32(grouped_op, case, max_dense_experts, with_lora):
    experts = _experts()
    experts.max_dense_experts = max_dense_experts
    x, index, weights = _routing(**CASES[case])
    lora = _lora(experts) if with_lora else None
    y_loop, gx_loop, glora_loop = _run(experts, "loop", x, index, weights, lora)
    assert not grouped_op
    y_grp, gx_grp, glora_grp = _run(experts, "grouped", x, index, weights, lora)
    used = index.unique().numel()
    chunks = -(-used // (max_dense_experts or used))
    # forward: gate_up + down per chunk; backward: the same again; LoRA: 2 per projection forward.
    assert len(grouped_op) == 4 * chunks + (6 if with_lora else 0)
    _assert_close(y_grp, y_loop, 1e-6, "output")
    _assert_close(gx_grp, gx_loop, 1e-6, "input gradient")
    assert y_loop.abs().max() > 0.1 and gx_loop.abs().max() > 0.1
    unused = sorted(set(range(experts.num_experts)) - set(index.unique().tolist()))
    for name in glora_loop:
        _assert_close(glora_grp[name], glora_loop[name], 1e-6, f"{name} gradient")
        assert glora_loop[name].abs().max().item() > 0
        # an expert without tokens gets an exact zero gradient (the gather's backward scatters nothing there)
        assert torch.count_nonzero(glora_grp[name][unused]).item() == 0


def test_grouped_equals_loop_bf16(grouped_op):
    """bfloat16 (the GPU dtype), chunked, with LoRA: grouped vs loop within bf16 rounding (2e-2 of the scale)."""
    if grouped_op.kind == "native" and not NATIVE_BF16:
        pytest.skip(f"torch {torch.__version__} has no CPU bf16 grouped_mm")
    experts = _experts(symmetric=True)
    experts.max_dense_experts = 2
    x, index, weights = _routing(tokens=32, skip=(1,))
    lora = _lora(experts, rank=8, dtype=torch.bfloat16)
    loop = _run(experts, "loop", x, index, weights, lora, dtype=torch.bfloat16)
    grouped = _run(experts, "grouped", x, index, weights, lora, dtype=torch.bfloat16)
    assert grouped[0].dtype == torch.bfloat16
    _assert_close(grouped[0], loop[0], 2e-2, "output")
    _assert_close(grouped[1], loop[1], 2e-2, "input gradient")
    for name in loop[2]:
        _assert_close(grouped[2][name], loop[2][name], 2e-2, f"{name} gradient")


def test_auto_takes_grouped_where_it_runs_and_loop_where_rows_are_misaligned(grouped_op):
    experts = _experts()
    x, index, weights = _routing()
    experts.experts_impl = "auto"
    assert experts.use_grouped_mm(x.device, torch.float32, 128, 64, 8)
    # rank 3 in float32: 12-byte rows of x @ A.T; the base stays grouped, the LoRA loops
    lora = _lora(experts, rank=3)
    y_auto = _run(experts, "auto", x, index, weights, lora)
    assert len(grouped_op) == 4  # base only: 2 forward + 2 backward, no LoRA grouped call
    y_loop = _run(experts, "loop", x, index, weights, lora)
    assert torch.allclose(y_auto[0], y_loop[0], rtol=0, atol=1e-6)
    with pytest.raises(UnsupportedFormatError, match="multiples of 16 bytes"):
        _run(experts, "grouped", x, index, weights, lora)
    experts.experts_impl = "fast"
    with pytest.raises(UnsupportedFormatError, match="experts_impl must be one of"):
        experts(x, index, weights)


def test_grouped_refused_where_unsupported_and_auto_loops(monkeypatch):
    monkeypatch.setattr(int4_experts, "grouped_mm_supported", lambda device, dtype: False)
    called = []
    monkeypatch.setattr(int4_experts, "_grouped_mm_op", lambda: called.append(1))
    experts = _experts()
    x, index, weights = _routing()
    experts.experts_impl = "auto"
    experts(x, index, weights)
    assert not called
    experts.experts_impl = "grouped"
    with pytest.raises(UnsupportedFormatError, match="has no grouped GEMM"):
        experts(x, index, weights)


@pytest.mark.parametrize("max_dense_experts", [None, 2])
def test_peft_training_step_grouped_equals_loop(moe_checkpoints, grouped_op, max_dense_experts):
    """A whole PEFT model (attention + per-expert LoRA, gradient checkpointing, 2 MoE layers): loss and every
    adapter gradient of one step agree between the two implementations."""
    _, path = moe_checkpoints("qwen3_moe")
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "experts"])
    model = get_peft_model(load_int4_model(path, dtype=torch.float32), config)
    prepare_for_training(model, gradient_checkpointing=True)
    model.train()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    modules = [m for m in model.modules() if isinstance(m, Int4Experts)]
    assert len(modules) == 2
    tokens = torch.tensor([[1, 5, 9, 200, 33, 7, 81, 12, 64, 3, 99, 150, 17, 2]])
    results = {}
    for impl in ("loop", "grouped"):
        for m in modules:
            m.experts_impl, m.max_dense_experts = impl, max_dense_experts
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[impl] = (loss.detach(), grads)
    assert grouped_op, "the grouped step never called the grouped GEMM"
    assert torch.allclose(results["grouped"][0], results["loop"][0], rtol=0, atol=1e-6)
    expert_grads = [n for n in results["loop"][1] if "lora_experts" in n]
    assert len(expert_grads) == 12
    for name, want in results["loop"][1].items():
        _assert_close(results["grouped"][1][name], want, 1e-5, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("max_dense_experts", [None, 3])
def test_grouped_equals_loop_cuda_bf16(max_dense_experts):
    """On the GPU image (torch 2.11, sm90): the CUTLASS grouped GEMM in bf16 against the cuBLAS loop, with LoRA."""
    experts = _experts(symmetric=True).to("cuda")
    assert grouped_mm_supported(torch.device("cuda"), torch.bfloat16)
    experts.max_dense_experts = max_dense_experts
    x, index, weights = (t.to("cuda") for t in _routing(tokens=64, skip=(1,)))
    lora = {k: v.to("cuda") for k, v in _lora(experts, rank=8, dtype=torch.bfloat16).items()}
    loop = _run(experts, "loop", x, index, weights, lora, dtype=torch.bfloat16)
    grouped = _run(experts, "grouped", x, index, weights, lora, dtype=torch.bfloat16)
    _assert_close(grouped[0], loop[0], 2e-2, "output")
    _assert_close(grouped[1], loop[1], 2e-2, "input gradient")
    for name in loop[2]:
        _assert_close(grouped[2][name], loop[2][name], 2e-2, f"{name} gradient")
        assert torch.count_nonzero(grouped[2][name][1]).item() == 0


def test_feature_detection():
    assert not grouped_mm_supported(torch.device("cpu"), torch.int32)
    assert not grouped_mm_supported(torch.device("meta"), torch.float32)
    assert grouped_mm_aligned(torch.bfloat16, 2048, 768, 16)
    assert not grouped_mm_aligned(torch.bfloat16, 2048, 4)
    assert grouped_mm_aligned(torch.float32, 4) and not grouped_mm_aligned(torch.float32, 6)
    if torch.cuda.is_available():  # the GPU image (torch 2.11, sm90): grouped in bf16
        assert grouped_mm_supported(torch.device("cuda"), torch.bfloat16) == (
            torch.cuda.get_device_capability() >= (8, 0)
        )


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_one_host_sync_per_forward_and_none_in_backward(impl, monkeypatch):
    """The per-expert counts are read to the host once per forward (``.tolist()``); nothing else is read back (no
    ``.item()``, ``.nonzero()``), and backward reads nothing (CPU stand-in for CUDA's sync debug mode)."""
    if impl == "grouped" and not NATIVE_FP32:
        pytest.skip(f"torch {torch.__version__} has no CPU grouped_mm")
    experts = _experts()
    experts.max_dense_experts = 2
    experts.experts_impl = impl
    x, index, weights = _routing(skip=(2,))
    lora = ExpertLora(**{k: v.requires_grad_() for k, v in _lora(experts).items()}, scaling=2.0)
    reads = []
    for name in ("tolist", "item", "nonzero", "__bool__", "__int__"):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    y = experts.forward_with_lora(x.requires_grad_(), index, weights, lora)
    assert reads == ["tolist"]
    reads.clear()
    y.backward(torch.ones_like(y))
    assert reads == []
