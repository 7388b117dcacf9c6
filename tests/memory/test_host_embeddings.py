"""Host embeddings: the table leaves the parameters and the device; outputs and gradients stay the same."""

from __future__ import annotations

import pytest
import torch
from memory_helpers import batch, int4_lora_model, step
from torch import nn

from int4lora_train import memory
from int4lora_train.errors import ConfigError
from int4lora_train.memory import MemoryConfig
from int4lora_train.memory.host_embeddings import (
    HostEmbeddingError,
    disable_host_embeddings,
    enable_host_embeddings,
    host_embedding_refusal,
    host_embeddings_enabled,
)


@pytest.mark.parametrize("reentrant", [False, True])  # reentrant: the input-require-grads hook carries the grads
def test_loss_and_lora_gradients_equal_the_plain_model(reentrant):
    reference = step(int4_lora_model(reentrant=reentrant), batch())
    model = int4_lora_model(reentrant=reentrant)
    report = memory.apply(model, MemoryConfig(embeddings_on_cpu="on", offload_activations="off"))
    assert report["embeddings_on_cpu"] and host_embeddings_enabled(model)
    loss, grads = step(model, batch())
    assert torch.equal(loss, reference[0])
    assert grads.keys() == reference[1].keys()
    assert all(torch.equal(grads[n], reference[1][n]) for n in grads)


def test_the_table_stays_readable_but_leaves_parameters_state_dict_and_device_moves():
    model = int4_lora_model(layers=2)
    embed = model.get_input_embeddings()
    table = embed.weight.detach().clone()
    names = {n for n, _ in model.named_parameters()}
    enable_host_embeddings(model)
    assert isinstance(embed.weight, nn.Parameter) and not embed.weight.requires_grad
    assert torch.equal(embed.weight, table)
    assert {n for n, _ in model.named_parameters()} == {n for n in names if "embed_tokens" not in n}
    assert not any("embed_tokens" in k for k in model.state_dict())
    model.to("meta")  # what accelerate's device placement does: everything moves but the table
    assert embed.weight.device.type == "cpu" and torch.equal(embed.weight, table)
    assert next(model.get_decoder().layers.parameters()).device.type == "meta"


def test_rows_are_gathered_on_the_host_and_sent_to_the_compute_device():
    model = int4_lora_model(layers=2)
    embed = model.get_input_embeddings()
    ids = batch()
    expected = embed(ids)
    enable_host_embeddings(model, device="meta")  # a stand-in device: the copy's destination is the output's
    out = embed(ids)
    assert out.device.type == "meta" and out.shape == expected.shape and out.dtype == expected.dtype
    model = int4_lora_model(layers=2)
    embed = model.get_input_embeddings()
    enable_host_embeddings(model)
    assert torch.equal(embed(ids), expected) and embed(ids).data_ptr() != embed.weight.data_ptr()


def test_disable_restores_the_parameter_and_the_forward():
    model = int4_lora_model(layers=2)
    embed = model.get_input_embeddings()
    enable_host_embeddings(model)
    enable_host_embeddings(model)  # again: nothing changes
    assert disable_host_embeddings(model) and not disable_host_embeddings(model)
    assert "weight" in embed._parameters and "forward" not in embed.__dict__
    assert any("embed_tokens" in n for n, _ in model.named_parameters())
    memory.apply(model, embeddings_on_cpu="on", offload_activations="off")
    memory.apply(model, embeddings_on_cpu="off", offload_activations="off")
    assert "weight" in embed._parameters and not host_embeddings_enabled(model)


def test_a_trained_or_tied_embedding_is_refused_with_the_reason():
    trained = int4_lora_model(layers=2, modules_to_save=["embed_tokens"])
    assert "modules_to_save" in host_embedding_refusal(trained)
    with pytest.raises(ConfigError, match="embeddings_on_cpu: on cannot be used: .*modules_to_save"):
        memory.plan(trained, 1, 16, config=MemoryConfig(embeddings_on_cpu="on"))
    lora = int4_lora_model(layers=2, target_modules=["embed_tokens", "q_proj"])
    assert "LoRA on embed_tokens" in host_embedding_refusal(lora)
    tied = int4_lora_model(layers=2)
    tied.config.tie_word_embeddings = True
    assert "tied" in host_embedding_refusal(tied)
    with pytest.raises(HostEmbeddingError, match="tied"):
        enable_host_embeddings(tied)
    assert not memory.plan(tied, 1, 16).embeddings_on_cpu


def test_fsdp_refuses_on_and_turns_auto_off():
    model = int4_lora_model(layers=2)
    with pytest.raises(ConfigError, match="fsdp"):
        memory.plan(model, 1, 16, config=MemoryConfig(embeddings_on_cpu="on"), strategy="fsdp")
    chosen = memory.plan(model, 1, 16, strategy="fsdp")
    assert not chosen.embeddings_on_cpu and "fsdp" in chosen.reasons["embeddings_on_cpu"]
