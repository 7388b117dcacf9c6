"""How a run is spread over processes, Lightning-style: one :class:`Strategy` object, chosen once per run.

::

    train.strategy, processes          strategy        what it changes
    either, one                        Strategy        nothing: accelerate's prepare, whole tensors everywhere
    ddp, several                       DDPStrategy     + the processes must end with the same LoRA tensors (checked)
    fsdp, several                      FSDPStrategy    INT4 weights, LoRA and optimizer state sharded over them
                                                       (the primitives: :mod:`int4lora_train.train.distributed`)

The Trainer and the main job ask the strategy, never the config, for what differs between them: the accelerator
(:func:`select_strategy`), where the model is loaded (:attr:`~Strategy.load_device`), preparing the model and the
optimizer (:meth:`~Strategy.prepare`), the checkpoint's LoRA tensors and optimizer state (whole, or one optimizer
shard per process), what a resumed checkpoint must match, how many validation forwards each process runs, whether
the processes' LoRA tensors must agree, and the adapter handed to the exporter. FSDP's pieces stay the functions of
:mod:`~int4lora_train.train.distributed`; :class:`FSDPStrategy` calls them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn

from ..errors import ConfigError
from . import distributed
from .config import DdpConfig, FsdpConfig

if TYPE_CHECKING:
    from .module import LoraModule

logger = logging.getLogger(__name__)

FSDP_SIDE_STREAMS_DEFECT = (
    "train.fsdp.all_gather_stream: separate on CUDA: with torch 2.11, FSDP2's side-stream all-gathers made some runs "
    "read a gathered frozen tensor (the final norm, the embedding) wrong, so that a step's loss and gradients differ "
    "from DDP and one GPU (issue 12; 7 of 9 short runs on 2 H200s). The default, compute, is exact."
)
"""Logged by :meth:`FSDPStrategy.prepare` on CUDA when the side streams are asked for (BENCHMARKS.md, multi-GPU)."""


class Strategy:
    """A single process: the model and optimizer prepared by accelerate, every tensor whole.

    The base of the others; each method is what one process needs, and what a strategy changes it overrides.
    """

    name = "ddp"
    """What a checkpoint records as its ``strategy``: ``ddp`` for whole tensors (one process or DDP, which resume
    each other), ``fsdp`` for sharded ones."""

    per_process_keys: tuple[str, ...] = ()
    """Checkpoint keys written one file per process (:func:`~int4lora_train.train.checkpoint.save_checkpoint`)."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator

    @property
    def load_device(self) -> torch.device:
        """Where to load the INT4 model: the process's device."""
        return self.accelerator.device

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        """``(model, optimizer)`` ready to train (accelerate: device placement, DDP wrapper, autocast)."""
        return self.accelerator.prepare(model, optimizer)

    def report(self, model: nn.Module, out_file: Path) -> None:
        """Say what each process holds of the model (only sharded runs have something to say, into ``out_file``)."""

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer state this process writes into a checkpoint."""
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, saved: Mapping[str, Any], source: str) -> None:
        """Load what :meth:`optimizer_state` wrote (``source``: the checkpoint, for error messages)."""
        optimizer.load_state_dict(saved)

    def on_save_checkpoint(self, checkpoint: dict[str, Any], module: LoraModule) -> None:
        """After the module's hook: make ``checkpoint["state_dict"]`` hold whole LoRA tensors (they are already)."""

    def on_load_checkpoint(self, checkpoint: dict[str, Any], module: LoraModule) -> None:
        """Before the module's hook: lay the checkpoint's whole LoRA tensors out as the parameters are (they are)."""

    def resume_requirements(self, world_size: int) -> dict[str, Any]:
        """Checkpoint ``trainer_state`` values a resumed run must match besides the data plan's (none: whole tensors
        resume with any number of processes)."""
        return {}

    # -- evaluation and the end of a run ---------------------------------------------------------------------------

    def eval_batch_count(self, local_rows: int, num_rows: int, batch_size: int) -> int:
        """Validation forwards this process runs over its ``local_rows`` of the ``num_rows``."""
        return math.ceil(local_rows / batch_size)

    def ranks_in_sync(self, module: LoraModule) -> bool | None:
        """Whether every process holds the same trainable tensors; None when there is nothing to compare."""
        return None

    def adapter_for_export(self, peft_model: nn.Module, gather_dir: Path) -> nn.Module | Path:
        """What the exporter receives: the trained PEFT model itself."""
        return peft_model


