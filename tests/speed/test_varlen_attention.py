"""Varlen attention over packed rows (``speed.varlen_attention``): the same logits and LoRA gradients as transformers'
``sdpa`` path with its block-causal mask, the segments read from ``position_ids``, the switch, generation.

The CPU runs the fallback (SDPA with the block-causal mask built from the segments) and, with the flash kernels
replaced by a per-segment reference, the plumbing of the CUDA path (layouts, ``cu_seqlens``, the autograd node's
arguments and gradients). Only a GPU runs the flash kernels themselves: ``test_cuda_*`` here (skipped without CUDA)
and ``benchmarks/varlen_check.py`` (agreement and timing at the Llama-8B shape).
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from modeling_helpers import max_diff, rel_diff, tiny_int4_lora_model

from int4lora_train import speed
from int4lora_train.errors import ConfigError, UnsupportedFormatError
from int4lora_train.modeling import prepare_for_training
from int4lora_train.speed import varlen_attention as va
from int4lora_train.train.data import IGNORE_INDEX, Sample, collate

ARCHS = ("llama", "qwen3")

# Row 0: segments of 4, 1, 3 and 4 tokens. Row 1: 6 tokens, then 2 of padding (positions restart at 0).
POSITIONS = torch.tensor([[0, 1, 2, 3, 0, 0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1]])


@pytest.fixture(autouse=True)
def _fresh_cache():
    va.clear_cache()
    yield
    va.clear_cache()


def _packed_batch():
    """A collated batch of 2 packed rows (several samples each; padding in the shorter one), as the trainer builds."""
    gen = torch.Generator().manual_seed(3)

    def sample(n: int) -> Sample:
        ids = torch.randint(3, 256, (n,), generator=gen, dtype=torch.int32)
        labels = ids.clone()
        labels[0] = IGNORE_INDEX
        return Sample(ids, labels, torch.arange(n, dtype=torch.int32))

    def row(*lengths: int) -> Sample:
        parts = [sample(n) for n in lengths]
        return Sample(*(torch.cat([getattr(p, f) for p in parts]) for f in ("input_ids", "labels", "position_ids")))

    return collate([row(5, 1, 7, 3), row(9, 4)], pad_token_id=0)  # 16 and 13 tokens: 3 of padding


def _run(arch: str, packed_attention: str, batch: dict, **extra) -> tuple[torch.Tensor, torch.Tensor, dict]:
    model = tiny_int4_lora_model(arch)
    prepare_for_training(model, gradient_checkpointing=True, use_reentrant=False)
    assert va.set_packed_attention(model, packed_attention) == packed_attention
    model.train()
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **extra)
    loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), loss.detach(), grads


# ---------------------------------------------------------------------------------------------------------------
# Segments


@pytest.mark.parametrize(
    ("positions", "lengths"),
    [
        ([[0, 1, 2, 3]], [4]),  # one segment
        ([[0, 1, 2, 3], [0, 1, 2, 3]], [4, 4]),  # whole rows: one segment per row
        ([[0, 0, 1, 0]], [1, 2, 1]),  # segments of length 1, first and last
        ([[0, 1, 2, 0, 1]], [3, 2]),  # the collator's padding: positions restart at 0
        ([[0, 1, 5, 6, 0]], [2, 2, 1]),  # a jump that is not a restart still starts a segment (transformers' rule)
        ([[3, 4, 5]], [3]),  # a row need not start at 0
        ([0, 1, 0, 1, 2], [2, 3]),  # 1-D
    ],
)
def test_segment_lengths(positions, lengths):
    assert va.segment_lengths(torch.tensor(positions)) == lengths


def test_compute_segments_gives_flash_cu_seqlens():
    segments = va.compute_segments(POSITIONS)
    assert segments.cu_seqlens.dtype == torch.int32
    assert segments.cu_seqlens.tolist() == [0, 4, 5, 8, 12, 18, 22, 24]
    assert segments.lengths == (4, 1, 3, 4, 6, 4, 2) and segments.max_seqlen == 6
    assert (segments.batch, segments.length) == (2, 12)
    broadcast = va.compute_segments(torch.arange(5)[None], batch=3)  # position_ids [1, T] for a batch of 3
    assert broadcast.cu_seqlens.tolist() == [0, 5, 10, 15] and broadcast.max_seqlen == 5
    with pytest.raises(UnsupportedFormatError, match="2-D position_ids"):
        va.compute_segments(torch.zeros(3, 2, 4, dtype=torch.long))


def test_block_causal_mask_is_transformers_packed_mask():
    from transformers import LlamaConfig
    from transformers.masking_utils import create_causal_mask, sdpa_mask, sliding_window_causal_mask_function

    config = LlamaConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1)
    config._attn_implementation = "sdpa"
    embeds = torch.zeros(2, 12, 8)
    kwargs = {"attention_mask": None, "position_ids": POSITIONS}
    parameters = inspect.signature(create_causal_mask).parameters  # the cache's name differs between versions
    kwargs.update({name: None for name in ("cache", "past_key_values") if name in parameters})
    if "cache_position" in parameters:
        kwargs["cache_position"] = torch.arange(12)
    expected = create_causal_mask(config, embeds, **kwargs)
    assert expected.shape == (2, 1, 12, 12) and expected.dtype == torch.bool
    segments = va.compute_segments(POSITIONS)
    assert torch.equal(segments.block_causal_mask(), expected)
    windowed = segments.block_causal_mask(window=2)
    assert windowed.sum() < expected.sum() and not (windowed & ~expected).any()
    plain_window = sdpa_mask(1, 6, 6, mask_function=sliding_window_causal_mask_function(2), allow_is_causal_skip=False)
    assert torch.equal(windowed[1, :, :6, :6], plain_window[0])  # the 6-token segment of row 1 starts the row


def test_segments_are_computed_once_per_forward(monkeypatch):
    calls = []
    compute = va.compute_segments
    monkeypatch.setattr(va, "compute_segments", lambda *a, **k: calls.append(1) or compute(*a, **k))
    batch = _packed_batch()
    _run("llama", "varlen", batch)  # 2 layers, gradient checkpointing: 4 attention calls
    assert len(calls) == 1
    positions = batch["position_ids"]
    va.segments_for(positions, 2)
    positions.add_(0)  # an in-place change (the version moves): computed again
    va.segments_for(positions, 2)
    assert len(calls) == 2


def test_inference_mode_forward():
    """Under ``torch.inference_mode`` position_ids are inference tensors (the model's own, or the caller's made there),
    which have no version counter: the segments are computed without the cache, as on the mask path."""
    batch = _packed_batch()
    model = tiny_int4_lora_model("llama").eval()

    def logits():
        with torch.inference_mode():
            positions = batch["position_ids"].clone()  # an inference tensor
            return [
                model(input_ids=batch["input_ids"], position_ids=p, use_cache=False).logits for p in (positions, None)
            ]

    expected = logits()
    va.set_packed_attention(model, "varlen")
    for got, want in zip(logits(), expected):
        assert max_diff(got, want) <= 1e-5
    with torch.inference_mode():
        positions = batch["position_ids"].clone()
        first = va.segments_for(positions, 2)
        positions[:, 1:] = torch.arange(1, positions.shape[1])  # in place, no version counter to move: not cached
        assert va.segments_for(positions, 2).lengths == (16, 16) != first.lengths


# ---------------------------------------------------------------------------------------------------------------
# The model: logits and LoRA gradients as on transformers' mask path


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_rows_match_the_mask_path(arch, monkeypatch):
    batch = _packed_batch()
    ref_logits, ref_loss, ref_grads = _run(arch, "mask", batch)
    calls = []
    segments = va._segments
    monkeypatch.setattr(va, "_segments", lambda *a: calls.append(1) or segments(*a))
    logits, loss, grads = _run(arch, "varlen", batch)
    assert calls  # the registered function ran, and read the segments
    assert max_diff(logits, ref_logits) <= 1e-5
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item())
    assert grads.keys() == ref_grads.keys() and any("lora_A" in n for n in grads)
    assert max(max_diff(grads[n], ref_grads[n]) for n in grads) <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_whole_rows_match_the_mask_path(arch):
    batch = _packed_batch()
    batch["position_ids"] = torch.arange(16).repeat(2, 1)  # one segment per row (plain causal attention)
    ref_logits, _, ref_grads = _run(arch, "mask", batch)
    logits, _, grads = _run(arch, "varlen", batch)
    assert max_diff(logits, ref_logits) <= 1e-5
    assert max(max_diff(grads[n], ref_grads[n]) for n in grads) <= 1e-5


def test_precomputed_cu_seq_lens_are_used():
    """transformers' flash keywords reach the attention function: used as given (a wrong one changes the result)."""
    batch = _packed_batch()
    ref_logits, _, _ = _run("llama", "mask", batch)
    segments = va.compute_segments(batch["position_ids"])
    right = {"cu_seq_lens_q": segments.cu_seqlens, "cu_seq_lens_k": segments.cu_seqlens,
             "max_length_q": segments.max_seqlen, "max_length_k": segments.max_seqlen}  # fmt: skip
    logits, _, _ = _run("llama", "varlen", batch, **right)
    assert max_diff(logits, ref_logits) <= 1e-5
    rows = torch.tensor([0, 16, 32], dtype=torch.int32)  # one segment per row: attends across the samples
    wrong = {**right, "cu_seq_lens_q": rows, "cu_seq_lens_k": rows, "max_length_q": 16, "max_length_k": 16}
    va.clear_cache()
    logits, _, _ = _run("llama", "varlen", batch, **wrong)
    assert max_diff(logits, ref_logits) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# The CUDA path's plumbing, with the flash kernels replaced by a per-segment reference


