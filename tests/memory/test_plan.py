"""The memory plan: the auto choices from the estimate, its one log line, and the Trainer's use of it."""

from __future__ import annotations

import logging

import pytest
import torch
from memory_helpers import int4_lora_model

from int4lora_train import memory
from int4lora_train.errors import ConfigError
from int4lora_train.memory import OFFLOAD_MIN_ROW_TOKENS, MemoryConfig
from int4lora_train.modeling import Int4Linear
from int4lora_train.train.config import load_config

GIB = 2**30


@pytest.fixture
def fake_gpu(monkeypatch):
    """Make the plan see one CUDA device with ``memory["free"]`` / ``memory["total"]`` bytes."""
    memory_info = {"free": 80 * GIB, "total": 80 * GIB}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (memory_info["free"], memory_info["total"]))
    return memory_info


def _plan(model, seq_len, **options):
    config = MemoryConfig(
        **{
            k: options.pop(k)
            for k in list(options)
            if k in ("offload_activations", "embeddings_on_cpu", "mlp_chunk_tokens", "optimizer_on_cpu")
        }
    )
    return memory.plan(model, 1, seq_len, "cuda", config, keep_dense_for_backward=True, **options)


def test_offload_when_the_inputs_outgrow_a_tenth_of_what_is_left_or_rows_are_long(fake_gpu):
    model = int4_lora_model(layers=4)
    roomy = _plan(model, 1024)
    inputs = roomy.estimate["checkpointed_inputs_bytes"]
    assert inputs == 4 * 1024 * 128 * 4 and roomy.estimate["checkpointed_layers"] == 4
    assert not roomy.offload_activations and not roomy.embeddings_on_cpu and roomy.keep_dense_for_backward is None
    weights = roomy.estimate["weights_on_device_bytes"]
    fake_gpu["free"] = weights + 5 * inputs  # not placed yet: the weights come off what is free
    tight = _plan(model, 1024)
    assert tight.offload_activations and "> 10% of" in tight.reasons["offload_activations"]
    fake_gpu["free"] = 80 * GIB
    long = _plan(model, OFFLOAD_MIN_ROW_TOKENS)
    assert (
        long.offload_activations and f"{OFFLOAD_MIN_ROW_TOKENS} tokens per row" in long.reasons["offload_activations"]
    )
    assert not _plan(model, OFFLOAD_MIN_ROW_TOKENS, offload_activations="off").offload_activations


def test_memory_bound_runs_keep_the_embeddings_on_the_host_and_drop_dense_weights(fake_gpu):
    model = int4_lora_model(layers=4)
    needed = _plan(model, 4096)
    total = needed.estimate["weights_on_device_bytes"] + needed.estimate["working_set_bytes"]
    fake_gpu["free"] = fake_gpu["total"] = total  # weights + activations > 90% of it
    bound = _plan(model, 4096)
    assert bound.estimate["memory_bound"]
    assert bound.offload_activations and bound.embeddings_on_cpu and bound.keep_dense_for_backward is False
    assert bound.optimizer_on_cpu and memory.optimizer_class(bound) is memory.HostAdamW
    assert not needed.optimizer_on_cpu and memory.optimizer_class(needed) is torch.optim.AdamW
    assert needed.estimate["optimizer_state_bytes"] == 2 * sum(
        p.numel() * 4 for p in model.parameters() if p.requires_grad
    )
    line = bound.summary()
    assert line.startswith("memory: offload_activations=on (auto: checkpointed inputs ")
    assert "embeddings_on_cpu=on (auto: weights " in line and "keep_dense_for_backward=off (auto: " in line
    assert "mlp_chunk_tokens=off (auto: 4096 tokens per micro-batch <= 16384)" in line
    assert "optimizer_on_cpu=on (auto: weights " in line
    assert not _plan(model, 4096, embeddings_on_cpu="off").embeddings_on_cpu
    fsdp = _plan(model, 4096, strategy="fsdp", world_size=2)
    assert not fsdp.embeddings_on_cpu and "fsdp" in fsdp.reasons["embeddings_on_cpu"]
    assert not fsdp.optimizer_on_cpu and "fsdp" in fsdp.reasons["optimizer_on_cpu"]
    with pytest.raises(ConfigError, match="optimizer_on_cpu: on cannot be used: train.strategy: fsdp"):
        _plan(model, 4096, strategy="fsdp", world_size=2, optimizer_on_cpu="on")
    assert fsdp.keep_dense_for_backward is False

    report = memory.apply(model, bound)
    assert report["embeddings_on_cpu"] and report["offloaded_layers"] == 4
    assert report["keep_dense_switched_off"] == 4 * 7 > 0
    assert not any(m.keep_dense_for_backward for m in model.modules() if isinstance(m, Int4Linear))


