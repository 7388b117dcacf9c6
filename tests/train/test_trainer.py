"""The Trainer on accelerate (CPU, one process): loss falls, exact resume, atomic checkpoints, NaN stop."""

from __future__ import annotations

import io
import json
import math
import sys
from dataclasses import asdict

import pytest
import torch
from train_helpers import arithmetic_records, tiny_peft_model, write_jsonl

from int4lora_train.errors import CheckpointError, TrainingError, TrainingInterrupted
from int4lora_train.modeling.tiny_models import build_tokenizer
from int4lora_train.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from int4lora_train.train.config import TrainConfig, load_config
from int4lora_train.train.data import load_datasets
from int4lora_train.train.metrics import RunSummary, read_metrics
from int4lora_train.train.module import LoraModule
from int4lora_train.train.trainer import BatchPlan, Trainer


def _setup(tmp_path, run: str, overrides=(), dropout: float = 0.1, module_cls=LoraModule):
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_records(40))
    config = load_config(
        None,
        [
            f"data.train_files={data}",
            "data.validation_split=0.1",
            "data.max_length=32",
            "data.packing=true",
            "train.max_steps=8",
            "train.micro_batch_size=2",
            "train.gradient_accumulation_steps=2",
            "train.lr=5e-3",
            "train.log_every=2",
            "train.eval_every=3",
            "train.save_every=2",
            "train.keep_last=null",
            "train.warmup_steps=2",
            f"output.dir={tmp_path / run}",
            *overrides,
        ],
    )
    datasets = load_datasets(config.data, build_tokenizer(), config.train.seed)
    trainer = Trainer(config.train, tmp_path / run, device="cpu", tensorboard=False, progress_bar=False)
    module = module_cls(tiny_peft_model(dropout=dropout), config.train)  # built after the Trainer seeded the RNGs
    return trainer, module, datasets


def _trainable(module):
    return {name: p.detach().clone() for name, p in module.trainable_parameters()}


class StopAt(LoraModule):
    """Stops the run cleanly after step ``stop_at`` (Lightning's ``trainer.should_stop``)."""

    stop_at = 0

    def on_train_step_end(self, step, metrics):
        if step == self.stop_at:
            self.trainer.should_stop = True


def test_unused_rows_and_evaluation_without_validation_data_are_said(tmp_path, caplog):
    overrides = ["data.validation_split=0", "data.packing=false", "train.micro_batch_size=3", "train.max_steps=6"]
    trainer, module, data = _setup(tmp_path, "run", overrides)
    assert (len(data.train), len(data.validation)) == (40, 0)  # 6 steps of 6 rows per epoch, 4 rows left over
    with caplog.at_level("INFO", logger="int4lora_train.train.trainer"):
        result = trainer.fit(module, data.train, data.validation)
    assert result.val_loss is None
    assert "each epoch trains on 36 of the 40 rows: the last 4 do not fill a global batch of 6" in caplog.text
    warning = next(r for r in caplog.records if r.levelname == "WARNING")
    assert warning.getMessage().startswith(
        "train.eval_every is set but there is no validation data, so no validation loss"
    )


def test_without_a_terminal_progress_is_a_plain_log_line_not_a_bar(tmp_path, caplog, monkeypatch):
    from int4lora_train.train import trainer as trainer_module

    stderr = io.StringIO()  # not a terminal, like a log file or a pipe
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setattr(trainer_module, "PROGRESS_EVERY_S", 0.0)  # a line at every step
    trainer, module, data = _setup(tmp_path, "run", ["train.max_steps=3"])
    trainer.progress_bar = True
    with caplog.at_level("INFO", logger="int4lora_train.train.trainer"):
        trainer.fit(module, data.train, data.validation)
    lines = [m for m in caplog.messages if m.startswith("progress:")]
    assert [line.split("  ")[0] for line in lines] == [f"progress: step {k}/3 ({100 * k / 3:.0f}%)" for k in (1, 2, 3)]
    assert all(" loss " in line and " tokens/s" in line and "eta " in line for line in lines)
    assert lines[-1].endswith("eta 0s")
    assert stderr.getvalue() == ""  # no bar drawn


