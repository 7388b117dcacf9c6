"""Causal-LM loss without the full logits: the output head and the cross-entropy, chunk by chunk of tokens.

transformers computes ``logits = lm_head(hidden)`` ``[tokens, vocab]``, upcasts them to fp32 and runs
``F.cross_entropy``; with Llama-3's 128,256-token vocabulary that is 1 GB of fp32 logits per 2,048 tokens, and the
log-softmax and the gradients add several more copies at the step's memory peak. Here the decoder runs to its final
hidden states, then for each chunk of ``chunk_size`` tokens::

    logits_c = hidden_c @ W.T                 [C, V]  in the compute dtype (as transformers' lm_head under autocast)
    loss_c   = sum over valid rows of  logsumexp(z) - z[target],   z = logits_c in fp32 (Gemma-2: softcapped)
    dlogits  = scale * (softmax(z) - onehot(target))       written over logits_c (Triton on CUDA, torch elsewhere)
    grad_hidden_c = dlogits @ W               [C, H]  (and grad_W += dlogits.T @ hidden_c if the head trains)

The gradient is computed in the forward pass (the loss is the last node of the graph, so it only has to be scaled
by the incoming gradient in backward): no chunk is recomputed and only ``grad_hidden`` ``[tokens, H]`` is kept. Peak
extra memory is one chunk of logits (plus fp32 temporaries on the torch path) instead of several full copies.

Semantics are transformers' ``ForCausalLMLoss``: labels shifted by one (or ``shift_labels`` as given), ``-100``
ignored, mean over valid targets, or ``sum / num_items_in_batch`` when that is given (gradient accumulation).

Two ways in:

- :func:`enable_chunked_loss` (for trainers): the causal LM's ``forward`` computes ``loss`` this way whenever it gets
  ``labels`` (and returns ``logits=None``); call the model exactly as before, through PEFT, DDP or accelerate.
- :func:`chunked_causal_lm_loss`: the same as a function of a model (plain or PEFT-wrapped, not DDP-wrapped).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from int4lora_train.errors import UnsupportedFormatError
from int4lora_train.kernels.backend import use_triton
from int4lora_train.modeling.peft_integration import unwrap_peft

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
DEFAULT_CHUNK_ELEMENTS = {"torch": 1 << 26, "triton": 1 << 28}
"""Logits per chunk when no chunk size is given, by backend. The Triton kernel works in place on the chunk's logits
(256 Mi elements: 512 MiB in bf16, 2048 rows of a 128K vocabulary; fewer, larger matmuls and launches); the torch
path adds fp32 copies, so it takes a quarter of that."""

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"})
"""Causal LMs whose ``forward`` is ``lm_head(decoder(...))`` (+ Gemma's final-logit softcapping) and
transformers' causal-LM loss; others keep their own forward."""

_LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index", "logits_to_keep", "return_dict")


# ------------------------------------------------------------------------------------------------ per-chunk maths


def cross_entropy_rows_torch(
    logits: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor,
    softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    compute_grad: bool = True,
) -> torch.Tensor:
    """The reference for :func:`~int4lora_train.kernels.cross_entropy.cross_entropy_rows_triton`: per-row
    loss ``[C]`` (fp32) of ``logits`` ``[C, V]``; with ``compute_grad`` the logits are overwritten by
    ``scale * d(sum of valid row losses)/d(logits)`` (``scale``: 0-d fp32 tensor)."""
    z = logits.float()
    tanh = None
    if softcap:
        tanh = torch.tanh(z / softcap)
        z = tanh * softcap
    lse = torch.logsumexp(z, dim=-1)  # [C]
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0).unsqueeze(1)
    loss = torch.where(valid, lse - z.gather(1, safe).squeeze(1), 0.0)
    if compute_grad:
        if z is logits:  # fp32 logits: .float() returned them, do not clobber before the softmax is formed
            z = z.clone()
        probs = z.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place
        probs.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=probs.dtype))
        probs.mul_(torch.where(valid, scale.to(probs.dtype), 0.0).unsqueeze(1))
        if tanh is not None:
            probs.mul_(tanh.mul_(tanh).neg_().add_(1.0))  # d(cap * tanh(x / cap))/dx = 1 - tanh^2
        logits.copy_(probs)
    return loss


def _rows_fn(device: torch.device, backend: str):
    """The per-chunk function for ``backend`` ("auto", "torch", "triton"; :mod:`int4lora_train.kernels.backend`)."""
    if use_triton(device, backend):
        from int4lora_train.kernels.cross_entropy import cross_entropy_rows_triton  # imports Triton (optional)

        return cross_entropy_rows_triton
    return cross_entropy_rows_torch


