"""Attention over packed rows without a mask: the rows of a batch as one sequence of segments (varlen attention).

Packed rows restart ``position_ids`` at 0 for each sample (``train/data.py``) and ``attention_mask`` stays ``None``.
Under ``sdpa`` transformers detects the segments from ``position_ids`` and builds a 4-D block-causal mask, which
keeps SDPA off its flash kernel (measured on an H200: packed rows cost ~25% step time). This module registers an
attention implementation, :data:`IMPLEMENTATION`, with transformers' ``AttentionInterface``, and a mask function
with its ``AttentionMaskInterface`` that builds no mask where this implementation needs none. The attention function
reads the segments from the ``position_ids`` the decoder layers pass through (Llama, Qwen2/Qwen3, Qwen3-MoE,
Mistral) and runs causal attention inside each segment:

- CUDA with compute capability 8.0+, bf16/fp16 (also under autocast), head dim a multiple of 8 up to 256, no
  attention dropout: the flash varlen kernel over the batch flattened to ``B*T`` tokens (:func:`flash_varlen`):
  ``torch.nn.attention.varlen.varlen_attn`` where the running torch has it and can take the heads as they are (equal
  query and key/value head counts, or an ``enable_gqa`` argument), else :class:`FlashVarlenFunction` over
  ``torch.ops.aten._flash_attention_forward`` / ``_flash_attention_backward`` (the flash kernel takes fewer
  key/value heads as they are: grouped-query attention without ``repeat_kv``).
- anything else (the CPU, fp32, dropout): transformers' own ``sdpa`` function with the block-causal mask built from
  the same segments (once per forward), so the result equals the ``sdpa`` path on packed rows exactly.
- what it cannot read segments from (a padding ``attention_mask`` with zeros, a KV cache holding earlier tokens, a
  bidirectional module) goes to transformers' ``sdpa`` unchanged, with the mask transformers built for it; so
  ``generate`` (the trainer's eval prompts) works with the implementation set.

Segments: a new one starts at each row's first token and wherever a position is not the previous one plus 1 (the
rule of transformers' ``find_packed_sequence_indices``); padding, whose positions restart at 0, is a segment of its
own. They are computed once per forward (one device-to-host copy of ``position_ids``) and reused by every layer
(:func:`segments_for`); precomputed ``cu_seq_lens_q`` / ``max_length_q`` keyword arguments (transformers' flash
convention) are used as given.

Switch it on with ``speed.apply(model, packed_attention="varlen")`` (:func:`set_packed_attention`).
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from int4lora_train.errors import ConfigError, UnsupportedFormatError

logger = logging.getLogger(__name__)

IMPLEMENTATION = "int4lora_varlen"
"""The name this module registers with transformers' ``AttentionInterface`` and ``AttentionMaskInterface``."""

PACKED_ATTENTION_CHOICES = ("auto", "varlen", "mask")
FLASH_DTYPES = (torch.bfloat16, torch.float16)
KERNELS = ("auto", "varlen_attn", "aten")


# ---------------------------------------------------------------------------------------------------------------
# Segments from position_ids