def test_training_calls_no_deprecated_transformers_name(tmp_path):
    """transformers 5 renamed gradient_checkpointing_* and past_key_values; using the old names prints deprecation
    noise on every run (a FutureWarning, a transformers log line)."""
    import logging
    import warnings

    class Remember(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())

    said: list[str] = []
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler := Remember())
    if hasattr(logging.Logger, "warning_once"):  # transformers' once-per-process cache
        logging.Logger.warning_once.cache_clear()
    trainer, module, data = _setup(tmp_path, "run", ["train.max_steps=2", "train.gradient_checkpointing=true"])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, data.train, data.validation)
    finally:
        transformers_logger.removeHandler(handler)
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []
    assert [m for m in said if "deprecated" in m] == []


def test_batch_plan_gives_every_world_size_the_same_global_batches():
    one = BatchPlan(num_rows=20, micro_batch_size=4, accumulation_steps=2, world_size=1, seed=3)
    two = BatchPlan(num_rows=20, micro_batch_size=2, accumulation_steps=2, world_size=2, seed=3)
    for step in range(5):  # crosses the epoch boundary (2 steps per epoch)
        rows_one = sorted(i for mb in one.micro_batches(step, 0) for i in mb)
        rows_two = sorted(i for rank in (0, 1) for mb in two.micro_batches(step, rank) for i in mb)
        assert rows_one == rows_two and len(set(rows_one)) == 8
    epoch0 = {i for step in (0, 1) for mb in one.micro_batches(step, 0) for i in mb}
    assert len(epoch0) == 16  # no row twice within an epoch
    assert one.epoch_order(0).tolist() != one.epoch_order(1).tolist()


def test_a_short_run_lowers_the_loss_and_logs(tmp_path):
    trainer, module, data = _setup(tmp_path, "run", ["train.max_steps=24", "train.lr=1e-2"], dropout=0.0)
    result = trainer.fit(module, data.train, data.validation)
    assert result.completed and result.steps == 24
    assert result.train_loss_final < result.train_loss_first - 0.5
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    val = [r["val/loss"] for r in records if "val/loss" in r]
    assert len(val) == 24 // 3 and val[-1] < val[0]
    assert result.val_loss == val[-1] and result.val_ppl == pytest.approx(torch.tensor(val[-1]).exp().item())
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(records[0])


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path):
    """Dropout, packing, accumulation and a warmup + cosine schedule: all of it must continue exactly."""
    trainer, module, data = _setup(tmp_path, "straight")
    straight = trainer.fit(module, data.train, data.validation)
    expected = _trainable(module)

    StopAt.stop_at = 5
    trainer, module, data = _setup(tmp_path, "interrupted", module_cls=StopAt)
    stopped = trainer.fit(module, data.train, data.validation)
    assert not stopped.completed and stopped.steps == 5
    assert [step for step, _ in list_checkpoints(tmp_path / "interrupted" / "checkpoints")] == [2, 4, 5]

    StopAt.stop_at = 0
    trainer, module, data = _setup(tmp_path, "interrupted", module_cls=StopAt)
    resumed = trainer.fit(
        module, data.train, data.validation, resume_from=latest_checkpoint(tmp_path / "interrupted" / "checkpoints")
    )
    assert resumed.completed and resumed.steps == 8
    got = _trainable(module)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert (resumed.val_loss, resumed.train_loss_final) == (straight.val_loss, straight.train_loss_final)

    def losses(run):
        return [
            (r["step"], r.get("train/loss"), r.get("val/loss")) for r in read_metrics(tmp_path / run / "metrics.jsonl")
        ]

    assert losses("interrupted") == losses("straight")


