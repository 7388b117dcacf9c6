"""The Lightning-style module: what to compute (the Trainer decides where and when).

Hooks carry the names Lightning users know: :meth:`LoraModule.training_step`, :meth:`~LoraModule.validation_step`,
:meth:`~LoraModule.configure_optimizers`, :meth:`~LoraModule.on_save_checkpoint`,
:meth:`~LoraModule.on_load_checkpoint`, plus :meth:`~LoraModule.on_train_step_end`. Subclass it to change the loss
or the optimizer; set ``self.trainer.should_stop = True`` from a hook to stop cleanly (a checkpoint is written).

The loss is summed over target tokens and divided by the number of target tokens in the whole optimizer step (all
micro-batches, all processes), so the gradient is the same however the global batch is split.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from ..errors import CheckpointError, ConfigError
from .config import TrainConfig
from .data import IGNORE_INDEX

if TYPE_CHECKING:
    from .trainer import Trainer

logger = logging.getLogger(__name__)

LOSS_NORMALIZER = "loss_normalizer"
"""Batch key the Trainer sets: global target tokens of the step divided by the number of processes."""


class LoraModule:
    """A PEFT LoRA model plus its training recipe.

    Args:
        model: a ``PeftModel`` (or any causal LM whose trainable parameters are the ones to train).
        config: the ``train`` section (optimizer and schedule settings).
    """

    def __init__(self, model: nn.Module, config: TrainConfig):
        self.model = model
        self.config = config
        self.trainer: Trainer | None = None

    # -- steps -------------------------------------------------------------------------------------------------

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits ``[B, T, V]``. No attention mask: ``position_ids`` delimit samples and padding."""
        output = self.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        return output.logits

    def training_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss to backpropagate for one micro-batch (already divided by the step's normaliser).

        The model computes it from ``labels`` (transformers' shifted cross-entropy, summed and divided by
        ``num_items_in_batch``), so a chunked loss installed on the model never materialises full fp32 logits.
        """
        return self._model_loss(batch, batch[LOSS_NORMALIZER])

    @torch.no_grad()
    def validation_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss_sum, num_targets)`` of one batch; the Trainer sums them over the validation set."""
        return self._model_loss(batch, 1), (batch["labels"][:, 1:] != IGNORE_INDEX).sum()

    def _model_loss(self, batch: dict[str, torch.Tensor], normalizer) -> torch.Tensor:
        output = self.model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            labels=batch["labels"],
            num_items_in_batch=normalizer,
            use_cache=False,
        )
        return output.loss.float()

    def on_train_step_end(self, step: int, metrics: dict[str, float]) -> None:
        """Called after every optimizer step with the step's (all-process) metrics."""

    # -- optimizer ---------------------------------------------------------------------------------------------

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of everything that trains, in a stable order (names without a DDP prefix)."""
        return [(n, p) for n, p in self.unwrapped_model.named_parameters() if p.requires_grad]

    def configure_optimizers(
        self, num_training_steps: int, optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW
    ) -> tuple[torch.optim.Optimizer, Any]:
        """AdamW (``optimizer_class``: AdamW or a subclass such as the memory plan's ``HostAdamW``) over the trainable
        parameters (no decay on vectors) and a transformers schedule with warmup. Plain AdamW over CUDA tensors runs
        fused (:func:`fused_adamw_options`)."""
        from transformers import get_scheduler

        params = self.trainable_parameters()
        if not params:
            raise ConfigError(
                "the model has no trainable parameters: was LoRA applied (get_peft_model), and does "
                "lora.target_modules name modules that exist?"
            )
        groups = [
            {"params": [p for _, p in params if p.ndim >= 2], "weight_decay": self.config.weight_decay},
            {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = optimizer_class(
            [g for g in groups if g["params"]],
            lr=self.config.lr,
            betas=tuple(self.config.adam_betas),
            **fused_adamw_options(optimizer_class, [p for _, p in params], self.config.mixed_precision),
        )
        warmup = self.config.warmup_steps or round(self.config.warmup_ratio * num_training_steps)
        scheduler = get_scheduler(
            self.config.scheduler,
            optimizer=optimizer,
            num_warmup_steps=warmup,
            num_training_steps=num_training_steps,
        )
        return optimizer, scheduler

    # -- checkpoints -------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the trainable tensors (``checkpoint["state_dict"]``, CPU copies) to the checkpoint."""
        checkpoint["state_dict"] = {n: p.detach().to("cpu", copy=True) for n, p in self.trainable_parameters()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Copy ``checkpoint["state_dict"]`` into the trainable parameters (names and shapes must match)."""
        saved = checkpoint["state_dict"]
        params = dict(self.trainable_parameters())
        missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        if missing or unexpected:
            raise CheckpointError(
                f"the checkpoint's trainable tensors do not match the model (missing: {missing[:3]}, unexpected: "
                f"{unexpected[:3]}); resume with the same model and lora settings"
            )
        with torch.no_grad():
            for name, param in params.items():
                if saved[name].shape != param.shape:
                    raise CheckpointError(
                        f"checkpoint tensor {name} has shape {tuple(saved[name].shape)}, the model's is "
                        f"{tuple(param.shape)}; resume with the same lora.r and target_modules"
                    )
                param.copy_(saved[name])

    @property
    def unwrapped_model(self) -> nn.Module:
        """The model without DDP / compile wrappers."""
        return extract_model_from_parallel(self.model)


def fused_adamw_options(
    optimizer_class: type[torch.optim.Optimizer], params: list[torch.Tensor], mixed_precision: str = "bf16"
) -> dict[str, bool]:
    """``{"fused": True}`` where torch's fused AdamW applies: plain :class:`torch.optim.AdamW` (not a subclass with
    its own update, such as ``HostAdamW``) over plain CUDA floating-point tensors (not FSDP's DTensors), and not under
    fp16's loss scaling (the scaler always calls a fused step, which skips an overflowed update on the device, so
    accelerate would count the step as taken and advance the learning-rate schedule). One kernel
    updates every adapter tensor and the step counters stay on the device: the default ``foreach`` update reads each
    tensor's step count on the host and launches several kernels per group of tensors, a few ms of host time per
    step at 448 adapter tensors (8B, r 16 on seven projections) during which the GPU, drained by the step's loss and
    gradient-norm read, waits."""
    plain = [type(p) in (torch.Tensor, nn.Parameter) for p in params]
    if optimizer_class is torch.optim.AdamW and mixed_precision != "fp16" and params and all(plain):
        if all(p.is_cuda and p.is_floating_point() for p in params):
            return {"fused": True}
    return {}