@dataclass
class Segments:
    """The segments of a ``[B, T]`` batch flattened to ``B*T`` tokens.

    ``cu_seqlens`` (int32 ``[N+1]``, on the batch's device) are the segment boundaries, ``max_seqlen`` the longest
    segment, ``lengths`` the segment lengths on the host. ``masks`` caches the block-causal masks built from them
    for the fallback path (by sliding window).
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    lengths: tuple[int, ...]
    batch: int
    length: int
    masks: dict[Any, torch.Tensor] = field(default_factory=dict)

    def block_causal_mask(self, window: int | None = None) -> torch.Tensor:
        """Bool ``[B, 1, T, T]``: True where a query may attend a key (same segment, not later, within ``window``)."""
        if window not in self.masks:
            device = self.cu_seqlens.device
            ids = torch.repeat_interleave(
                torch.arange(len(self.lengths), device=device), torch.tensor(self.lengths, device=device)
            ).view(self.batch, self.length)
            pos = torch.arange(self.length, device=device)
            mask = (ids[:, :, None] == ids[:, None, :]) & (pos[None, :, None] >= pos[None, None, :])
            if window is not None:
                mask &= pos[None, :, None] - pos[None, None, :] < window
            self.masks[window] = mask[:, None]
        return self.masks[window]


def segment_lengths(position_ids: torch.Tensor, batch: int | None = None) -> list[int]:
    """Lengths of the segments of ``position_ids`` (``[B, T]``, or ``[1, T]`` / ``[T]`` broadcast to ``batch``
    rows), row after row.

    A segment starts at each row's first token and wherever a position is not the previous one plus 1.
    """
    pos = position_ids.detach().to("cpu", torch.long)
    if pos.ndim == 1:
        pos = pos[None]
    if batch is not None and pos.shape[0] != batch:
        pos = pos.expand(batch, -1)
    starts = torch.ones(pos.shape, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    boundaries = torch.cat([starts.flatten().nonzero().flatten(), torch.tensor([pos.numel()])])
    return boundaries.diff().tolist()


def compute_segments(
    position_ids: torch.Tensor, batch: int | None = None, device: torch.device | str | None = None
) -> Segments:
    """:class:`Segments` of ``position_ids`` (``[B, T]``, or ``[1, T]`` / ``[T]`` broadcast to ``batch`` rows), with
    ``cu_seqlens`` on ``device`` (default: ``position_ids``'). From host ``position_ids`` nothing waits for the
    device (:func:`preset_segments` then hands them to the forward of their device copy)."""
    if position_ids.ndim == 1:
        position_ids = position_ids[None]
    if position_ids.ndim != 2:
        raise UnsupportedFormatError(
            f"varlen attention reads segments from 2-D position_ids, got shape {tuple(position_ids.shape)}; "
            "use train.speed.packed_attention: mask"
        )
    lengths = segment_lengths(position_ids, batch)
    rows, width = batch or position_ids.shape[0], position_ids.shape[1]
    cu = cu_seqlens(lengths)
    target = position_ids.device if device is None else device
    return Segments(cu.to(target, non_blocking=True), max(lengths), tuple(lengths), rows, width)


def cu_seqlens(lengths: list[int], capacity: int | None = None) -> torch.Tensor:
    """The segment boundaries of ``lengths`` (int32 ``[N + 1]`` on the host, from 0), or ``[capacity + 1]`` with the
    last boundary repeated (empty segments after the real ones)."""
    cu = torch.full((len(lengths) + 1 if capacity is None else capacity + 1,), sum(lengths), dtype=torch.int32)
    cu[0] = 0
    cu[1 : len(lengths) + 1] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return cu


@dataclass
class _Cached:
    key: torch.Tensor  # held, so its storage (and data_ptr) cannot be reused while it is the key
    version: int
    batch: int
    segments: Segments


_last: _Cached | None = None


def _cached(key: torch.Tensor, batch: int, compute) -> Segments:
    """``compute()``, or what it gave for this very tensor (identity and version) and batch size last time.

    An inference tensor (made under ``torch.inference_mode``) has no version counter, so an in-place change could not
    be seen: computed every time, never kept."""
    global _last
    if key.is_inference():
        return compute()
    cached = _last
    if cached is not None and cached.key is key and cached.version == key._version and cached.batch == batch:
        return cached.segments
    segments = compute()
    _last = _Cached(key, key._version, batch, segments)
    return segments


def segments_for(position_ids: torch.Tensor, batch: int) -> Segments:
    """:func:`compute_segments`, once per forward: every layer gets the same ``position_ids`` tensor, so the result
    is kept for that tensor (its identity and version: an in-place change computes them again)."""
    return _cached(position_ids, batch, lambda: compute_segments(position_ids, batch))


def preset_segments(position_ids: torch.Tensor, segments: Segments) -> None:
    """Make :func:`segments_for` return ``segments`` for ``position_ids`` as it is now, for a caller that knows them:
    the trainer, from the batch's host copy (else the first attention of each forward waits for a device-to-host copy
    of the position ids, and the GPU's queue drains), and :mod:`.layer_graphs`, whose graphs cannot read them from
    the device."""
    global _last
    _last = _Cached(position_ids, position_ids._version, segments.batch, segments)


def clear_cache() -> None:
    """Forget the segments kept by :func:`segments_for` (and the ``position_ids`` tensor they hold)."""
    global _last
    _last = None


# ---------------------------------------------------------------------------------------------------------------
# Layout: transformers' [B, H, T, D] <-> varlen's [B*T, H, D]


def to_varlen(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, D]`` (transformers' q/k/v) -> ``[B*T, H, D]`` with a unit last stride (the flash kernels')."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch * length, heads, dim)


def from_varlen(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``[B*T, H, D]`` -> ``[B, T, H, D]``, the layout transformers' attention functions return."""
    total, heads, dim = x.shape
    return x.view(batch, total // batch, heads, dim)


# ---------------------------------------------------------------------------------------------------------------
# The CUDA kernels


class FlashVarlenFunction(torch.autograd.Function):
    """Causal varlen attention as one autograd node over ``aten._flash_attention_forward`` / ``_backward``.

    ``q``: ``[N, Hq, D]``; ``k``, ``v``: ``[N, Hkv, D]`` with ``Hkv`` dividing ``Hq`` (the kernel shares each
    key/value head among its group of query heads); no dropout. ``window``: a sliding window of that many tokens
    (the query's own included), or None.
    """

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale, window):
        out, lse, rng_state, unused = _flash_forward(q, k, v, cu_seqlens, max_seqlen, scale, window)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, rng_state, unused)
        ctx.max_seqlen, ctx.scale, ctx.window = max_seqlen, scale, window
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens, rng_state, unused = ctx.saved_tensors
        dq, dk, dv = _flash_backward(
            grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, rng_state, unused, ctx.scale,
            ctx.window,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None


def _flash_forward(q, k, v, cu_seqlens, max_seqlen, scale, window):
    """``aten._flash_attention_forward`` (causal, no dropout, no debug mask) -> ``(out, lse, rng_state, unused)``.

    Positional arguments up to ``return_debug_mask`` and the keywords ``scale``, ``window_size_left/right`` are the
    same in torch 2.11 and 2.13 (the schemas differ only in later optional keywords, not passed here)."""
    out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, True, False, **_flash_options(scale, window)
    )
    return out, lse, rng_state, unused