class DDPStrategy(Strategy):
    """Several processes, each holding the whole model: DDP averages the gradients, so the LoRA tensors stay equal."""

    def ranks_in_sync(self, module: LoraModule) -> bool:
        """Whether every process holds bit-identical trainable tensors (DDP keeps them so)."""
        digest = hashlib.sha256()
        for name, param in module.trainable_parameters():
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
        mine = torch.tensor([int.from_bytes(digest.digest()[:7], "little")], device=self.accelerator.device)
        gathered = self.accelerator.gather(mine)
        return bool((gathered == gathered[0]).all())


class FSDPStrategy(Strategy):
    """FSDP2: each process holds ``1/N`` of the INT4 weights, of the LoRA tensors and of the optimizer state.

    Loaded on the CPU (the sharding moves each process's part to its device); checkpoints hold the whole LoRA tensors
    (gathered) and one optimizer shard per process, so a resume needs as many processes; every forward is a
    collective; the exported adapter is gathered from the shards.
    """

    name = "fsdp"
    per_process_keys = ("optimizer",)

    def __init__(self, accelerator: Accelerator, all_gather_stream: str = "compute"):
        super().__init__(accelerator)
        self.all_gather_stream = all_gather_stream

    @property
    def load_device(self) -> torch.device:
        return torch.device("cpu")  # no process ever holds the whole model on its GPU

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        if self.accelerator.device.type == "cuda" and self.all_gather_stream == "separate":
            logger.warning(FSDP_SIDE_STREAMS_DEFECT)
        return distributed.prepare_fsdp(
            self.accelerator, model, optimizer, all_gathers_on_compute_stream=self.all_gather_stream == "compute"
        )

    def report(self, model: nn.Module, out_file: Path) -> None:
        """Log what each process holds of the INT4 weights and LoRA; the main process writes it to ``out_file``."""
        from accelerate.utils import gather_object

        acc = self.accelerator
        reports = gather_object([distributed.sharding_report(model, acc.process_index)])
        for report in reports:
            logger.info(
                "FSDP process %d holds %s of %s INT4 bytes and %s of %s LoRA parameters",
                report["rank"],
                f"{report['int4_local_bytes']:,}",
                f"{report['int4_bytes']:,}",
                f"{report['trainable_local_numel']:,}",
                f"{report['trainable_numel']:,}",
            )
        if acc.is_main_process:
            out_file.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps({"strategy": "fsdp", "world_size": acc.num_processes, "processes": reports}, indent=2)
            out_file.write_text(text, encoding="utf-8")

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        acc = self.accelerator
        return distributed.local_optimizer_state(optimizer, acc.process_index, acc.num_processes)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, saved: Mapping[str, Any], source: str) -> None:
        acc = self.accelerator
        distributed.load_local_optimizer_state(optimizer, saved, acc.process_index, acc.num_processes, source=source)

    def on_save_checkpoint(self, checkpoint: dict[str, Any], module: LoraModule) -> None:
        # The module's hook copied shards; a checkpoint holds whole LoRA tensors (gathered on every process).
        checkpoint["state_dict"] = distributed.full_trainable_state(module.trainable_parameters())

    def on_load_checkpoint(self, checkpoint: dict[str, Any], module: LoraModule) -> None:
        checkpoint["state_dict"] = distributed.shard_like(checkpoint["state_dict"], dict(module.trainable_parameters()))

    def resume_requirements(self, world_size: int) -> dict[str, Any]:
        return {"world_size": world_size}  # the optimizer state is sharded over the processes

    def eval_batch_count(self, local_rows: int, num_rows: int, batch_size: int) -> int:
        # Every FSDP forward is a collective: all processes run as many.
        return distributed.eval_batch_count(num_rows, batch_size, self.accelerator.num_processes)

    def adapter_for_export(self, peft_model: nn.Module, gather_dir: Path) -> Path:
        """The PEFT adapter directory gathered from the shards (a collective: every process gathers, the main one
        writes ``gather_dir``)."""
        acc = self.accelerator
        return distributed.save_gathered_adapter(
            peft_model, gather_dir, is_main=acc.is_main_process, barrier=acc.wait_for_everyone
        )