def test_ctrl_c_mid_step_checkpoints_the_last_whole_step_and_resuming_is_exact(tmp_path):
    """Ctrl-C inside step 6 (one micro-batch's gradients accumulated, dropout RNG advanced) checkpoints step 5 as
    step 5 left it; resuming from it gives the uninterrupted run's weights, losses and token count."""
    trainer, module, data = _setup(tmp_path, "straight")
    straight = trainer.fit(module, data.train, data.validation)
    expected = _trainable(module)

    class CtrlCInStep6(LoraModule):
        calls = 0

        def training_step(self, batch):
            type(self).calls += 1
            if type(self).calls == 12:  # 2 micro-batches per step: calls 11 and 12 are step 6
                raise KeyboardInterrupt
            return super().training_step(batch)

    trainer, module, data = _setup(tmp_path, "interrupted", module_cls=CtrlCInStep6)
    with pytest.raises(TrainingInterrupted) as stop:
        trainer.fit(module, data.train, data.validation)
    root = tmp_path / "interrupted" / "checkpoints"
    assert (stop.value.step, stop.value.max_steps, stop.value.checkpoint) == (5, 8, str(root / "step-5"))
    assert [step for step, _ in list_checkpoints(root)] == [2, 4, 5]

    trainer, module, data = _setup(tmp_path, "interrupted")
    resumed = trainer.fit(module, data.train, data.validation, resume_from=root / "step-5")
    got = _trainable(module)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert (resumed.train_loss_final, resumed.val_loss) == (straight.train_loss_final, straight.val_loss)
    assert resumed.tokens == straight.tokens  # the whole run's, not only the resumed part's


def test_resume_from_an_older_checkpoint_is_exact_too(tmp_path):
    trainer, module, data = _setup(tmp_path, "run")
    trainer.fit(module, data.train, data.validation)
    expected = _trainable(module)
    trainer, module, data = _setup(tmp_path, "run")
    trainer.fit(module, data.train, data.validation, resume_from=tmp_path / "run" / "checkpoints" / "step-2")
    got = _trainable(module)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_resume_refuses_a_different_global_batch(tmp_path):
    trainer, module, data = _setup(tmp_path, "run", ["train.max_steps=2"])
    trainer.fit(module, data.train, data.validation)
    trainer, module, data = _setup(tmp_path, "run", ["train.max_steps=2", "train.micro_batch_size=1"])
    with pytest.raises(CheckpointError, match="global_batch_size=4, this run has 2"):
        trainer.fit(module, data.train, data.validation, resume_from=tmp_path / "run" / "checkpoints" / "step-2")


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    trainer, module, data = _setup(tmp_path, "run", ["train.keep_last=2"])
    root = tmp_path / "run" / "checkpoints"
    (root / ".tmp-step-99").mkdir(parents=True)  # debris of a crash mid-write: never taken for a checkpoint
    trainer.fit(module, data.train, data.validation)
    assert [step for step, _ in list_checkpoints(root)] == [6, 8]
    assert latest_checkpoint(root) == root / "step-8"
    checkpoint = load_checkpoint(root / "step-8")
    state = checkpoint["trainer_state"]
    assert state["step"] == 8 and state["global_batch_size"] == 4
    assert checkpoint["state_dict"].keys() == _trainable(module).keys()
    assert checkpoint["optimizer"]["state"] and checkpoint["scheduler"]["last_epoch"] == 8
    assert not (root / ".tmp-step-8").exists()
    json.loads((root / "step-8" / "trainer_state.json").read_text())  # complete, parseable