def _flash_backward(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, rng_state, unused, scale, window):
    """``aten._flash_attention_backward`` for :func:`_flash_forward`'s output -> ``(dq, dk, dv)``."""
    return torch.ops.aten._flash_attention_backward(
        grad_out, q, k, v, out, lse, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, True, rng_state, unused,
        **_flash_options(scale, window),
    )  # fmt: skip


def _flash_options(scale: float | None, window: int | None) -> dict[str, Any]:
    options: dict[str, Any] = {"scale": scale}
    if window is not None:
        options.update(window_size_left=window - 1, window_size_right=0)
    return options


@functools.cache
def _varlen_attn():
    """``torch.nn.attention.varlen.varlen_attn`` and whether it takes ``enable_gqa``, or ``(None, False)`` (looked
    up once: every layer's attention asks)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, False
    try:
        parameters = inspect.signature(varlen_attn).parameters
    except (TypeError, ValueError):
        return None, False
    if "window_size" not in parameters:  # an older signature (is_causal=...) this module was not written against
        return None, False
    return varlen_attn, "enable_gqa" in parameters


def flash_kernel(num_heads: int, num_kv_heads: int, kernel: str = "auto") -> str:
    """Which kernel :func:`flash_varlen` runs: ``"varlen_attn"`` (torch's public varlen op) when the running torch
    has it and it takes these head counts as they are, else ``"aten"`` (:class:`FlashVarlenFunction`). ``kernel``
    forces one (``"varlen_attn"`` where torch lacks it, or cannot take grouped heads, is an error)."""
    if kernel not in KERNELS:
        raise ConfigError(f"varlen kernel must be one of {KERNELS}, got {kernel!r}")
    varlen_attn, gqa = _varlen_attn()
    usable = varlen_attn is not None and (num_heads == num_kv_heads or gqa)
    if kernel == "varlen_attn" and not usable:
        raise UnsupportedFormatError(
            f"torch {torch.__version__} has no varlen_attn that takes {num_heads} query and {num_kv_heads} key/value "
            "heads as they are"
        )
    if kernel == "auto":
        return "varlen_attn" if usable else "aten"
    return kernel


def flash_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float | None = None,
    window: int | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Causal attention within each segment of ``cu_seqlens`` on the flash kernel: ``q`` ``[N, Hq, D]``, ``k`` and
    ``v`` ``[N, Hkv, D]`` (CUDA, bf16/fp16) -> ``[N, Hq, D]``. ``kernel``: see :func:`flash_kernel`."""
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if flash_kernel(num_heads, num_kv_heads, kernel) == "varlen_attn":
        varlen_attn, gqa = _varlen_attn()
        options: dict[str, Any] = {"scale": scale, "window_size": (-1 if window is None else window - 1, 0)}
        if gqa:
            options["enable_gqa"] = num_heads != num_kv_heads
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **options)
    return FlashVarlenFunction.apply(q, k, v, cu_seqlens, max_seqlen, scale, window)