def select_strategy(
    strategy: str,
    *,
    cpu: bool,
    mixed_precision: str = "no",
    trackers: Sequence[Any] = (),
    fsdp: FsdpConfig | None = None,
    ddp_options: dict[str, Any] | None = None,
) -> Strategy:
    """The strategy of this run, with its accelerator: from ``train.strategy`` and the process count.

    ``cpu``: :func:`use_cpu` of ``model.device``. Raises ``ConfigError`` for an ``accelerate launch`` FSDP config
    with ``train.strategy: ddp`` (:func:`~int4lora_train.train.distributed.fsdp_requested`). ``ddp_options``: more
    ``DistributedDataParallelKwargs`` for DDP (e.g. ``static_graph``).
    """
    if distributed.fsdp_requested(strategy, PartialState(cpu=cpu).num_processes):
        fsdp = fsdp or FsdpConfig()
        plugin = distributed.fsdp_plugin(fsdp.reshard_after_forward, fsdp.wrap_classes)
        accelerator = make_accelerator(cpu, mixed_precision, trackers, plugin)
        if distributed.activate_fsdp(accelerator, plugin):
            return FSDPStrategy(accelerator, fsdp.all_gather_stream)
        # an FSDP launch of one process: nothing to shard, trained as one process
    else:
        accelerator = make_accelerator(cpu, mixed_precision, trackers, ddp_options=ddp_options)
    return DDPStrategy(accelerator) if accelerator.num_processes > 1 else Strategy(accelerator)


def ddp_options(config: DdpConfig, accumulation_steps: int) -> dict[str, Any]:
    """The ``DistributedDataParallelKwargs`` of ``train.ddp`` (see :class:`~int4lora_train.train.config.DdpConfig`)."""
    options: dict[str, Any] = {}
    if config.static_graph == "on" or (config.static_graph == "auto" and accumulation_steps == 1):
        if accumulation_steps > 1:
            raise ConfigError(
                "train.ddp.static_graph: on with gradient_accumulation_steps > 1 loses gradients in torch's DDP "
                "(pytorch#187732); use auto or off"
            )
        options.update(static_graph=True, gradient_as_bucket_view=True)
    if config.comm_hook != "none":
        from accelerate.utils import DDPCommunicationHookType

        options["comm_hook"] = DDPCommunicationHookType(config.comm_hook)
    return options


def make_accelerator(
    cpu: bool,
    mixed_precision: str,
    trackers: Sequence[Any] = (),
    fsdp_plugin=None,
    ddp_options: dict[str, Any] | None = None,
) -> Accelerator:
    """accelerate's ``Accelerator`` as every strategy uses it (FSDP: with ``fsdp_plugin``; DDP: ``ddp_options``)."""

    def make() -> Accelerator:
        return Accelerator(
            cpu=cpu,
            mixed_precision=mixed_precision,
            log_with=list(trackers),
            # The frozen INT4 buffers never change: broadcasting them every forward would copy the whole model.
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False, **(ddp_options or {}))],
            fsdp_plugin=fsdp_plugin,
        )

    try:
        return make()
    except ValueError as exc:
        # accelerate keeps one process-wide state; a second Trainer with another precision (a notebook, a test)
        # may replace it when this process trains alone. Under a launcher it must match the other processes.
        if "already been initialized" not in str(exc) or PartialState().num_processes > 1:
            raise ConfigError(f"cannot set up accelerate for this run: {exc}") from exc
        AcceleratorState._reset_state(reset_partial_state=False)
        return make()


def use_cpu(device: str) -> bool:
    """Whether ``model.device`` means the CPU: ``cpu``, or ``auto`` without CUDA.

    accelerate needs ``cpu=True`` to form a gloo process group on CPUs; without it, processes launched together
    would each train alone. Anything that touches accelerate's state before the Trainer must pass the same flag.
    """
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())
