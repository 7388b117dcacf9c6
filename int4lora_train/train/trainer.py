"""The Trainer: runs a :class:`~int4lora_train.train.module.LoraModule` on accelerate.

One optimizer step consumes a *global batch* of ``micro_batch_size x gradient_accumulation_steps x processes``
rows. Which rows is a pure function of ``(seed, step)`` (:class:`BatchPlan`): each epoch is a seeded permutation
and step ``s`` takes the ``s``-th slice of it, each process its own micro-batches. So a run resumed from a
checkpoint only needs the step counter to see the same data, and a 2-process run sees the same global batches as a
1-process run with twice the micro-batch.

Per step: every micro-batch's loss is divided by the step's target-token count (all processes), gradients sync
only on the last micro-batch (``no_sync`` before), then clip, AdamW, scheduler. A non-finite loss stops the run
with :class:`~int4lora_train.errors.TrainingError` before the optimizer touches the weights.

What differs between one process, DDP and FSDP (``train.strategy: fsdp`` shards the INT4 weights, LoRA and
optimizer state over the processes instead of replicating them) is the :class:`~int4lora_train.train.strategy.Strategy`
object's; the step is the same, and so is the data plan.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch.profiler import record_function

from ..errors import CheckpointError, ConfigError, TrainingError, TrainingInterrupted
from ..memory import MemoryPlan, optimizer_class
from ..modeling.lora_layer import reuse_adapter_weights
from ..speed import varlen_attention
from . import checkpoint as ckpt
from .config import TrainConfig
from .data import Sample, collate, fingerprint, num_targets
from .metrics import TRACKER_DIRS, FitResult, JsonlTracker, experiment_trackers, perplexity, tracker_installed
from .module import LOSS_NORMALIZER, LoraModule
from .strategy import Strategy, ddp_options, select_strategy, use_cpu

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = TRACKER_DIRS["tensorboard"]
CHECKPOINTS_DIR = "checkpoints"
SHARDING_FILE = "sharding.json"


@dataclass(frozen=True)
class BatchPlan:
    """Which training rows each process uses at each step: a pure function of ``(seed, step)``."""

    num_rows: int
    micro_batch_size: int
    accumulation_steps: int
    world_size: int
    seed: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.accumulation_steps * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.global_batch_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The permutation of all rows used in ``epoch`` (int64 ``[num_rows]``)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_rows, generator=generator)

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Row indices of ``rank``'s micro-batches at ``step`` (0-based), one list per accumulation step."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        rows = self.epoch_order(epoch)[offset * self.global_batch_size : (offset + 1) * self.global_batch_size]
        size = self.micro_batch_size
        chunks = [k * self.world_size + rank for k in range(self.accumulation_steps)]
        return [rows[c * size : (c + 1) * size].tolist() for c in chunks]


@dataclass
class TrainState:
    """Counters a checkpoint restores (all JSON-exact)."""

    step: int = 0
    tokens: int = 0
    window_loss: float = 0.0
    window_steps: int = 0
    train_loss_first: float | None = None
    train_loss_last: float | None = None
    val_loss_initial: float | None = None
    val_loss: float | None = None
    best_val_loss: float | None = None  # train.keep_best: the lowest validation loss with a checkpoint, and its step
    best_step: int | None = None


@dataclass(frozen=True)
class _StepData:
    """One step's micro-batches on the device and what the step needs from their host copies."""

    step: int
    batches: list[dict[str, torch.Tensor]]
    segments: list[varlen_attention.Segments | None]  # per micro-batch, when the attention is varlen
    normalizer: torch.Tensor  # the loss divisor: global targets / processes
    global_tokens: torch.Tensor | int  # several processes: their all-reduced sum, read with the step's loss


def _read_scalars(*values: torch.Tensor | float) -> list[float]:
    """The values (one-element tensors, a DTensor's full value, or numbers) as floats; the tensors in one
    device-to-host copy (float64, so token counts stay exact; float32 on MPS, which has no float64)."""
    values = [v.full_tensor() if hasattr(v, "full_tensor") else v for v in values]
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if tensors:
        device = tensors[0].device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        read = iter(torch.stack([t.to(device, dtype).reshape(()) for t in tensors]).tolist())
    return [next(read) if isinstance(v, torch.Tensor) else float(v) for v in values]