def flash_supported(device: torch.device | str, dtype: torch.dtype | None) -> bool:
    """Whether the flash varlen kernel can run for a model on ``device`` computing in ``dtype``."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in FLASH_DTYPES or not torch.cuda.is_available():
        return False
    if torch.version.hip:  # ROCm's flash kernels return other RNG state; not tried here
        return False
    available = getattr(torch.backends.cuda, "is_flash_attention_available", None)
    if available is not None and not available():
        return False
    return _flash_capable(device)


def _flash_capable(device: torch.device) -> bool:
    """Compute capability 8.0+ (Ampere or newer), the flash kernels' minimum: on an older GPU (T4, V100) they raise
    "FlashAttention only supports Ampere GPUs or newer", while the build reports flash attention available."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= (8, 0)


def _flash_eligible(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float) -> bool:
    """:func:`flash_supported` for the query's device and dtype, and operands the kernel takes as they are."""
    head_dim = query.shape[-1]
    return (
        flash_supported(query.device, query.dtype)
        and query.dtype == key.dtype == value.dtype
        and head_dim % 8 == 0
        and head_dim <= 256
        and value.shape[-1] == head_dim
        and dropout == 0.0
        and query.shape[1] % key.shape[1] == 0
    )


# ---------------------------------------------------------------------------------------------------------------
# The transformers attention function and mask function


def _sdpa_forward():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface (``query`` ``[B, Hq, T, D]``, ``key``/``value`` ``[B, Hkv, T, D]``)
    -> ``([B, T, Hq, D], None)``: causal attention inside each segment of ``kwargs["position_ids"]``.

    Delegates to transformers' ``sdpa`` function unchanged where the segments are not the whole story: an
    ``attention_mask`` (padding, or a cache's mask), fewer queries than keys (a KV cache holding earlier tokens), a
    bidirectional module.
    """
    sdpa = _sdpa_forward()
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is not None or query.shape[2] != key.shape[2] or not causal:
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                    **kwargs)  # fmt: skip
    if kwargs.get("softcap") is not None:
        raise UnsupportedFormatError(
            "varlen attention cannot apply attention logit softcapping (attn_logit_softcapping: Gemma-2); use "
            "train.speed.packed_attention: mask"
        )
    batch, length = query.shape[0], query.shape[2]
    window = kwargs.get("sliding_window")
    window = int(window) if window is not None and window > 0 and window < length else None
    segments = _segments(kwargs, batch, length)
    q, k, v = _autocast(query, key, value)
    if _flash_eligible(q, k, v, dropout):
        out = flash_varlen(to_varlen(q), to_varlen(k), to_varlen(v), segments.cu_seqlens, segments.max_seqlen,
                           scale=scaling, window=window)  # fmt: skip
        return from_varlen(out, batch), None
    if len(segments.lengths) == batch and window is None:  # one segment per row: plain causal attention
        return sdpa(module, query, key, value, None, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    mask = segments.block_causal_mask(window)
    return sdpa(module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)


def _segments(kwargs: dict[str, Any], batch: int, length: int) -> Segments:
    """The segments of this forward: precomputed ``cu_seq_lens_q`` / ``max_length_q`` if given, else from
    ``position_ids`` (:func:`segments_for`)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and kwargs.get("max_length_q") is not None:
        cu_k = kwargs.get("cu_seq_lens_k")
        max_length = int(kwargs["max_length_q"])

        def given() -> Segments:
            if cu_k is not None and cu_k is not cu and not torch.equal(cu_k, cu):
                raise UnsupportedFormatError("varlen attention needs cu_seq_lens_k equal to cu_seq_lens_q")
            lengths = tuple(cu.diff().tolist())
            if sum(lengths) != batch * length:
                raise UnsupportedFormatError(
                    f"cu_seq_lens_q covers {sum(lengths)} tokens, the batch has {batch} x {length}"
                )
            return Segments(cu.to(torch.int32), max_length, lengths, batch, length)

        return _cached(cu, batch, given)
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise UnsupportedFormatError(
            "varlen attention needs the position_ids the decoder layers pass to the attention function, and this "
            "model's layers pass none; use train.speed.packed_attention: mask"
        )
    segments = segments_for(position_ids, batch)
    if segments.length != length:
        raise UnsupportedFormatError(
            f"position_ids cover {segments.length} tokens per row, the attention sees {length}"
        )
    return segments


def _autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in the autocast dtype where CUDA autocast is on (as SDPA would compute them), else as they are."""
    first = tensors[0]
    if first.is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        return tuple(t.to(dtype) for t in tensors)
    return tensors


def varlen_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: Any = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The mask function registered with :data:`IMPLEMENTATION`: no mask where :func:`varlen_attention_forward` reads
    the segments itself (no ``attention_mask``, as many keys as queries, no offset: training rows, packed or not, and
    a first forward without history); everything else is transformers' ``sdpa_mask``, for the ``sdpa`` function the
    attention delegates to."""
    if attention_mask is None and q_length == kv_length and _is_zero(q_offset) and _is_zero(kv_offset):
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        attention_mask=attention_mask, **kwargs,
    )  # fmt: skip


