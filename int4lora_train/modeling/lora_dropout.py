"""Fused LoRA dropout: a mask defined by a seed and a position, so the fused LoRA nodes save a seed, not a mask.

The fused nodes (:class:`~int4lora_train.modeling.lora_layer.Int4LoraFunction`, the projection groups' node) with
dropout ``p > 0`` otherwise run ``torch.native_dropout`` per member (reads ``x``, writes the dropped copy and a bool
mask, both ``[T, in]``), matmul the copy, and in backward make the dropped copy again and mask the input gradient
in two more passes. With fused dropout each member draws one seed per forward (:func:`draw_seeds`) and the Triton
kernels of :mod:`int4lora_train.kernels.lora_dropout` make the mask in registers, forward and again in backward.

The mask, the one definition (the kernels compute the same bits; :func:`dropout_keep_mask` is its torch form)::

    w(t, k)      = word (t mod 4) of Philox4x32-7(counter = c, key = seed)     c = (t div 4) * K + k   (64-bit,
                   its 32-bit halves the first two counter words, the others 0; the key the seed's 32-bit halves)
    keep[t, k]   = w(t, k) >= floor(p * 2**32)                                  kept with probability 1 - p
    dropped x    = x * keep / (1 - p)

(one Philox draw gives four words, used by four consecutive rows: the draws, not the memory traffic, bound the
kernels). The masks are not torch's: for a given ``torch.manual_seed`` a step with fused dropout differs from one
without; both drop each element independently with probability ``p``.

Seeds come from the default CPU generator (``torch.randint``: no device work, no sync). Gradient checkpointing
restores the CPU RNG state for its recompute, which therefore draws the same seeds and makes the same masks.

Where it runs (``fused_dropout``, per layer, set by :func:`int4lora_train.speed.apply`; :func:`fused_dropout_runs`):
``"auto"`` on CUDA when Triton imports (not under ``INT4LORA_KERNELS=torch``); ``"on"`` also on the CPU when the
kernel module was imported under ``TRITON_INTERPRET=1`` (Triton's interpreter, how the tests run it; anywhere else
a :class:`ConfigError`); ``"off"`` never. Elsewhere the nodes keep ``torch.native_dropout``.
"""

from __future__ import annotations

import torch

from int4lora_train.errors import ConfigError
from int4lora_train.kernels.backend import triton_available, use_triton

FUSED_DROPOUT_CHOICES = ("auto", "on", "off")
PHILOX_ROUNDS = 7
"""Philox4x32 rounds: the mask generation, not memory, bounds the kernels, and 7 rounds already pass TestU01's
BigCrush (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011; their default 10 is a margin)."""
PHILOX_ROUND_A, PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57  # Random123's multipliers and key increments
PHILOX_KEY_A, PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_SEED_BOUND = 2**31 - 1
_LOW = 0xFFFFFFFF


def fused_dropout_runs(choice: str, device: torch.device) -> bool:
    """Whether a fused node on ``device`` with dropout uses the fused kernels for the layer option ``choice``."""
    if choice == "auto":
        return use_triton(device)
    if choice == "off":
        return False
    if choice != "on":
        raise ConfigError(f"fused_dropout must be one of {FUSED_DROPOUT_CHOICES}, got {choice!r}")
    if not triton_available():
        raise ConfigError("fused_dropout: on needs Triton, which does not import here; use auto or off")
    if device.type != "cuda":
        from int4lora_train.kernels import lora_dropout

        if not lora_dropout.INTERPRETED:
            raise ConfigError(
                f"fused_dropout: on runs the Triton kernels, on CUDA (or on the CPU in Triton's interpreter, "
                f"TRITON_INTERPRET=1); this input is on {device.type}: use auto or off"
            )
    return True


def draw_seeds(n: int) -> tuple[int, ...]:
    """``n`` mask seeds (one per member) from the default CPU generator (see the module docstring)."""
    return tuple(torch.randint(_SEED_BOUND, (n,)).tolist())


# ------------------------------------------------------------------------------------------------ torch references


def _mul_parts(x: torch.Tensor, constant: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The high and low 32-bit words of ``x * constant`` for uint32 values held in int64 (16-bit halves of the
    constant keep every product below 2**63)."""
    high_c, low_c = constant >> 16, constant & 0xFFFF
    by_high, by_low = x * high_c, x * low_c
    return (by_high + (by_low >> 16)) >> 16, (((by_high & 0xFFFF) << 16) + by_low) & _LOW


def philox4x32(counter: torch.Tensor, seed: int, rounds: int = PHILOX_ROUNDS) -> tuple[torch.Tensor, ...]:
    """The four words (int64 tensors of uint32 values) of Philox4x32 for the 64-bit ``counter`` (int64) and key
    ``seed``, as the kernels compute them."""
    c0, c1 = counter & _LOW, (counter >> 32) & _LOW
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)
    k0, k1 = seed & _LOW, (seed >> 32) & _LOW
    for _ in range(rounds):
        hi_b, lo_b = _mul_parts(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mul_parts(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + PHILOX_KEY_A) & _LOW, (k1 + PHILOX_KEY_B) & _LOW
    return c0, c1, c2, c3


def keep_threshold(p: float) -> int:
    """The uint32 threshold of dropout probability ``p``: a word is kept when ``>= floor(p * 2**32)``."""
    return min(int(p * 2**32), 2**32 - 1)


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """The bool keep mask ``[rows, cols]`` of ``seed`` (the module docstring's definition), in torch."""
    t = torch.arange(rows, dtype=torch.int64, device=device)[:, None]
    k = torch.arange(cols, dtype=torch.int64, device=device)[None, :]
    words = torch.stack(philox4x32((t // 4) * cols + k, seed), dim=-1)  # [rows, cols, 4]
    word = words.gather(-1, (t % 4).expand(rows, cols).unsqueeze(-1)).squeeze(-1)
    return word >= keep_threshold(p)


def member_masks(x2: torch.Tensor, seeds: tuple[int, ...], p: float) -> list[torch.Tensor]:
    """The keep mask of each seed for ``x2`` ``[T, K]``, on its device."""
    return [dropout_keep_mask(seed, *x2.shape, p, device=x2.device) for seed in seeds]


def dropout_lora_a_torch(
    x2: torch.Tensor, a_cat: torch.Tensor, ranks: tuple[int, ...], seeds: tuple[int, ...], p: float
) -> torch.Tensor:
    """The torch form of :func:`int4lora_train.kernels.lora_dropout.dropout_lora_a`: ``[T, R]`` in fp32."""
    parts = [
        (x2.float() * keep / (1 - p)) @ a.float().t()
        for a, keep in zip(a_cat.split(list(ranks)), member_masks(x2, seeds, p))
    ]
    return torch.cat(parts, dim=1)


def dropout_lora_a_backward_torch(
    x2: torch.Tensor, gs: torch.Tensor, a_cat: torch.Tensor, ranks: tuple[int, ...], seeds: tuple[int, ...], p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch form of :func:`int4lora_train.kernels.lora_dropout.dropout_lora_a_backward`: ``(the grad_x
    increment [T, K], grad_A [R, K])``, both fp32."""
    grad_x = torch.zeros(x2.shape, dtype=torch.float32, device=x2.device)
    grads_a = []
    masks = member_masks(x2, seeds, p)
    for gs_i, a, keep in zip(gs.float().split(list(ranks), dim=1), a_cat.float().split(list(ranks)), masks):
        grad_x += (gs_i @ a) * keep / (1 - p)
        grads_a.append(gs_i.t() @ (x2.float() * keep / (1 - p)))
    return grad_x, torch.cat(grads_a)
