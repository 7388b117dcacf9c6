"""One call that switches on the training-step optimisations for a PEFT model (INT4 or not), for trainers.

::

    model = get_peft_model(load_int4_model(path), lora_config)
    prepare_for_training(model, gradient_checkpointing=True)
    report = apply_training_optimizations(model)          # the defaults below
    loss = model(input_ids=..., labels=..., num_items_in_batch=...).loss     # as before; logits are None

What each option does and what it was measured to give (Llama-3.1-8B shape, seq 2048, H100; BENCHMARKS.md,
"Training step"):

- ``fused_lora``: one autograd node per LoRA'd INT4 projection (:mod:`.fused_lora`).
- ``keep_dense_for_backward``: the dense weight dequantized in a checkpoint recompute serves its backward.
- ``group_projections``: q/k/v and gate/up as one node each (one dequantized weight, one matmul).
- ``chunked_loss`` / ``loss_chunk_size``: the loss without full fp32 logits (:mod:`.chunked_loss`); models it
  does not support keep their own loss (logged).
- ``fused_kernels``: Triton RMSNorm and SwiGLU (:mod:`.fused_ops`); ``"auto"`` uses them for inputs of at least
  :data:`~int4lora_train.modeling.fused_ops.AUTO_MIN_ELEMENTS` elements, where the step is GPU-bound.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from int4lora_train.errors import ConfigError, UnsupportedFormatError
from int4lora_train.modeling.chunked_loss import disable_chunked_loss, enable_chunked_loss
from int4lora_train.modeling.fused_lora import configure_int4_training
from int4lora_train.modeling.fused_ops import disable_fused_kernels, enable_fused_kernels

logger = logging.getLogger(__name__)

FUSED_KERNEL_CHOICES = ("auto", True, False)


def apply_training_optimizations(
    model: nn.Module,
    *,
    fused_lora: bool = True,
    keep_dense_for_backward: bool = True,
    group_projections: bool = True,
    chunked_loss: bool = True,
    loss_chunk_size: int | None = None,
    fused_kernels: bool | str = "auto",
) -> dict[str, Any]:
    """Apply (or, with False, remove) each optimisation on ``model``; returns what was done, for logging:
    ``{"lora_layers", "int4_layers", "groups", "chunked_loss", "rmsnorm", "swiglu"}``.

    Call it after ``get_peft_model`` (the LoRA layers must exist) and before wrapping the model for DDP.
    """
    if fused_kernels not in FUSED_KERNEL_CHOICES or not isinstance(fused_kernels, bool | str):
        raise ConfigError(f"fused_kernels must be one of 'auto', true, false; got {fused_kernels!r}")
    if not isinstance(chunked_loss, bool):
        raise ConfigError(f"chunked_loss must be true or false, got {chunked_loss!r}")
    if loss_chunk_size is not None and (
        isinstance(loss_chunk_size, bool) or not isinstance(loss_chunk_size, int) or loss_chunk_size < 1
    ):
        raise ConfigError(f"loss_chunk_size must be a positive integer or null (auto), got {loss_chunk_size!r}")
    if group_projections and not fused_lora:
        raise ConfigError("group_projections needs fused_lora: true (or set group_projections: false)")
    report: dict[str, Any] = dict(
        configure_int4_training(
            model,
            fused_lora=fused_lora,
            keep_dense_for_backward=keep_dense_for_backward,
            group_projections=group_projections,
        )
    )
    report["chunked_loss"] = False
    disable_chunked_loss(model)
    if chunked_loss:
        try:
            enable_chunked_loss(model, chunk_size=loss_chunk_size)
            report["chunked_loss"] = True
        except UnsupportedFormatError as exc:
            logger.warning("chunked loss not used: %s", exc)
    disable_fused_kernels(model)
    report.update(rmsnorm=0, swiglu=0)
    if fused_kernels is not False:
        report.update(enable_fused_kernels(model, min_elements="auto" if fused_kernels == "auto" else 0))
    logger.info("training optimisations: %s", report)
    return report