def test_a_non_finite_loss_stops_before_the_update_and_keeps_the_last_checkpoint(tmp_path):
    class NanAtStep3(LoraModule):
        calls = 0

        def training_step(self, batch):
            type(self).calls += 1
            loss = super().training_step(batch)
            # 2 micro-batches per step: calls 5 and 6 belong to step 3
            return loss * float("nan") if type(self).calls == 5 else loss

    trainer, module, data = _setup(tmp_path, "run", ["train.log_every=1"], module_cls=NanAtStep3)
    with pytest.raises(TrainingError) as err:
        trainer.fit(module, data.train, data.validation)
    message = str(err.value)
    assert "step 3: the training loss is nan" in message
    assert f"the last good checkpoint is {tmp_path / 'run' / 'checkpoints' / 'step-2'}" in message
    # The weights are those of step 2: the optimizer never saw the NaN gradients.
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-2")["state_dict"]
    assert all(torch.equal(saved[name], p.detach()) for name, p in module.trainable_parameters())
    assert [step for step, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [2]


def test_gradient_checkpointing_and_bf16_autocast(tmp_path):
    """Non-reentrant checkpointing recomputes the same numbers (dropout RNG included): identical adapters. bf16
    autocast on the CPU trains to nearly the same adapter."""

    def run(name, *overrides):
        trainer, module, data = _setup(tmp_path, name, ["train.max_steps=3", *overrides])
        trainer.fit(module, data.train, data.validation)
        return _trainable(module), module

    plain, _ = run("plain")
    checkpointed, module = run("checkpointed", "train.gradient_checkpointing=true")
    assert any(getattr(m, "gradient_checkpointing", False) for m in module.unwrapped_model.modules())
    assert all(torch.equal(plain[k], checkpointed[k]) for k in plain)
    bf16, _ = run("bf16", "train.mixed_precision=bf16")
    assert any(not torch.equal(plain[k], bf16[k]) for k in plain)  # autocast was on
    for key in plain:  # Adam turns tiny gradient differences into lr-sized steps: compare whole tensors
        assert (bf16[key] - plain[key]).norm() <= 0.05 * plain[key].norm(), key


class ScriptedValidation(LoraModule):
    """The real validation loss times a factor per step, so the test decides which evaluation is the best."""

    factors: dict[int, float] = {}
    step = 0
    stop_at = 0

    def on_train_step_end(self, step, metrics):
        self.step = step
        if step == self.stop_at:
            self.trainer.should_stop = True

    def validation_step(self, batch):
        loss_sum, targets = super().validation_step(batch)
        return loss_sum * self.factors[self.step], targets


@pytest.mark.parametrize(
    ("overrides", "factors", "kept"),
    [
        # saves every 2 steps: the best (step 4) outlives keep_last=1
        (["train.eval_every=2", "train.save_every=2"], {2: 1.0, 4: 0.01, 6: 1.0, 8: 1.0}, [4, 8]),
        # a new best between saves (step 6) is written there; the earlier best (step 3) is pruned once beaten
        (["train.eval_every=3", "train.save_every=4"], {3: 0.1, 6: 0.01, 8: 1.0}, [6, 8]),
    ],
)
def test_keep_best_keeps_the_lowest_validation_loss_checkpoint(tmp_path, overrides, factors, kept):
    ScriptedValidation.factors = factors
    run_overrides = ["train.keep_last=1", "train.keep_best=true", *overrides]
    trainer, module, data = _setup(tmp_path, "run", run_overrides, module_cls=ScriptedValidation)
    result = trainer.fit(module, data.train, data.validation)
    root = tmp_path / "run" / "checkpoints"
    assert [step for step, _ in list_checkpoints(root)] == kept
    best = min(factors, key=factors.get)
    assert (result.best_step, result.best_checkpoint) == (best, str(root / f"step-{best}"))
    logged = {m["step"]: m["val/loss"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val/loss" in m}
    assert result.best_val_loss == pytest.approx(logged[best]) and logged[best] == min(logged.values())
    assert load_checkpoint(root / f"step-{best}")["trainer_state"]["best_step"] == best


def test_keep_best_resumes_with_its_best(tmp_path):
    ScriptedValidation.factors = {2: 1.0, 4: 0.01, 6: 1.0, 8: 1.0}
    overrides = ["train.keep_last=1", "train.keep_best=true", "train.eval_every=2"]
    trainer, module, data = _setup(tmp_path, "run", overrides, module_cls=ScriptedValidation)
    module.stop_at = 6
    assert trainer.fit(module, data.train, data.validation).best_step == 4
    root = tmp_path / "run" / "checkpoints"
    trainer, module, data = _setup(tmp_path, "run", overrides, module_cls=ScriptedValidation)
    result = trainer.fit(module, data.train, data.validation, resume_from=root / "step-6")
    assert (result.best_step, [s for s, _ in list_checkpoints(root)]) == (4, [4, 8])


def test_keep_best_needs_validation_data():
    from int4lora_train.errors import ConfigError

    with pytest.raises(ConfigError, match="train.keep_best needs validation data"):
        load_config(None, ["train.keep_best=true"])


def test_eval_prompts_are_completed_greedily_at_each_evaluation(tmp_path):
    pytest.importorskip("tensorboard")
    prompts = ["12+30=", "Q: reverse abc\nA: "]
    overrides = ["train.eval_every=4", "train.eval_at_start=true", "train.eval_max_new_tokens=5"]
    config = load_config(None, [f"train.eval_prompts={json.dumps(prompts)}", *overrides])
    assert config.train.eval_prompts == prompts
    trainer, module, data = _setup(tmp_path, "run", [f"train.eval_prompts={json.dumps(prompts)}", *overrides])
    trainer = Trainer(trainer.config, tmp_path / "run", device="cpu", tensorboard=True, progress_bar=False)
    tokenizer = build_tokenizer()
    trainer.fit(module, data.train, data.validation, tokenizer=tokenizer)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    samples = {r["step"]: r for r in records if "eval/completion_0" in r}
    assert sorted(samples) == [0, 4, 8]
    assert all(samples[s]["eval/prompt_1"] == prompts[1] for s in samples)
    for record in samples.values():
        for i in range(2):  # byte tokens: at most 5 characters (fewer when EOS came first)
            assert len(record[f"eval/completion_{i}"]) <= 5
    # The last samples are the final model's greedy completions.
    model = module.unwrapped_model.eval()
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        expected = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert samples[8][f"eval/completion_{i}"] == tokenizer.decode(
            expected[0, ids.shape[1] :], skip_special_tokens=True
        )
    events = b"".join(p.read_bytes() for p in (tmp_path / "run" / "tb").rglob("events.out.tfevents.*"))
    assert b"eval/completion_1" in events and b"eval/prompt_0" in events


class RecordsModes(LoraModule):
    """Records, at every training forward, the modules that are not in training mode."""

    def training_step(self, batch):
        self.not_training = getattr(self, "not_training", [])
        self.not_training.append([n for n, m in self.model.named_modules() if not m.training])
        return super().training_step(batch)


def test_every_training_forward_runs_with_every_module_in_training_mode(tmp_path):
    """A loaded model is in eval mode under a PEFT wrapper in training mode: fit puts every module in training mode
    (gradient checkpointing and dropout depend on it), and each step does again after an evaluation."""
    trainer, module, data = _setup(tmp_path, "run", ["train.eval_every=2"], module_cls=RecordsModes)
    assert any(not m.training for m in module.model.modules())  # the fixture's base model is in eval mode
    trainer.fit(module, data.train, data.validation)
    assert len(module.not_training) == 8 * 2 and not any(module.not_training)  # 8 steps x 2 micro-batches


def _graphs_fit(tmp_path, monkeypatch, run: str, graphs: str, *overrides: str):
    """A 5-step fit of the tiny Llama (dropout 0.1, checkpointing) with ``train.speed.cuda_graphs=graphs``, graphs
    forced possible on the CPU (:class:`EagerReplay`); returns the logged losses, the trainer, the layer graphs,
    the longest training row and the fit's result."""
    from int4lora_train.speed import layer_graphs as lg

    monkeypatch.setattr(lg, "graph_blockers", lambda model, device, need_cuda=True: [])
    monkeypatch.setattr(lg, "CudaGraphCapture", lg.EagerReplay)
    losses, trainer, module, train_rows, result = _checkpointed_fit(
        tmp_path, run, "data.packing=false", "train.max_steps=5", f"train.speed.cuda_graphs={graphs}", *overrides
    )
    graphs = lg.layer_graphs(module.unwrapped_model)
    assert result.cuda_graphs == (None if graphs is None else {**graphs.stats, "padded_to": trainer._pad_to})
    return losses, trainer, graphs, max(len(s) for s in train_rows), result


def _checkpointed_fit(tmp_path, run: str, *overrides: str):
    """A fit of the tiny Llama (dropout 0.1, gradient checkpointing, micro-batch 2, no evaluation) on 40 arithmetic
    records with ``overrides``; returns the logged losses, the trainer, the module, the training rows and the fit's
    result."""
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_records(40))
    config = load_config(
        None,
        [f"data.train_files={data}", "data.validation_split=0", "data.max_length=32", "train.micro_batch_size=2",
         "train.log_every=1", "train.save_every=null", "train.gradient_checkpointing=true",
         f"output.dir={tmp_path / run}", *overrides],
    )  # fmt: skip
    datasets = load_datasets(config.data, build_tokenizer(), config.train.seed)
    trainer = Trainer(config.train, tmp_path / run, device="cpu", tensorboard=False, progress_bar=False)
    module = LoraModule(tiny_peft_model(dropout=0.1), config.train)
    result = trainer.fit(module, datasets.train, [])
    losses = [m["train/loss"] for m in read_metrics(tmp_path / run / "metrics.jsonl") if "train/loss" in m]
    return losses, trainer, module, datasets.train, result


@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_trainer_pads_batches_to_one_shape_and_replays_every_step(tmp_path, monkeypatch, accumulation):
    """With graphs on, batches are padded to the longest row of the data, so one capture serves every micro-batch;
    the losses equal a run without graphs (the padding is a segment of its own without targets)."""
    accumulate = f"train.gradient_accumulation_steps={accumulation}"
    reference, plain, none, _, _ = _graphs_fit(tmp_path, monkeypatch, "eager", "off", accumulate)
    losses, trainer, graphs, longest, result = _graphs_fit(tmp_path, monkeypatch, "graphs", "on", accumulate)
    assert none is None and plain._pad_to is None
    assert trainer._pad_to == longest and graphs.stats["captures"] == 1 and graphs.stats["eager_calls"] == 0
    calls = 5 * accumulation * len(graphs.layers)
    assert graphs.stats["graphed_calls"] == calls
    assert losses == pytest.approx(reference, rel=1e-5)
    paths = {"run_dir": "run", "adapter_dir": None, "metrics_file": "m", "tensorboard_dir": None, "loss_plot": None}
    summary = RunSummary(**paths, **asdict(result))
    assert f"CUDA graphs {calls} of {calls} layer calls replayed, 1 capture(s), rows padded to {longest}" in (
        summary.format()
    )


def test_auto_leaves_short_unpacked_rows_eager(tmp_path, monkeypatch, caplog):
    """``auto`` does not pad rows that average less than GRAPH_MIN_ROW_FILL of the longest (it would multiply the
    work): no graphs, no padding, and the log says why and what to do."""
    from int4lora_train.train import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "GRAPH_MIN_ROW_FILL", 1.01)  # the arithmetic rows are all close in length
    with caplog.at_level("INFO", logger="int4lora_train.train.trainer"):
        _, trainer, graphs, _, _ = _graphs_fit(tmp_path, monkeypatch, "auto", "auto")
    assert graphs is None and trainer._pad_to is None
    assert "CUDA graphs of the decoder layers: off (auto): rows average" in caplog.text
    assert "data.packing: true" in caplog.text


def test_the_trainer_hands_varlen_attention_the_segments_of_the_host_batch(tmp_path, monkeypatch):
    """With varlen attention the trainer computes each micro-batch's segments from its host copy and presets them:
    no forward (nor its checkpoint recompute) reads the position ids back from the device, a copy that drains the
    GPU's queue at the first attention of every forward. Training is the same as without the preset."""
    from int4lora_train.speed import varlen_attention as va

    def fit(run: str, preset: bool):
        va.clear_cache()
        calls = []
        compute = va.compute_segments
        monkeypatch.setattr(va, "compute_segments", lambda *a, **k: calls.append("device" in k) or compute(*a, **k))
        if not preset:
            monkeypatch.setattr(va, "preset_segments", lambda position_ids, segments: None)
        losses, trainer, *_ = _checkpointed_fit(
            tmp_path, run, "data.packing=true", "train.max_steps=3", "train.gradient_accumulation_steps=2",
            "train.speed.packed_attention=varlen",
        )  # fmt: skip
        monkeypatch.undo()
        assert trainer._varlen
        return losses, calls

    losses, calls = fit("preset", preset=True)
    reference, reference_calls = fit("plain", preset=False)
    assert losses == reference and len(losses) == 3
    assert calls == [True] * 6  # 3 steps x 2 micro-batches, all by the trainer from the host batch
    # the preset dropped: each forward computes them again (after the trainer made both micro-batches' in one go)
    assert reference_calls == [True, True, False, False] * 3


def test_each_step_reads_the_device_once_and_finds_its_batches_made(tmp_path, monkeypatch):
    """The loss, the gradient norm and the token count come back in one read per step, and every step after the
    first finds its batches made during the previous step (while the GPU would still run that step's backward); the
    losses are those of a run that makes each step's batches when it starts."""
    from int4lora_train.train import trainer as trainer_module

    def fit(run: str, prefetch: bool):
        made, reads, running = [], [], [None]
        step_data, read, train_step = Trainer._step_data, trainer_module._read_scalars, Trainer._train_step

        def recorded_train_step(self, *args, prefetch):
            running[0] = args[5]  # the step
            return train_step(self, *args, prefetch=prefetch and prefetch_on)

        prefetch_on = prefetch
        monkeypatch.setattr(Trainer, "_train_step", recorded_train_step)
        monkeypatch.setattr(
            Trainer, "_step_data", lambda self, *a: made.append((running[0], a[-1])) or step_data(self, *a)
        )
        monkeypatch.setattr(trainer_module, "_read_scalars", lambda *v: reads.append(len(v)) or read(*v))
        losses, *_ = _checkpointed_fit(tmp_path, run, "train.max_steps=4", "train.gradient_accumulation_steps=2")
        monkeypatch.undo()
        return losses, made, reads

    losses, made, reads = fit("prefetch", prefetch=True)
    assert made == [(0, 0), (0, 1), (1, 2), (2, 3)]  # (step running, step whose batches are made)
    assert reads == [3] * 4
    reference, reference_made, _ = fit("plain", prefetch=False)
    assert reference_made == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert losses == reference and len(losses) == 4


def test_read_scalars_takes_tensors_and_numbers_in_one_copy():
    from int4lora_train.train.trainer import _read_scalars

    assert _read_scalars(torch.tensor(1.5), torch.tensor([2.0]), 3) == [1.5, 2.0, 3.0]
    assert _read_scalars(torch.tensor(2**40 + 1), 7) == [2**40 + 1, 7.0]  # token counts stay exact
    assert math.isnan(_read_scalars(torch.tensor(float("nan")))[0])


def test_a_divergence_stop_closes_the_loss_scalers_step():
    """Under fp16 the clip unscales the gradients before the loss is read; a stop on a bad loss must close the
    scaler's step, or a later fit on the same trainer could not unscale again."""
    trainer = Trainer(TrainConfig(), "unused", device="cpu", tensorboard=False, progress_bar=False)
    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.full((2,), float("inf"))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    trainer.accelerator.scaler = scaler
    scaler.scale(torch.ones(()))  # a step's scaled loss: the scaler starts its scale
    scaler.unscale_(optimizer)
    trainer._abandon_step(optimizer)
    assert param.grad is None
    param.grad = torch.ones(2)
    scaler.unscale_(optimizer)  # raises "unscale_() has already been called" without the closing update


def test_a_stopped_fit_leaves_no_batches_for_the_next(tmp_path, monkeypatch):
    """A fit that stops between steps (here: Ctrl-C in the end-of-step hook) has made the next step's batches; they
    belong to its plan and are dropped, never found by a later fit on the same trainer at that step."""
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_records(40))
    config = load_config(
        None,
        [f"data.train_files={data}", "data.validation_split=0", "data.max_length=32", "train.micro_batch_size=2",
         "train.save_every=null", "train.max_steps=4", f"output.dir={tmp_path / 'run'}"],
    )  # fmt: skip
    datasets = load_datasets(config.data, build_tokenizer(), config.train.seed)
    trainer = Trainer(config.train, tmp_path / "run", device="cpu", tensorboard=False, progress_bar=False)
    seen = []

    def stop(self, step, metrics):
        seen.append(trainer._prefetched.step)
        raise KeyboardInterrupt

    monkeypatch.setattr(LoraModule, "on_train_step_end", stop)
    with pytest.raises(TrainingInterrupted):
        trainer.fit(LoraModule(tiny_peft_model(), config.train), datasets.train, [])
    assert seen == [1] and trainer._prefetched is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a wait for the device exists only on CUDA")
def test_making_a_steps_batches_waits_for_nothing_on_the_gpu(tmp_path):
    """The next step's batches are made while the GPU runs the backward: no copy in there may wait for it."""
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_records(8))
    config = load_config(None, [f"data.train_files={data}", "data.validation_split=0", "data.max_length=32"])
    rows = load_datasets(config.data, build_tokenizer(), config.train.seed).train
    trainer = Trainer(config.train, tmp_path / "run", device="cuda", tensorboard=False, progress_bar=False)
    trainer._varlen = True  # the segments too
    plan = BatchPlan(num_rows=len(rows), micro_batch_size=2, accumulation_steps=2, world_size=1, seed=0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        made = trainer._step_data(plan, rows, 0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(made.batches) == 2 and made.batches[0]["input_ids"].is_cuda and made.normalizer.is_cuda