class LinearCrossEntropyFunction(torch.autograd.Function):
    """``sum_i valid_i * CE(hidden_i @ W.T + b, target_i) * scale`` chunk by chunk, gradients formed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, chunk_size: int, softcap, ignore_index: int, backend: str):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad = need_h or need_w or need_b
        rows_fn = _rows_fn(hidden.device, backend)
        tokens = hidden.shape[0]
        loss_rows = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, tokens, chunk_size):
                end = min(start + chunk_size, tokens)
                h = hidden[start:end]
                logits = F.linear(h, weight, bias)  # [C, V]
                loss_rows[start:end] = rows_fn(logits, targets[start:end], scale, softcap, ignore_index, grad)
                if need_h:
                    torch.mm(logits, weight, out=grad_h[start:end])
                if need_w:
                    grad_w.add_(logits.t() @ h)
                if need_b:
                    grad_b.add_(logits.sum(0, dtype=torch.float32))
                del logits
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        return loss_rows.sum() * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_loss).to(ctx.weight_dtype)
        if grad_b is not None:
            grad_b = (grad_b * grad_loss).to(ctx.weight_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def default_chunk_size(vocab_size: int, backend: str = "torch") -> int:
    """Rows per chunk for :data:`DEFAULT_CHUNK_ELEMENTS` logits of ``backend`` ("torch" or "triton"), a multiple
    of 64 (whole matmul tiles), >= 64."""
    return max(64, (DEFAULT_CHUNK_ELEMENTS[backend] // max(vocab_size, 1)) // 64 * 64)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    softcap: float | None = None,
    num_items_in_batch: torch.Tensor | int | float | None = None,
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``hidden`` ``[N, H]`` through the output head ``weight`` ``[V, H]`` (+ ``bias``) against
    ``targets`` ``[N]``, without materialising the ``[N, V]`` logits: the mean over valid targets, or their sum
    divided by ``num_items_in_batch`` when given. fp32 scalar.

    The head's matmul runs in the autocast dtype under autocast, else in ``hidden``'s dtype; the softmax in fp32.
    ``backend``: ``"auto"`` (Triton kernel on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise UnsupportedFormatError(
            f"linear_cross_entropy: hidden [N, H] and weight [V, H] must agree on H, got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise UnsupportedFormatError(
            f"linear_cross_entropy: targets must have shape [{hidden.shape[0]}] (one per hidden row), got "
            f"{tuple(targets.shape)}"
        )
    rows_fn = _rows_fn(hidden.device, backend)
    chunk_size = chunk_size or default_chunk_size(
        weight.shape[0], "torch" if rows_fn is cross_entropy_rows_torch else "triton"
    )
    if chunk_size < 1:
        raise UnsupportedFormatError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    device = hidden.device
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    else:
        dtype = hidden.dtype
    targets = targets.to(device=device, dtype=torch.long)
    if num_items_in_batch is None:
        denominator = (targets != ignore_index).sum().to(torch.float32)
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=device).to(torch.float32)
    scale = 1.0 / denominator
    return LinearCrossEntropyFunction.apply(
        hidden.to(dtype),
        weight.to(dtype),
        None if bias is None else bias.to(dtype),
        targets.contiguous(),
        scale,
        int(chunk_size),
        float(softcap) if softcap else None,
        ignore_index,
        backend,
    )


# ------------------------------------------------------------------------------------------------ causal LMs


def _check_supported(causal_lm: nn.Module) -> None:
    config = getattr(causal_lm, "config", None)
    model_type = getattr(config, "model_type", None)
    problem = None
    if model_type not in SUPPORTED_MODEL_TYPES:
        problem = f"model type {model_type!r} is not one of {sorted(SUPPORTED_MODEL_TYPES)}"
    elif type(head := causal_lm.get_output_embeddings()) is not nn.Linear:
        problem = f"its output head is a {type(head).__name__}, not a plain nn.Linear (a LoRA or quantized lm_head)"
    elif not isinstance(getattr(causal_lm, getattr(causal_lm, "base_model_prefix", "model"), None), nn.Module):
        problem = "it has no decoder under its base_model_prefix"
    if problem:
        raise UnsupportedFormatError(
            f"chunked loss: {type(causal_lm).__name__}: {problem}; train it with the model's own loss "
            "(set train.chunked_loss: false)."
        )


def _loss_from_hidden(causal_lm: nn.Module, hidden: torch.Tensor, labels, options: dict, loss_kwargs: dict):
    """The chunked loss of ``hidden`` ``[B, T, H]`` against ``labels`` ``[B, T]`` (transformers' shift rules)."""
    ignore_index = loss_kwargs.get("ignore_index", IGNORE_INDEX)
    shift_labels = loss_kwargs.get("shift_labels")
    if shift_labels is None:
        if labels.shape != hidden.shape[:-1]:
            raise UnsupportedFormatError(
                f"chunked loss: labels have shape {tuple(labels.shape)} but the hidden states {tuple(hidden.shape[:-1])}"
            )
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    head = causal_lm.get_output_embeddings()

    def head_loss(flat_hidden: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(
            flat_hidden,
            head.weight,
            shift_labels.reshape(-1),
            head.bias,
            chunk_size=options.get("chunk_size"),
            softcap=getattr(causal_lm.config, "final_logit_softcapping", None),
            num_items_in_batch=loss_kwargs.get("num_items_in_batch"),
            ignore_index=ignore_index,
            backend=options.get("backend", "auto"),
        )

    return call_as_forward(head, head_loss, hidden.reshape(-1, hidden.shape[-1]))


def call_as_forward(module: nn.Module, fn, *args: Any) -> Any:
    """``fn(*args)`` run as ``module``'s forward: through ``module.__call__``, so that the hooks registered on the module
    wrap it. The loss reads the head's weight outside ``lm_head(hidden)``; FSDP2 gathers a sharded head in its
    forward pre-hook (and again before its backward, from a hook on the output), so the loss must run inside it.
    Forward hooks on the head see the loss instead of logits (there are no logits)."""
    own = module.__dict__.get("forward")
    module.forward = fn
    try:
        return module(*args)
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def chunked_causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
    backend: str = "auto",
    **model_kwargs: Any,
) -> torch.Tensor:
    """``model(input_ids, labels=labels, ...).loss`` computed without full logits (see the module docstring).

    ``model``: a causal LM or a PEFT model around one (not a DDP wrapper: use :func:`enable_chunked_loss` there, so
    that the call goes through DDP's forward). ``model_kwargs`` (``position_ids``, ``inputs_embeds``, ...) go to the
    decoder. ``labels`` ``[B, T]`` are shifted as transformers does unless ``shift_labels`` is given.
    """
    causal_lm = unwrap_peft(model)
    _check_supported(causal_lm)
    if labels is None and shift_labels is None:
        raise UnsupportedFormatError("chunked_causal_lm_loss needs labels (or shift_labels)")
    decoder = getattr(causal_lm, causal_lm.base_model_prefix)
    model_kwargs.setdefault("use_cache", False)
    outputs = decoder(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    loss_kwargs = {"num_items_in_batch": num_items_in_batch, "shift_labels": shift_labels}
    return _loss_from_hidden(causal_lm, outputs[0], labels, {"chunk_size": chunk_size, "backend": backend}, loss_kwargs)


def _chunked_forward(causal_lm: nn.Module, original, options: dict, *args: Any, labels=None, **kwargs: Any):
    """The causal LM's forward with the chunked loss whenever ``labels`` are given (``logits`` is then None)."""
    if labels is None or len(args) > 1:
        return original(*args, labels=labels, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    loss_kwargs = {k: kwargs.pop(k) for k in _LOSS_KWARGS if k in kwargs}
    if args:
        kwargs["input_ids"] = args[0]
    kwargs.setdefault("use_cache", False)
    decoder = getattr(causal_lm, causal_lm.base_model_prefix)
    outputs = decoder(**kwargs)
    loss = _loss_from_hidden(causal_lm, outputs[0], labels, options, loss_kwargs)
    # transformers renamed past_key_values to cache in 5.x (the old name logs a deprecation): use this version's.
    cache = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    return CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None),
        **{cache: getattr(outputs, cache, None)},
    )


def enable_chunked_loss(model: nn.Module, chunk_size: int | None = None, backend: str = "auto") -> nn.Module:
    """Make the causal LM inside ``model`` compute its loss chunk by chunk whenever it is called with ``labels``.

    The returned output then has ``logits=None`` (callers that need logits call without labels). Returns the causal
    LM that was patched; :func:`disable_chunked_loss` undoes it. Raises :class:`UnsupportedFormatError` for model
    types whose forward is not ``lm_head(decoder(...))`` (see :data:`SUPPORTED_MODEL_TYPES`). ``chunk_size``: tokens
    per chunk (None: :func:`default_chunk_size` of the vocabulary).
    """
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise UnsupportedFormatError(f"enable_chunked_loss: chunk_size must be a positive integer, got {chunk_size!r}")
    _rows_fn(torch.device("cpu"), backend)  # validates the name
    causal_lm = unwrap_peft(model)
    _check_supported(causal_lm)
    disable_chunked_loss(causal_lm)
    original = causal_lm.forward
    patched = functools.partial(_chunked_forward, causal_lm, original, {"chunk_size": chunk_size, "backend": backend})
    patched._int4lora_chunked_loss = original
    causal_lm.forward = patched
    logger.info("chunked loss enabled on %s (chunk_size=%s)", type(causal_lm).__name__, chunk_size or "auto")
    return causal_lm


def disable_chunked_loss(model: nn.Module) -> bool:
    """Undo :func:`enable_chunked_loss`; returns whether it was enabled."""
    causal_lm = unwrap_peft(model)
    original = getattr(causal_lm.__dict__.get("forward"), "_int4lora_chunked_loss", None)
    if original is None:
        return False
    del causal_lm.forward
    return True


def chunked_loss_enabled(model: nn.Module) -> bool:
    """Whether :func:`enable_chunked_loss` is in effect on the causal LM inside ``model``."""
    return getattr(unwrap_peft(model).__dict__.get("forward"), "_int4lora_chunked_loss", None) is not None