@dataclass
class _Throughput:
    """Tokens and seconds of training steps (evaluation and checkpoints excluded)."""

    tokens: int = 0
    seconds: float = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds

    def reset(self) -> None:
        self.tokens, self.seconds = 0, 0.0

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class Trainer:
    """Fits a :class:`LoraModule` with the ``train`` settings; owns the strategy (and its accelerator), trackers and
    checkpoints.

    Creating the Trainer seeds every RNG with ``config.seed``: build the model (LoRA init) after it.

    Args:
        config: the ``train`` section.
        run_dir: where ``metrics.jsonl``, ``tb/`` and ``checkpoints/`` go.
        device: ``auto`` (accelerate's choice: the process's GPU, else CPU) or ``cpu`` / ``cuda``.
        tensorboard: also log to ``<run_dir>/tb`` (skipped with a warning if tensorboard is not installed) when
            ``config.report_to`` is null; an explicit ``report_to`` names every tracker (a missing package is a
            ``ConfigError``).
        progress_bar: show a tqdm bar on the main process.
    """

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | Path,
        *,
        device: str = "auto",
        tensorboard: bool = True,
        progress_bar: bool = True,
    ):
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress_bar = progress_bar
        self.should_stop = False
        self._updating = False
        self.memory_plan: MemoryPlan | None = None  # chosen by prepare_model (_apply_memory_options)
        self._clip_parameters: list[torch.Tensor] | None = None  # set by prepare_model; None: listed each step
        self._reuse_adapters = False  # set by prepare_model
        self._pad_to: int | None = None  # set by prepare_model: every training batch padded to this many tokens
        self._varlen = False  # set by prepare_model: the model's attention is varlen_attention's
        self._prefetched: _StepData | None = None  # the next step's batches, made while the GPU runs the backward
        self.metrics_tracker = JsonlTracker(self.run_dir / METRICS_FILE)
        report_to = config.report_to
        if report_to is None:  # the default: TensorBoard where it is installed
            report_to = ["tensorboard"] if tensorboard else []
            if tensorboard and not tracker_installed("tensorboard"):
                logger.warning("tensorboard is not installed; logging to %s only", METRICS_FILE)
                report_to = []
        self.report_to = list(report_to)
        trackers: list[Any] = [self.metrics_tracker, *experiment_trackers(report_to, self.run_dir)]
        self.tensorboard_dir: Path | None = self.run_dir / TENSORBOARD_DIR if "tensorboard" in self.report_to else None
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("model.device is cuda but torch sees no CUDA device; use auto or cpu")
        if config.mixed_precision == "fp16" and (device == "cpu" or not torch.cuda.is_available()):
            raise ConfigError("train.mixed_precision fp16 needs a CUDA device; use bf16 or no on the CPU")
        self.strategy: Strategy = select_strategy(
            config.strategy,
            cpu=use_cpu(device),
            mixed_precision=config.mixed_precision,
            trackers=trackers,
            fsdp=config.fsdp,
            ddp_options=ddp_options(config.ddp, config.gradient_accumulation_steps),
        )
        self.accelerator = self.strategy.accelerator
        set_seed(config.seed)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / CHECKPOINTS_DIR

    def plan_for(self, num_rows: int) -> BatchPlan:
        cfg = self.config
        plan = BatchPlan(
            num_rows, cfg.micro_batch_size, cfg.gradient_accumulation_steps, self.accelerator.num_processes, cfg.seed
        )
        if plan.steps_per_epoch == 0:
            raise ConfigError(
                f"the training set has {num_rows} rows but one optimizer step needs {plan.global_batch_size} "
                f"(train.micro_batch_size {cfg.micro_batch_size} x train.gradient_accumulation_steps "
                f"{cfg.gradient_accumulation_steps} x {plan.world_size} processes); lower them or add data"
            )
        return plan

    def max_steps_for(self, plan: BatchPlan) -> int:
        if self.config.max_steps is not None:
            return self.config.max_steps
        return max(1, math.ceil((self.config.epochs or 1.0) * plan.steps_per_epoch))

    # -- fit ---------------------------------------------------------------------------------------------------

    def fit(
        self,
        module: LoraModule,
        train_data: Sequence[Sample],
        val_data: Sequence[Sample] = (),
        *,
        resume_from: str | Path | None = None,
        pad_token_id: int = 0,
        tokenizer: Any = None,
    ) -> FitResult:
        """Train ``module`` until ``max_steps`` (or ``should_stop``); resume from a checkpoint directory if given.

        Ctrl-C (``KeyboardInterrupt``) raises :class:`~int4lora_train.errors.TrainingInterrupted` naming the newest
        checkpoint; one process alone first writes a checkpoint of the last whole step (a half step is dropped), so
        resuming from it continues exactly as if never interrupted. ``tokenizer`` is needed for
        ``train.eval_prompts`` (greedy samples at each evaluation).
        """
        acc, cfg = self.accelerator, self.config
        module.trainer = self
        self.should_stop = False
        self.pad_token_id = pad_token_id
        self.tokenizer = tokenizer
        if cfg.eval_prompts and tokenizer is None:
            logger.warning("train.eval_prompts is set but Trainer.fit got no tokenizer; no samples are generated")
        plan = self.plan_for(len(train_data))
        max_steps = self.max_steps_for(plan)
        data_id = fingerprint(train_data)
        self._explain_data_use(plan, max_steps, has_validation=bool(val_data))
        optimizer, scheduler = self.prepare_model(module, train_data, max_steps)

        state = TrainState()
        if resume_from is not None:
            state = self._restore(module, optimizer, scheduler, Path(resume_from), plan, max_steps, data_id)
        self.metrics_tracker.resume_step = state.step if resume_from is not None else None
        acc.init_trackers("int4lora-train")
        logger.info(
            "training %d steps (%d rows, global batch %d = %d x %d x %d processes, %.2f epochs) on %s",
            max_steps,
            plan.num_rows,
            plan.global_batch_size,
            plan.micro_batch_size,
            plan.accumulation_steps,
            plan.world_size,
            max_steps / plan.steps_per_epoch,
            acc.device,
        )

        last_checkpoint = str(resume_from) if resume_from is not None else None
        saved_step = state.step if resume_from is not None else None
        session, window = _Throughput(), _Throughput()  # whole session; since the last log line
        bar = self._progress(max_steps, state.step)
        step_rng = None
        try:
            if cfg.eval_at_start and state.step == 0:
                if val_data:
                    state.val_loss_initial = self._evaluate_and_log(module, val_data, 0)
                self._generate_and_log(module, 0)
            while state.step < max_steps and not self.should_stop:
                if plan.world_size == 1:  # what a checkpoint written mid-step (Ctrl-C) must hold to resume exactly
                    step_rng = ckpt.capture_rng_state()
                started = time.perf_counter()
                loss, grad_norm, lr, tokens = self._train_step(
                    module, optimizer, scheduler, plan, train_data, state.step, last_checkpoint,
                    prefetch=state.step + 1 < max_steps,
                )  # fmt: skip
                elapsed = time.perf_counter() - started
                session.add(tokens, elapsed)
                window.add(tokens, elapsed)
                state.step += 1
                state.tokens += tokens
                state.window_loss += loss
                state.window_steps += 1
                self._updating, step_rng = False, None  # weights, optimizer and counters agree again
                if state.train_loss_first is None:
                    state.train_loss_first = loss
                metrics = {
                    "train/loss": loss,
                    "train/lr": lr,
                    "train/grad_norm": grad_norm,
                    "train/tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
                    "train/epoch": state.step / plan.steps_per_epoch,
                    "train/tokens": state.tokens,
                }
                final = state.step == max_steps
                if state.step % cfg.log_every == 0 or final:
                    self._log_window(state, metrics, window, max_steps)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{session.rate:.0f}", refresh=False)
                bar.update(1)
                module.on_train_step_end(state.step, metrics)
                new_best = False
                evaluating = final or (cfg.eval_every and state.step % cfg.eval_every == 0)
                if val_data and evaluating:
                    state.val_loss = self._evaluate_and_log(module, val_data, state.step)
                    new_best = cfg.keep_best and _improves(state.val_loss, state.best_val_loss)
                    if new_best:  # saved below, so the best is always a checkpoint
                        state.best_val_loss, state.best_step = state.val_loss, state.step
                if evaluating:
                    self._generate_and_log(module, state.step)
                save_now = final or self.should_stop or (cfg.save_every and state.step % cfg.save_every == 0)
                if save_now or new_best:
                    last_checkpoint = str(self._save(module, optimizer, scheduler, state, plan, max_steps, data_id))
                    saved_step = state.step
        except KeyboardInterrupt:
            if self._updating or plan.world_size > 1 or state.step == 0 or saved_step == state.step:
                # Mid-update the weights and counters disagree; several processes would each have to join the
                # save's collectives wherever Ctrl-C caught them. The newest checkpoint is what there is.
                logger.warning("interrupted at step %d; not writing a checkpoint now", state.step)
            else:
                optimizer.zero_grad(set_to_none=True)  # a half-accumulated step is dropped, and redone on resume
                if step_rng is not None:
                    ckpt.restore_rng_state(step_rng)  # as the step left it, not as the half step left it
                last_checkpoint = str(self._save(module, optimizer, scheduler, state, plan, max_steps, data_id))
            raise TrainingInterrupted(state.step, max_steps, last_checkpoint) from None
        finally:
            self._updating = False
            self._prefetched = None  # batches of this fit's plan: never handed to another fit
            bar.close()
            for tracker in acc.trackers:
                tracker.finish()
            acc.trackers = []
        module.model = acc.unwrap_model(module.model, keep_fp32_wrapper=False)  # plain forward again
        return FitResult(
            completed=state.step >= max_steps,
            steps=state.step,
            max_steps=max_steps,
            world_size=plan.world_size,
            elapsed_s=session.seconds,
            tokens=state.tokens,  # the whole run: the checkpoint carries the count over a resume
            tokens_per_s=session.rate,
            train_loss_first=state.train_loss_first,
            train_loss_final=state.train_loss_last,
            val_loss_initial=state.val_loss_initial,
            val_loss=state.val_loss,
            val_ppl=perplexity(state.val_loss) if state.val_loss is not None else None,
            resumed_from=str(resume_from) if resume_from is not None else None,
            last_checkpoint=last_checkpoint,
            ranks_in_sync=self.strategy.ranks_in_sync(module),
            best_checkpoint=None if state.best_step is None else str(self.checkpoint_root / f"step-{state.best_step}"),
            best_step=state.best_step,
            best_val_loss=state.best_val_loss,
            memory={"summary": self.memory_plan.summary(), **self.memory_plan.to_dict()},
            cuda_graphs=self._graph_stats(module),
        )

    def _graph_stats(self, module: LoraModule) -> dict[str, Any] | None:
        """What the layer graphs did (``summary.json``'s ``cuda_graphs``), or None when they are off."""
        from ..speed.layer_graphs import layer_graphs

        graphs = layer_graphs(module.unwrapped_model)
        return None if graphs is None else {**graphs.stats, "padded_to": self._pad_to}

    def prepare_model(
        self, module: LoraModule, train_data: Sequence[Sample], max_steps: int
    ) -> tuple[torch.optim.Optimizer, Any]:
        """Everything :meth:`fit` does to the model before its first step; returns ``(optimizer, scheduler)``.

        Gradient checkpointing, ``train.speed`` and ``train.memory`` (:attr:`memory_plan`), the optimizer the plan
        asks for, the strategy's wrapping (DDP / FSDP), and every module in training mode. Benchmarks that time
        :meth:`_train_step` alone (``benchmarks/op_count.py``) prepare the model through this too.
        """
        cfg = self.config
        if cfg.gradient_checkpointing:
            from ..modeling.peft_integration import prepare_for_training

            reentrant = cfg.gradient_checkpointing_reentrant
            prepare_for_training(module.unwrapped_model, gradient_checkpointing=True, use_reentrant=reentrant)
        self._apply_speed_options(module, train_data)
        self.memory_plan = self._apply_memory_options(module, train_data)
        # Last: it replaces the checkpoint function that the memory plan may have wrapped.
        self._apply_layer_graphs(module, train_data)
        optimizer, scheduler = module.configure_optimizers(max_steps, optimizer_class(self.memory_plan))
        module.model, optimizer = self.strategy.prepare(module.model, optimizer)
        self.strategy.report(module.unwrapped_model, self.run_dir / SHARDING_FILE)
        # The trainable tensors stay the same objects from here on (resuming copies into them), except under FSDP,
        # whose modules hold sharded or gathered tensors by turns: listed once instead of a walk of every module
        # each step (~3.5 ms of host time at 32 layers).
        self._clip_parameters = None if self.strategy.name == "fsdp" else [p for _, p in module.trainable_parameters()]
        # Each step's adapter casts are made once and reused by its recompute and backward; not under FSDP (its
        # adapters are gathered anew for every forward), nor when the memory plan saves device memory (the copies,
        # about 8 MB per 70B-shaped layer at r 16, would be held through the step).
        self._reuse_adapters = self.strategy.name != "fsdp" and not self.memory_plan.saves_device_memory
        module.model.train()  # every module: a loaded model is in eval mode under a PEFT wrapper in training mode
        return optimizer, scheduler

    def _log_window(self, state: TrainState, metrics: dict, window: _Throughput, max_steps: int) -> None:
        """Log the mean loss and the throughput since the last log line, then start a new window."""
        logged = {**metrics, "train/loss": state.window_loss / state.window_steps, "train/tokens_per_s": window.rate}
        state.train_loss_last = logged["train/loss"]
        state.window_loss, state.window_steps = 0.0, 0
        window.reset()
        self.accelerator.log(logged, step=state.step)
        logger.info(
            "step %d/%d  loss %.4f  lr %.3g  %.0f tokens/s",
            state.step,
            max_steps,
            logged["train/loss"],
            logged["train/lr"],
            logged["train/tokens_per_s"],
        )

    def _train_step(self, module, optimizer, scheduler, plan, train_data, step, last_checkpoint, *, prefetch=False):
        """One optimizer step; returns ``(loss, grad_norm, lr, tokens)`` agreed by all processes.

        The host reads the device once per step (the loss, the gradient norm and, with several processes, the token
        count together); before that, with ``prefetch``, it makes the next step's batches (:meth:`_step_data`, which
        waits for nothing on the device), so that after the read only the optimizer's launch stands between the GPU
        and the next forward.
        """
        acc = self.accelerator
        data = self._prefetched if self._prefetched is not None and self._prefetched.step == step else None
        self._prefetched = None
        if data is None:
            data = self._step_data(plan, train_data, step)
        if not module.model.training:  # mode changes go through the whole model (evaluate, generate restore it); a
            module.model.train()  # walk of every module each step costs ~4 ms of host time at 32 layers
        step_loss = torch.zeros((), device=acc.device)
        # The adapters do not change until the optimizer step: cast them once for all passes (prepare_model decides).
        with reuse_adapter_weights() if self._reuse_adapters else contextlib.nullcontext():
            for k, (batch, segments) in enumerate(zip(data.batches, data.segments)):
                batch[LOSS_NORMALIZER] = data.normalizer
                if segments is not None:  # the segments from the host copy: the forward need not read them back
                    varlen_attention.preset_segments(batch["position_ids"], segments)
                sync = k == len(data.batches) - 1
                with contextlib.nullcontext() if sync else acc.no_sync(module.model):
                    with record_function("int4lora/forward"):
                        loss = module.training_step(batch)
                    with record_function("int4lora/backward"):
                        acc.backward(loss)
                step_loss += loss.detach().float()
        if prefetch:  # while the GPU still runs the backward
            self._prefetched = self._step_data(plan, train_data, step + 1)
        max_norm = self.config.max_grad_norm or math.inf  # inf: measure the norm, scale by exactly 1.0
        with record_function("int4lora/clip"):
            params = self._clip_parameters or [p for _, p in module.trainable_parameters()]
            grad_norm = acc.clip_grad_norm_(params, max_norm)
        with record_function("int4lora/loss-sync"):
            mean_loss = acc.reduce(step_loss, reduction="sum") / plan.world_size
            loss_value, grad_norm, tokens = _read_scalars(mean_loss, grad_norm, data.global_tokens)
        lr = scheduler.get_last_lr()[0]
        if not math.isfinite(loss_value):
            self._abandon_step(optimizer)
            raise self._diverged(step + 1, f"the training loss is {loss_value}", last_checkpoint)
        if not math.isfinite(grad_norm) and self.config.mixed_precision != "fp16":
            self._abandon_step(optimizer)
            raise self._diverged(step + 1, f"the gradient norm is {grad_norm}", last_checkpoint)
        self._updating = True  # until fit counts the step: no checkpoint can be written from here (Ctrl-C)
        with record_function("int4lora/optimizer"):
            optimizer.step()
            if not acc.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped this step
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm, lr, int(tokens)

    def _abandon_step(self, optimizer) -> None:
        """Drop the step's gradients before a divergence stop; under fp16 also close the loss scaler's step (the clip
        unscaled the gradients), so that a later fit on this trainer can unscale again."""
        optimizer.zero_grad(set_to_none=True)
        if self.accelerator.scaler is not None:
            self.accelerator.scaler.update()

    def _step_data(self, plan, train_data, step: int) -> _StepData:
        """Step ``step``'s micro-batches of this process, moved to the device, with what the step needs from the host
        copies: the global target and token counts (for the loss normaliser and the throughput) and the varlen
        segments."""
        acc = self.accelerator
        with record_function("int4lora/data"):
            # Counted on the host before the batches move: one process needs no device round trip for them.
            rows = [[train_data[i] for i in r] for r in plan.micro_batches(step, acc.process_index)]
            cpu_batches = [collate(r, self.pad_token_id, self._pad_to) for r in rows]
            counts = [sum(num_targets(b) for b in cpu_batches), sum(len(s) for r in rows for s in r)]
            # Nothing here waits for the device (it runs while the GPU works through the backward): host-to-device
            # copies are asynchronous, and a tensor made from a host number would be a copy that waits.
            # DDP averages gradients over processes, so each process divides by (global targets / processes).
            if plan.world_size > 1:
                local = torch.tensor(counts, dtype=torch.float64).to(acc.device, non_blocking=True)
                total = acc.reduce(local, reduction="sum")
                normalizer, global_tokens = (total[0] / plan.world_size).float(), total[1]
            else:
                normalizer = torch.full((), float(counts[0]), dtype=torch.float32, device=acc.device)
                global_tokens = counts[1]
            batches = [{k: v.to(self.device, non_blocking=True) for k, v in b.items()} for b in cpu_batches]
            segments = [
                varlen_attention.compute_segments(b["position_ids"], device=self.device) if self._varlen else None
                for b in cpu_batches
            ]
        return _StepData(step, batches, segments, normalizer, global_tokens)

    def _batch(self, rows: Sequence[Sample]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in collate(rows, self.pad_token_id).items()}

    def _diverged(self, step: int, what: str, last_checkpoint: str | None) -> TrainingError:
        if last_checkpoint:
            where = f"the last good checkpoint is {last_checkpoint}"
        else:
            where = "no checkpoint was written yet (set train.save_every)"
        return TrainingError(
            f"step {step}: {what}; training stopped before the optimizer changed the weights, and {where}. "
            "Lower train.lr, keep train.max_grad_norm set, use bf16 rather than fp16, or check the data."
        )

    # -- evaluation --------------------------------------------------------------------------------------------

    def evaluate(self, module: LoraModule, val_data: Sequence[Sample]) -> float:
        """Mean next-token loss over ``val_data`` (rows split across processes; targets summed over all)."""
        acc = self.accelerator
        prepared, was_training = module.model, module.model.training
        module.model = module.unwrapped_model  # no DDP hooks: processes may run different batch counts
        module.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=acc.device)
        try:
            rows = list(range(acc.process_index, len(val_data), acc.num_processes))
            size = self.config.micro_batch_size
            for k in range(self.strategy.eval_batch_count(len(rows), len(val_data), size)):
                chunk = rows[k * size : (k + 1) * size]
                loss_sum, targets = module.validation_step(self._batch([val_data[i] for i in chunk or [0]]))
                if chunk:  # else a padding forward, dropped
                    totals += torch.stack([loss_sum.double(), targets.double()])
        finally:
            module.model = prepared
            module.model.train(was_training)
        loss_sum, count = acc.reduce(totals, reduction="sum").tolist()
        return loss_sum / count if count else math.nan

    def _evaluate_and_log(self, module: LoraModule, val_data: Sequence[Sample], step: int) -> float:
        loss = self.evaluate(module, val_data)
        self.accelerator.log({"val/loss": loss, "val/ppl": perplexity(loss)}, step=step)
        logger.info("step %d  validation loss %.4f  perplexity %.2f", step, loss, perplexity(loss))
        return loss

    def generate_samples(self, module: LoraModule, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy completions of ``prompts`` by the model as it is now (eval mode, no gradients).

        Every process runs them: FSDP's forward is collective, so its processes also generate in step until all
        are done (``synced_gpus``); greedy decoding gives every process the same text.
        """
        synced = self.strategy.name == "fsdp" and self.accelerator.num_processes > 1
        tokenizer = self.tokenizer
        model = module.unwrapped_model
        was_training = model.training
        model.eval()
        completions = []
        try:
            with torch.no_grad():
                for prompt in prompts:
                    ids = torch.tensor([tokenizer(prompt)["input_ids"]], dtype=torch.long, device=self.device)
                    generated = model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        pad_token_id=self.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id,
                        synced_gpus=synced,
                    )
                    completions.append(tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True))
        finally:
            model.train(was_training)
        return completions

    def _generate_and_log(self, module: LoraModule, step: int) -> None:
        prompts = self.config.eval_prompts
        if not prompts or self.tokenizer is None:
            return
        completions = self.generate_samples(module, prompts, self.config.eval_max_new_tokens)
        values: dict[str, str] = {}
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            values[f"eval/prompt_{i}"], values[f"eval/completion_{i}"] = prompt, completion
            logger.info("step %d  sample %d: %r -> %r", step, i, prompt, completion)
        self.accelerator.log(values, step=step)

    # -- checkpoints -------------------------------------------------------------------------------------------

    def _save(self, module, optimizer, scheduler, state, plan, max_steps, data_id) -> Path:
        acc = self.accelerator
        checkpoint: dict[str, Any] = {
            "optimizer": self.strategy.optimizer_state(optimizer),
            "scheduler": scheduler.state_dict(),
            "trainer_state": {
                **asdict(state),
                "max_steps": max_steps,
                "global_batch_size": plan.global_batch_size,
                "world_size": plan.world_size,
                "seed": plan.seed,
                "num_rows": plan.num_rows,
                "data_fingerprint": data_id,
                "strategy": self.strategy.name,
            },
        }
        if acc.scaler is not None:
            checkpoint["scaler"] = acc.scaler.state_dict()
        module.on_save_checkpoint(checkpoint)
        self.strategy.on_save_checkpoint(checkpoint, module)
        return ckpt.save_checkpoint(
            self.checkpoint_root,
            state.step,
            checkpoint,
            rank=acc.process_index,
            is_main=acc.is_main_process,
            barrier=acc.wait_for_everyone,
            keep_last=self.config.keep_last,
            keep_steps=() if state.best_step is None else (state.best_step,),
            per_process_keys=self.strategy.per_process_keys,
        )

    def _restore(self, module, optimizer, scheduler, path, plan, max_steps, data_id) -> TrainState:
        acc = self.accelerator
        checkpoint = ckpt.load_checkpoint(path, rank=acc.process_index)
        saved = checkpoint["trainer_state"]
        expected = {
            "max_steps": max_steps,
            "global_batch_size": plan.global_batch_size,
            "seed": plan.seed,
            "num_rows": plan.num_rows,
            "data_fingerprint": data_id,
            "strategy": self.strategy.name,
            **self.strategy.resume_requirements(plan.world_size),
        }
        defaults = {"strategy": "ddp"}  # checkpoints written before train.strategy existed
        fixes = {
            "strategy": "resume with the train.strategy (and process count) it was written with",
            "world_size": "an FSDP checkpoint holds the optimizer state sharded: resume with as many processes",
        }
        for key, value in expected.items():
            written = saved.get(key, defaults.get(key))
            if written != value:
                fix = fixes.get(key, "use the run's own config.yaml (and data)")
                raise CheckpointError(
                    f"cannot resume exactly from {path}: it was written with {key}={written!r}, this run has "
                    f"{value!r}; {fix}, or start a new run"
                )
        self.strategy.on_load_checkpoint(checkpoint, module)
        module.on_load_checkpoint(checkpoint)
        self.strategy.load_optimizer_state(optimizer, checkpoint["optimizer"], source=str(path))
        scheduler.load_state_dict(checkpoint["scheduler"])
        if acc.scaler is not None and "scaler" in checkpoint:
            acc.scaler.load_state_dict(checkpoint["scaler"])
        if checkpoint["rng"] is not None:
            ckpt.restore_rng_state(checkpoint["rng"])
        else:
            logger.warning(
                "%s has no RNG state for process %d (different process count): dropout will differ",
                path,
                acc.process_index,
            )
        # Checkpoints written before a counter existed lack it: its default.
        state = TrainState(**{k: saved[k] for k in TrainState.__dataclass_fields__ if k in saved})
        logger.info("resumed from %s at step %d", path, state.step)
        return state

    # -- helpers -----------------------------------------------------------------------------------------------

    def _explain_data_use(self, plan: BatchPlan, max_steps: int, has_validation: bool) -> None:
        """Say what of the data will not be used: rows beyond the last whole global batch, and evaluation that
        was asked for without validation data."""
        left_over = plan.num_rows - plan.steps_per_epoch * plan.global_batch_size
        if left_over and max_steps >= plan.steps_per_epoch:
            logger.info(
                "each epoch trains on %d of the %d rows: the last %d do not fill a global batch of %d and are left "
                "out (different ones each epoch)",
                plan.num_rows - left_over,
                plan.num_rows,
                left_over,
                plan.global_batch_size,
            )
        asked = [f"train.{k}" for k in ("eval_every", "eval_at_start") if getattr(self.config, k)]
        if asked and not has_validation:
            logger.warning(
                "%s is set but there is no validation data, so no validation loss is computed (only "
                "train.eval_prompts samples, if any); set data.validation_file or data.validation_split",
                " and ".join(asked),
            )

    def _progress(self, total: int, initial: int):
        """A tqdm bar on a terminal; into a file or pipe, where a redrawn bar is noise, a plain log line now and
        then (:class:`PlainProgress`)."""
        enabled = self.progress_bar and self.accelerator.is_local_main_process
        if enabled and _is_terminal(sys.stderr):
            from tqdm.auto import tqdm

            return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
        return PlainProgress(total, initial, every_s=PROGRESS_EVERY_S if enabled else math.inf)

    def _apply_speed_options(self, module: LoraModule, train_data: Sequence[Sample] = ()) -> None:
        """Switch the training-step optimisations of ``train.speed`` on (before DDP / FSDP wrapping).

        ``packed_attention: auto`` needs to know whether the batches hold several segments per row (packed rows, or
        padding in batches of several rows) and where and in which dtype the model computes (the autocast dtype of
        ``train.mixed_precision``, else the model's)."""
        from .. import speed as training_speed

        speed = self.config.speed
        packed = self.config.micro_batch_size > 1 or any(_is_packed(row) for row in train_data)
        autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.mixed_precision)
        report = training_speed.apply(  # logs what it switched on
            module.unwrapped_model,
            training_speed.SpeedConfig(  # train.speed's fields are the library's
                **{
                    **asdict(speed),
                    "group_projections": speed.group_projections and speed.fused_lora,
                    "cuda_graphs": "off",  # decided after the memory plan (_apply_layer_graphs)
                }
            ),
            packed=packed,
            device=self.device,
            dtype=autocast,
        )
        self._varlen = report["packed_attention"] == "varlen"
        logger.info(
            "attention over packed rows: %s (train.speed.packed_attention: %s)",
            report["packed_attention"],
            speed.packed_attention,
        )

    def _apply_layer_graphs(self, module: LoraModule, train_data: Sequence[Sample]) -> None:
        """``train.speed.cuda_graphs``: graph the checkpointed decoder layers (after the memory plan, which may
        offload their inputs: then ``auto`` leaves them eager). Single process only: under DDP / FSDP ``auto`` is
        off and ``on`` an error.

        A graph replays one shape, and a batch is as long as its longest row: with graphs on, every training batch
        is padded to the longest row of the data (``_pad_to``; padding is a segment of its own and carries no loss),
        so that one capture serves every step. ``auto`` pads only rows that are on average at least
        :data:`GRAPH_MIN_ROW_FILL` of the longest (packed rows are; short unpacked samples padded to the longest
        would multiply the work): below that it leaves the layers eager."""
        from .. import speed as training_speed
        from ..speed.layer_graphs import layer_graphs

        choice = self.config.speed.cuda_graphs
        if self.accelerator.num_processes > 1:
            if choice == "on":
                raise ConfigError(
                    f"train.speed.cuda_graphs: on runs in a single process, this run has "
                    f"{self.accelerator.num_processes} (strategy {self.strategy.name}); set it to auto or off"
                )
            choice = "off"
        lengths = [len(sample) for sample in train_data]
        longest = max(lengths, default=0)
        fill = sum(lengths) / (len(lengths) * longest) if longest else 1.0
        if choice == "auto" and fill < GRAPH_MIN_ROW_FILL:
            logger.info(
                "CUDA graphs of the decoder layers: off (auto): rows average %.0f%% of the longest (%d tokens), "
                "and graphs need every batch padded to it; pack the data (data.packing: true) or set "
                "train.speed.cuda_graphs: on",
                100 * fill,
                longest,
            )
            choice = "off"
        on = training_speed.apply(module.unwrapped_model, cuda_graphs=choice, device=self.device)["cuda_graphs"]
        graphs = layer_graphs(module.unwrapped_model)
        if on and (graphs.max_tokens is None or self.config.micro_batch_size * longest <= graphs.max_tokens):
            self._pad_to = longest
        logger.info(
            "CUDA graphs of the decoder layers: %s (train.speed.cuda_graphs: %s)%s",
            on,
            self.config.speed.cuda_graphs,
            f"; batches padded to {self._pad_to} tokens per row" if self._pad_to else "",
        )

    def _apply_memory_options(self, module: LoraModule, train_data: Sequence[Sample]):
        """Plan and switch the device-memory features of ``train.memory`` (after the speed options, before DDP /
        FSDP wrapping) for this run's longest row; logs the plan's line and returns the plan."""
        from .. import memory as device_memory

        cfg = self.config
        model = module.unwrapped_model
        config = device_memory.MemoryConfig(**asdict(cfg.memory))  # train.memory's fields are the library's
        keep_dense = cfg.speed.keep_dense_for_backward
        plan = device_memory.plan(
            model,
            cfg.micro_batch_size,
            max((len(sample) for sample in train_data), default=0),
            self.device,
            config,
            strategy=self.strategy.name if self.accelerator.num_processes > 1 else "single",
            world_size=self.accelerator.num_processes,
            keep_dense_for_backward=keep_dense,
        )
        device_memory.apply(model, plan)  # logs the plan's line
        return plan


def _is_packed(row: Sample) -> bool:
    """Whether ``row`` holds several samples (its positions restart: the last one is not its length - 1)."""
    return int(row.position_ids[-1]) != len(row) - 1


GRAPH_MIN_ROW_FILL = 0.75
"""``cuda_graphs: auto`` pads batches (and so graphs the layers) only when the rows average at least this fraction
of the longest row: at most a third more tokens computed. Packed rows of the 8B benchmark data average 86%."""

PROGRESS_EVERY_S = 30.0
"""Seconds between two progress lines when the output is not a terminal."""


class PlainProgress:
    """The progress bar's stand-in when stderr is not a terminal: the bar's ``set_postfix`` / ``update`` / ``close``,
    logging ``progress: step 40/200 (20%)  loss 1.2345  1,234 tokens/s  eta 4m20s`` at most every ``every_s``
    seconds (and never with ``every_s=inf``)."""

    def __init__(self, total: int, initial: int = 0, every_s: float = PROGRESS_EVERY_S):
        self.total, self.step, self.every_s = total, initial, every_s
        self.postfix: dict[str, str] = {}
        self._start_step, self._start = initial, time.monotonic()
        self._last = self._start

    def set_postfix(self, refresh: bool = True, **values: str) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.step += n
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        rate = (self.step - self._start_step) / max(now - self._start, 1e-9)  # steps/s, evaluation included
        eta = (self.total - self.step) / rate if rate > 0 else math.inf
        parts = [f"progress: step {self.step}/{self.total} ({100 * self.step / max(self.total, 1):.0f}%)"]
        if "loss" in self.postfix:
            parts.append(f"loss {self.postfix['loss']}")
        if "tok_s" in self.postfix:
            parts.append(f"{float(self.postfix['tok_s']):,.0f} tokens/s")
        parts.append(f"eta {_duration(eta)}")
        logger.info("  ".join(parts))

    def close(self) -> None:
        pass


def _improves(loss: float, best: float | None) -> bool:
    return math.isfinite(loss) and (best is None or loss < best)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False