def test_bad_values_are_config_errors_naming_the_key():
    model = int4_lora_model(layers=2)
    with pytest.raises(ConfigError, match="memory.offload_activations must be one of"):
        memory.plan(model, 1, 16, config=MemoryConfig(offload_activations="sometimes"))
    with pytest.raises(ConfigError, match="memory.mlp_chunk_tokens"):
        memory.plan(model, 1, 16, config=MemoryConfig(mlp_chunk_tokens=-1))
    with pytest.raises(ConfigError, match="unknown feature"):
        memory.apply(model, offload=True)


def test_the_config_section_reads_yaml_on_off_and_checks_what_needs_what():
    config = load_config(
        None,
        [
            "train.memory.offload_activations=on",
            "train.gradient_checkpointing=true",
            "train.memory.embeddings_on_cpu=off",
            "train.memory.mlp_chunk_tokens=4096",
        ],
    )
    assert (config.train.memory.offload_activations, config.train.memory.embeddings_on_cpu) == ("on", "off")
    assert config.train.memory.mlp_chunk_tokens == 4096
    with pytest.raises(ConfigError, match="train.gradient_checkpointing: true"):
        load_config(None, ["train.memory.offload_activations=on"])
    with pytest.raises(ConfigError, match="embeddings_on_cpu: on .* fsdp"):
        load_config(None, ["train.memory.embeddings_on_cpu=on", "train.strategy=fsdp"])
    with pytest.raises(ConfigError, match="optimizer_on_cpu: on .* fsdp"):
        load_config(None, ["train.memory.optimizer_on_cpu=on", "train.strategy=fsdp"])
    with pytest.raises(ConfigError, match="mlp_chunk_tokens must be >= 0"):
        load_config(None, ["train.memory.mlp_chunk_tokens=-2"])


def test_the_trainer_plans_once_logs_one_line_and_records_it(tmp_path, caplog):
    import json

    from int4lora_train.modeling.tiny_models import build_tokenizer
    from int4lora_train.train.data import load_datasets
    from int4lora_train.train.module import LoraModule
    from int4lora_train.train.trainer import Trainer

    def run(name, *overrides):
        data = tmp_path / "train.jsonl"
        data.write_text(
            "".join(json.dumps({"prompt": f"{a} {a}:", "completion": f"{a}{a}"}) + "\n" for a in range(10, 26)),
            encoding="utf-8",
        )
        config = load_config(
            None,
            [
                f"data.train_files={data}",
                "data.max_length=32",
                "train.max_steps=2",
                "train.micro_batch_size=2",
                "train.gradient_checkpointing=true",
                "train.lr=5e-3",
                f"output.dir={tmp_path / name}",
                *overrides,
            ],
        )
        datasets = load_datasets(config.data, build_tokenizer(), config.train.seed)
        trainer = Trainer(config.train, tmp_path / name, device="cpu", tensorboard=False, progress_bar=False)
        module = LoraModule(int4_lora_model(layers=2, checkpointing=False), config.train)
        result = trainer.fit(module, datasets.train)
        return result, {n: p.detach().clone() for n, p in module.trainable_parameters()}

    plain, plain_lora = run("plain")
    assert plain.memory["offload_activations"] is False and plain.memory["mlp_chunk_tokens"] == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="int4lora_train.memory"):
        result, lora = run(
            "memory",
            "train.memory.offload_activations=on",
            "train.memory.mlp_chunk_tokens=7",
            "train.memory.embeddings_on_cpu=on",
            "train.memory.optimizer_on_cpu=on",
        )
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory: ")]
    assert len(lines) == 1 and lines[0] == result.memory["summary"]
    assert "offload_activations=on (set;" in lines[0] and "mlp_chunk_tokens=7 (set)" in lines[0]
    assert result.memory["embeddings_on_cpu"] and result.memory["estimate"]["tokens_per_micro_batch"] > 0
    assert result.memory["optimizer_on_cpu"] and "optimizer_on_cpu=on (set; no effect on cpu)" in lines[0]
    # The same training, up to the chunked MLP's summation order. AdamW's second step (the first moves no lora_A:
    # lora_B starts at zero) turns gradients that differ in their last bits into updates that differ by a small part
    # of lr where a gradient is near zero (1e-5 seen, against ~3.7e-3 per step at lr 5e-3): allow 1% of lr.
    for name in plain_lora:
        torch.testing.assert_close(lora[name], plain_lora[name], rtol=1e-4, atol=1e-2 * 5e-3, msg=name)