def _is_zero(offset: Any) -> bool:
    return isinstance(offset, int) and offset == 0


def register() -> str:
    """Register :data:`IMPLEMENTATION` with transformers (attention and mask function; idempotent); returns it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, varlen_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, varlen_mask)
    return IMPLEMENTATION


# ---------------------------------------------------------------------------------------------------------------
# Switching a model


def transformers_model(model: nn.Module) -> nn.Module | None:
    """The outermost transformers ``PreTrainedModel`` in ``model`` (a PEFT model's base), or None."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    return None


def attention_implementation(model: nn.Module) -> str | None:
    """``config._attn_implementation`` of ``model``'s transformers model (None without one)."""
    base = transformers_model(model)
    return None if base is None else base.config._attn_implementation


def set_packed_attention(
    model: nn.Module,
    choice: str,
    *,
    packed: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    """Switch ``model``'s attention over packed rows; returns what is in effect: ``"varlen"`` or ``"mask"``.

    ``choice``: ``"varlen"`` (this module's implementation), ``"mask"`` (the implementation the model had before,
    transformers' mask path) or ``"auto"``: varlen when ``packed`` (the batches hold several segments per row:
    packing, or padding in batches of more than one row), the model uses ``sdpa`` (auto leaves eager or other
    implementations alone), does not cap its attention logits (Gemma-2's ``attn_logit_softcapping``, which neither
    kernel applies) and the flash varlen kernel supports ``device`` and ``dtype`` (CUDA, bf16/fp16; the defaults: the
    device of the model's first parameter and the model's dtype).

    Raises:
        ConfigError: an unknown choice.
        UnsupportedFormatError: ``"varlen"`` for a model that is no transformers model, cannot switch its
            attention implementation or caps its attention logits (Gemma-2; ``"auto"`` keeps the mask there).
    """
    if choice not in PACKED_ATTENTION_CHOICES:
        raise ConfigError(f"packed_attention must be one of {', '.join(PACKED_ATTENTION_CHOICES)}; got {choice!r}")
    base = transformers_model(model)
    if base is None:
        if choice == "varlen":
            raise UnsupportedFormatError("packed_attention varlen needs a transformers model")
        return "mask"
    current = base.config._attn_implementation
    softcap = _logit_softcap(base)
    if choice == "auto":
        if device is None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if dtype is None:
            dtype = getattr(base, "dtype", None)
        usable = current in ("sdpa", IMPLEMENTATION) and softcap is None and flash_supported(device, dtype)
        choice = "varlen" if packed and usable else "mask"
    if choice == "varlen" and softcap is not None:
        raise UnsupportedFormatError(
            f"packed_attention varlen: {type(base).__name__} caps its attention logits (attn_logit_softcapping "
            f"{softcap}), which the flash varlen kernels cannot; use train.speed.packed_attention: mask"
        )
    if choice == "mask":
        if current == IMPLEMENTATION:
            _set_implementation(base, getattr(base, "_int4lora_attn_before", "sdpa"))
        return "mask"
    if current != IMPLEMENTATION:
        register()
        base._int4lora_attn_before = current
        _set_implementation(base, IMPLEMENTATION)
        if base.config._attn_implementation != IMPLEMENTATION:
            raise UnsupportedFormatError(
                f"{type(base).__name__} cannot switch its attention implementation (it does not use transformers' "
                "AttentionInterface); use train.speed.packed_attention: mask"
            )
    return "varlen"


def _logit_softcap(base: nn.Module) -> float | None:
    """The attention logit softcapping of ``base``'s (text) config (Gemma-2), or None."""
    config = base.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "attn_logit_softcapping", None)


def _set_implementation(base: nn.Module, name: str) -> None:
    setter = getattr(base, "set_attn_implementation", None)
    if setter is not None:
        setter(name)
    else:  # older transformers: the config attribute every attention layer reads
        base.config._attn_implementation = name
