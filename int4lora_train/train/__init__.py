"""Training: the YAML config, data, the Lightning-style module and the Trainer on accelerate, and the main job.

- :mod:`~int4lora_train.train.config`: :func:`load_config` (the one parser), :class:`RunConfig` and its sections.
- :mod:`~int4lora_train.train.data`: local files -> tokenized, loss-masked, optionally packed rows.
- :mod:`~int4lora_train.train.module`: :class:`LoraModule` (``training_step``, ``validation_step``,
  ``configure_optimizers``, checkpoint hooks).
- :mod:`~int4lora_train.train.trainer`: :class:`Trainer` (accelerate: devices, mixed precision, accumulation,
  clipping, eval, atomic checkpoints, exact resume, trackers).
- :mod:`~int4lora_train.train.strategy`: :class:`~int4lora_train.train.strategy.Strategy` (one process),
  ``DDPStrategy``, ``FSDPStrategy``: what differs between them, chosen once by ``select_strategy``;
  :mod:`~int4lora_train.train.distributed` holds FSDP's primitives.
- :mod:`~int4lora_train.train.checkpoint`, :mod:`~int4lora_train.train.metrics`, :mod:`~int4lora_train.train.plot`.
- :mod:`~int4lora_train.train.job`: :func:`run_training`, the main job from a config to a run directory.
"""

from int4lora_train.train.config import RunConfig, config_reference, load_config, save_config
from int4lora_train.train.data import Datasets, Sample, collate, load_datasets, pack_samples
from int4lora_train.train.job import run_training
from int4lora_train.train.metrics import FitResult, RunSummary
from int4lora_train.train.module import LoraModule
from int4lora_train.train.trainer import BatchPlan, Trainer

__all__ = [
    "BatchPlan",
    "Datasets",
    "FitResult",
    "LoraModule",
    "RunConfig",
    "RunSummary",
    "Sample",
    "Trainer",
    "collate",
    "config_reference",
    "load_config",
    "load_datasets",
    "pack_samples",
    "run_training",
    "save_config",
]