def test_planning_again_after_apply_decides_the_same(fake_gpu):
    """The table an apply moved to the host still counts as a weight on the device: a run that was memory-bound
    because of it stays so, and the next apply does not move it back (nor the one after that out again)."""
    model = int4_lora_model(layers=4)
    first = _plan(model, 4096)
    table = model.get_input_embeddings().weight
    table_bytes = table.numel() * table.element_size()
    needed = first.estimate["weights_on_device_bytes"] + first.estimate["working_set_bytes"]
    needed += 2 * first.estimate["checkpointed_inputs_bytes"] // 4  # offloaded: two layers' inputs on the device
    # Memory-bound by half the table's bytes.
    fake_gpu["free"] = fake_gpu["total"] = int((needed - table_bytes // 2) / memory.PRESSURE_SHARE)
    chosen = [_plan(model, 4096)]
    memory.apply(model, chosen[0])
    chosen.append(_plan(model, 4096))
    assert [c.embeddings_on_cpu for c in chosen] == [True, True] and memory.host_embeddings_enabled(model)
    assert chosen[1].estimate == chosen[0].estimate and chosen[1].summary() == chosen[0].summary()


def test_a_plan_that_cannot_be_applied_changes_nothing():
    """apply raises before it switches anything: the features of the earlier call stay as they were."""
    from int4lora_train.memory.chunked_mlp import chunked_mlp_tokens
    from int4lora_train.memory.offload import checkpointed_layers

    model = int4_lora_model(layers=2)
    memory.apply(model, MemoryConfig(offload_activations="on", embeddings_on_cpu="off", mlp_chunk_tokens=7))
    offloader, layers = memory.activation_offloader(model), checkpointed_layers(model)
    wrapped = [layer._gradient_checkpointing_func for layer in layers]
    model.config.tie_word_embeddings = True  # the plan below was made before: it no longer fits the model
    chosen = memory.MemoryPlan(offload_activations=False, embeddings_on_cpu=True, keep_dense_for_backward=False)
    with pytest.raises(ConfigError, match="embeddings_on_cpu: the input embedding is tied"):
        memory.apply(model, chosen)
    assert memory.activation_offloader(model) is offloader and chunked_mlp_tokens(model) == 7
    assert [layer._gradient_checkpointing_func for layer in layers] == wrapped
    assert all(m.keep_dense_for_backward for m in model.modules() if isinstance(m, Int4Linear))
    assert not memory.host_embeddings_enabled(model)


@pytest.mark.parametrize(
    "features, saves",
    [
        ({}, False),
        ({"keep_dense_for_backward": None}, False),
        ({"offload_activations": True}, True),
        ({"embeddings_on_cpu": True}, True),
        ({"mlp_chunk_tokens": 8192}, True),
        ({"optimizer_on_cpu": True}, True),
        ({"keep_dense_for_backward": False}, True),
    ],
)
def test_a_plan_saves_device_memory_when_any_feature_is_on(features, saves):
    assert memory.MemoryPlan(**features).saves_device_memory is saves