def reference_varlen(q, k, v, cu_seqlens, scale=None, window=None):
    """Causal attention per segment with SDPA: ``[N, Hq, D]``, ``[N, Hkv, D]`` x2 -> ``[N, Hq, D]``."""
    outs = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds, bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        n = end - start
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        if window is not None:
            mask &= ~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-window)
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


def _qkv(batch=2, heads=4, kv_heads=2, length=12, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((batch, heads, length, dim), (batch, kv_heads, length, dim), (batch, kv_heads, length, dim))
    return [torch.randn(s, generator=gen, requires_grad=True) for s in shapes]


def test_layout_helpers_round_trip():
    q, _, _ = _qkv()
    flat = va.to_varlen(q)
    assert flat.shape == (24, 4, 8) and flat.stride(-1) == 1
    assert torch.equal(flat[12 + 5], q[1, :, 5])  # token 5 of row 1
    assert torch.equal(va.from_varlen(flat, 2), q.transpose(1, 2))


@pytest.fixture
def fake_flash_ops(monkeypatch):
    """The aten flash ops replaced by the per-segment reference (forward) and its autograd (backward); records the
    calls' arguments."""
    calls = []

    def forward(q, k, v, cu_seqlens, max_seqlen, scale, window):
        calls.append(("forward", max_seqlen, scale, window))
        out = reference_varlen(q, k, v, cu_seqlens, scale, window)
        return out, torch.zeros(q.shape[1], q.shape[0]), torch.zeros(2), torch.empty(0)

    def backward(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, rng_state, unused, scale, window):
        calls.append(("backward", max_seqlen, scale, window))
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            reference_varlen(*leaves, cu_seqlens, scale, window).backward(grad_out)
        return tuple(t.grad for t in leaves)

    monkeypatch.setattr(va, "_flash_forward", forward)
    monkeypatch.setattr(va, "_flash_backward", backward)
    return calls


@pytest.mark.parametrize("window", [None, 3])
def test_flash_varlen_function_wiring(fake_flash_ops, window):
    q, k, v = _qkv()
    segments = va.compute_segments(POSITIONS)
    flat = [va.to_varlen(t) for t in (q, k, v)]
    out = va.flash_varlen(*flat, segments.cu_seqlens, segments.max_seqlen, scale=0.3, window=window, kernel="aten")
    expected = reference_varlen(*flat, segments.cu_seqlens, 0.3, window)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    eq, ek, ev = torch.autograd.grad(expected, (q, k, v), grad)
    assert torch.equal(dq, eq) and torch.equal(dk, ek) and torch.equal(dv, ev)
    assert fake_flash_ops == [("forward", 6, 0.3, window), ("backward", 6, 0.3, window)]


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_function_cuda_branch_matches_the_mask_path(arch, fake_flash_ops, monkeypatch):
    """The model through the flash branch of ``varlen_attention_forward`` (eligibility forced, kernels faked):
    layouts, segments and the output layout as transformers expects them."""
    batch = _packed_batch()
    ref_logits, _, ref_grads = _run(arch, "mask", batch)
    monkeypatch.setattr(va, "_flash_eligible", lambda *a: True)
    monkeypatch.setattr(va, "flash_kernel", lambda *a, **k: "aten")
    logits, _, grads = _run(arch, "varlen", batch)
    assert {c[0] for c in fake_flash_ops} == {"forward", "backward"}
    assert max_diff(logits, ref_logits) <= 1e-5
    assert max(max_diff(grads[n], ref_grads[n]) for n in grads) <= 1e-5


def test_flash_kernel_choice(monkeypatch):
    monkeypatch.setattr(va, "_varlen_attn", lambda: (None, False))  # a torch without varlen_attn
    assert va.flash_kernel(32, 8) == "aten" and va.flash_kernel(32, 32) == "aten"
    with pytest.raises(UnsupportedFormatError, match="no varlen_attn"):
        va.flash_kernel(32, 32, "varlen_attn")
    monkeypatch.setattr(va, "_varlen_attn", lambda: (object(), False))  # torch 2.11: no enable_gqa
    assert va.flash_kernel(32, 32) == "varlen_attn" and va.flash_kernel(32, 8) == "aten"
    monkeypatch.setattr(va, "_varlen_attn", lambda: (object(), True))  # torch 2.13: enable_gqa
    assert va.flash_kernel(32, 8) == "varlen_attn"
    with pytest.raises(ConfigError):
        va.flash_kernel(32, 8, "triton")


def test_flash_eligibility():
    q = torch.zeros(1, 4, 8, 64, dtype=torch.bfloat16)
    assert not va._flash_eligible(q, q, q, 0.0)  # the CPU
    assert not va.flash_supported("cpu", torch.bfloat16)
    assert not va.flash_supported("cuda", torch.float32)


@pytest.mark.parametrize(("capability", "flash"), [((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True)])
def test_flash_needs_ampere(monkeypatch, capability, flash):
    """The flash kernels raise "FlashAttention only supports Ampere GPUs or newer" on a T4 / V100 although the build
    has them: auto keeps the mask there, and a forced varlen takes the SDPA fallback (a CUDA device faked)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    assert va.flash_supported("cuda", torch.float16) is flash
    assert va.flash_supported(torch.device("cuda", 0), torch.bfloat16) is flash
    assert va.set_packed_attention(tiny_int4_lora_model("llama"), "auto", device="cuda", dtype=torch.float16) == (
        "varlen" if flash else "mask"
    )

    class CudaTensor:  # what _flash_eligible reads of a CUDA query / key / value
        is_cuda, device, dtype = True, torch.device("cuda", 0), torch.float16

        def __init__(self, *shape):
            self.shape = shape

    q, kv = CudaTensor(1, 8, 16, 64), CudaTensor(1, 2, 16, 64)
    assert va._flash_eligible(q, kv, kv, 0.0) is flash


# ---------------------------------------------------------------------------------------------------------------
# Generation and the switch


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_varlen_set(arch, tokenizer):
    """Greedy generation (the trainer's eval prompts; a padded batch goes through the delegated sdpa path) gives the
    same tokens as with sdpa."""
    model = tiny_int4_lora_model(arch).eval()
    prompts = tokenizer(["hello there", "a"], padding=True, return_tensors="pt", padding_side="left")
    single = tokenizer(["hello there"], return_tensors="pt")

    def generate():
        with torch.no_grad():
            return [
                model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
                for inputs in (prompts, single)
            ]

    expected = generate()
    assert prompts["attention_mask"][1, 0] == 0  # left padding: a mask with zeros
    va.set_packed_attention(model, "varlen")
    assert va.attention_implementation(model) == va.IMPLEMENTATION
    for got, want in zip(generate(), expected):
        assert torch.equal(got, want)


def test_set_packed_attention_switches_and_restores(monkeypatch):
    model = tiny_int4_lora_model("llama")
    assert va.set_packed_attention(model, "auto") == "mask"  # the CPU: no flash kernel
    assert va.attention_implementation(model) == "sdpa"
    assert va.set_packed_attention(model, "varlen") == "varlen"
    assert va.attention_implementation(model) == va.IMPLEMENTATION
    assert va.set_packed_attention(model, "varlen") == "varlen"  # idempotent: "mask" still restores sdpa
    assert va.set_packed_attention(model, "mask") == "mask"
    assert va.attention_implementation(model) == "sdpa"
    with pytest.raises(ConfigError, match="packed_attention"):
        va.set_packed_attention(model, "flash")

    monkeypatch.setattr(va, "flash_supported", lambda device, dtype: True)  # as on CUDA with bf16
    assert va.set_packed_attention(model, "auto", packed=False) == "mask"
    assert va.set_packed_attention(model, "auto", packed=True) == "varlen"
    assert va.set_packed_attention(model, "mask") == "mask"
    va.transformers_model(model).set_attn_implementation("eager")
    assert va.set_packed_attention(model, "auto") == "mask"  # auto leaves a model's own eager alone
    assert va.attention_implementation(model) == "eager"


def test_softcapped_attention_is_refused(monkeypatch):
    """Gemma-2 caps its attention logits (``attn_logit_softcapping``), which neither flash varlen kernel applies: a
    forced varlen is refused, auto keeps the mask, and the attention function raises rather than drop the cap."""
    model = tiny_int4_lora_model("gemma2")
    before = va.attention_implementation(model)
    with pytest.raises(UnsupportedFormatError, match="attn_logit_softcapping"):
        va.set_packed_attention(model, "varlen")
    assert va.attention_implementation(model) == before

    monkeypatch.setattr(va, "flash_supported", lambda device, dtype: True)  # as on CUDA with bf16
    llama = tiny_int4_lora_model("llama")  # sdpa, so auto would switch it
    va.transformers_model(llama).config.attn_logit_softcapping = 50.0
    assert va.set_packed_attention(llama, "auto") == "mask"
    assert va.attention_implementation(llama) == "sdpa"

    monkeypatch.setattr(va, "_flash_eligible", lambda *a: True)
    q, k, v = _qkv()
    with pytest.raises(UnsupportedFormatError, match="softcapping"):
        va.varlen_attention_forward(torch.nn.Module(), q, k, v, None, position_ids=POSITIONS, softcap=50.0)


def test_speed_apply_reports_packed_attention(monkeypatch):
    model = tiny_int4_lora_model("llama")
    assert speed.apply(model, packed_attention="varlen")["packed_attention"] == "varlen"
    assert speed.apply(model)["packed_attention"] == "mask"  # SpeedConfig(): auto, on the CPU
    assert va.attention_implementation(model) == "sdpa"
    monkeypatch.setattr(va, "flash_supported", lambda device, dtype: device == "cuda" and dtype == torch.bfloat16)
    assert speed.apply(model, device="cuda", dtype=torch.bfloat16)["packed_attention"] == "varlen"
    assert speed.apply(model, device="cuda", dtype=torch.bfloat16, packed=False)["packed_attention"] == "mask"
    with pytest.raises(ConfigError, match="packed_attention"):
        speed.apply(model, packed_attention="flash")


def test_trainer_detects_packed_rows():
    from int4lora_train.train.trainer import _is_packed

    whole = Sample(torch.arange(5, dtype=torch.int32), torch.arange(5, dtype=torch.int32), torch.arange(5))
    packed = Sample(whole.input_ids, whole.labels, torch.tensor([0, 1, 2, 0, 1]))
    assert not _is_packed(whole) and _is_packed(packed)


# ---------------------------------------------------------------------------------------------------------------
# CUDA only: the flash kernels themselves


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the flash varlen kernel)")


@cuda
@pytest.mark.parametrize("kernel", ["aten", "varlen_attn"])
@pytest.mark.parametrize("kv_heads", [2, 8])  # grouped-query and multi-head
@pytest.mark.parametrize("window", [None, 3])
def test_cuda_flash_varlen_matches_reference(kernel, kv_heads, window):
    try:
        va.flash_kernel(8, kv_heads, kernel)
    except UnsupportedFormatError:
        pytest.skip(f"torch {torch.__version__} has no {kernel} for 8 query and {kv_heads} key/value heads")
    qkv = _qkv(heads=8, kv_heads=kv_heads, dim=64)
    q, k, v = (t.detach().cuda().to(torch.bfloat16).requires_grad_() for t in qkv)
    segments = va.compute_segments(POSITIONS.cuda())
    flat = [va.to_varlen(t) for t in (q, k, v)]
    out = va.flash_varlen(*flat, segments.cu_seqlens, segments.max_seqlen, scale=0.2, window=window, kernel=kernel)
    expected = reference_varlen(*[t.float() for t in flat], segments.cu_seqlens, 0.2, window)
    assert (out.float() - expected).abs().max().item() < 2e-2
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        assert rel_diff(got, want) < 5e-2


@cuda
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_bf16_model_matches_the_mask_path(arch):
    batch = {k: v.cuda() for k, v in _packed_batch().items()}

    def run(packed_attention: str):
        model = tiny_int4_lora_model(arch).to("cuda", torch.bfloat16)
        va.set_packed_attention(model, packed_attention)
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        out.logits.float().square().mean().backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
        return out.logits.float().detach(), grads

    (ref_logits, ref_grads), (logits, grads) = run("mask"), run("varlen")
    assert rel_diff(logits, ref_logits) <= 3e-2
    for name in ref_grads:
        scale = max(1e-3, ref_grads[name].abs().max().item())
        assert (grads[name] - ref_grads[name]).abs().max().item() <= 5e-2 * scale, name
