"""``speed.apply``: the one switch for the training-speed features, used the way a trainer calls the model."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from modeling_helpers import tiny_int4_lora_model

from int4lora_train import speed
from int4lora_train.errors import ConfigError
from int4lora_train.modeling import Int4Linear, Int4LoraLinear, prepare_for_training
from int4lora_train.speed import SpeedConfig
from int4lora_train.speed.chunked_loss import chunked_loss_enabled


def _model(arch: str = "llama"):
    peft_model = tiny_int4_lora_model(arch)
    prepare_for_training(peft_model, gradient_checkpointing=True, use_reentrant=False)
    return peft_model


def _batch():
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (2, 12), generator=gen)
    labels = tokens.clone()
    labels[0, :5] = -100
    positions = torch.arange(12).repeat(2, 1)
    return tokens, labels, positions


def test_trainer_style_loss_and_grads_match_the_unoptimised_model():
    tokens, labels, positions = _batch()
    normaliser = torch.tensor(30.0)  # the step's target count, as a trainer passes it (all micro-batches)

    def run(optimise: bool):
        model = _model()
        if optimise:
            report = speed.apply(model, SpeedConfig(fused_kernels="on"))
            assert report["chunked_loss"] and report["groups"] == 4 and report["rmsnorm"] == 5
        model.train()
        if optimise:  # the model computes the loss: no logits
            loss = model(
                input_ids=tokens, position_ids=positions, labels=labels, num_items_in_batch=normaliser, use_cache=False
            ).loss
        else:  # what the trainer does today: logits, then its own summed cross-entropy
            logits = model(input_ids=tokens, position_ids=positions, use_cache=False).logits
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), reduction="sum"
            )
            loss = loss / normaliser
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    (ref_loss, ref_grads), (loss, grads) = run(False), run(True)
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item())
    assert max((grads[n] - ref_grads[n]).abs().max().item() for n in grads) <= 1e-5


def test_false_removes_every_optimisation():
    model = _model()
    speed.apply(model)
    report = speed.apply(
        model,
        SpeedConfig(
            fused_lora=False,
            keep_dense_for_backward=False,
            group_projections=False,
            chunked_loss=False,
            fused_kernels=False,
        ),
    )
    assert report["groups"] == 0 and not report["chunked_loss"] and report["rmsnorm"] == 0
    assert not chunked_loss_enabled(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(m.lora_group is None and not m.fused_lora for m in model.modules() if isinstance(m, Int4LoraLinear))


def test_keywords_switch_only_the_features_named():
    model = _model()
    speed.apply(model)
    assert speed.apply(model, fused_lora=False) == {"lora_layers": 14, "int4_layers": 14}
    assert all(not m.fused_lora for m in model.modules() if isinstance(m, Int4LoraLinear))
    assert chunked_loss_enabled(model)  # left as it was
    report = speed.apply(model, fused_lora=True, keep_dense_for_backward=False)
    assert report == {"lora_layers": 14, "int4_layers": 14}
    assert all(m.fused_lora for m in model.modules() if isinstance(m, Int4LoraLinear))
    assert all(not m.keep_dense_for_backward for m in model.modules() if isinstance(m, Int4Linear))
    assert speed.apply(model, SpeedConfig(), chunked_loss=False)["chunked_loss"] is False  # config, one overridden
    assert not chunked_loss_enabled(model)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"fused_kernels": "yes"}, "fused_kernels must be one of"),
        ({"fused_kernels": 1}, "fused_kernels must be one of"),
        ({"loss_chunk_size": 0}, "loss_chunk_size must be a positive integer"),
        ({"fused_lora": False}, "group_projections needs fused_lora"),
        ({"chunked_loss": "true"}, "chunked_loss must be true or false"),
        ({"fused_lora": "yes"}, "fused_lora must be true or false"),
    ],
)
def test_bad_values_are_config_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        speed.apply(_model(), SpeedConfig(**options))


def test_unknown_and_incomplete_keywords_are_config_errors():
    with pytest.raises(ConfigError, match=r"unknown feature\(s\) \['fused_lorra'\]"):
        speed.apply(_model(), fused_lorra=True)
    with pytest.raises(ConfigError, match="pass chunked_loss=True too"):
        speed.apply(_model(), loss_chunk_size=64)


def test_unsupported_model_keeps_its_own_loss_with_a_warning(caplog):
    model = _model()
    model.base_model.model.config.model_type = "cohere"
    with caplog.at_level(logging.WARNING, logger="int4lora_train.speed"):
        report = speed.apply(model)
    assert not report["chunked_loss"] and "chunked loss not used" in caplog.text
