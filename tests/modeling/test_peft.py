"""PEFT LoRA on INT4 models through plain ``get_peft_model`` / ``save_pretrained`` / ``PeftModel.from_pretrained``."""

from __future__ import annotations

import copy

import pytest
import torch
from modeling_helpers import ARCHS, GROUP_SIZE, max_diff, tiny
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from int4lora_train.errors import UnsupportedFormatError
from int4lora_train.modeling import (
    DenseWeightUnavailableError,
    Int4Linear,
    Int4LoraLinear,
    dequantized_copy,
    install_peft_dispatch,
    load_adapter,
    make_lora_config,
    prepare_for_training,
    quantize_model_rtn,
    uninstall_peft_dispatch,
)


def _int4(arch: str = "llama", dtype=torch.float32) -> nn.Module:
    model = tiny(arch).to(dtype)
    quantize_model_rtn(model, GROUP_SIZE, symmetric=False)
    return model


def _randomise_lora_b(model: nn.Module, seed: int = 0) -> None:
    """lora_B starts at zero (the adapter is a no-op); make it non-trivial, deterministically by name."""
    for name, param in sorted(model.named_parameters()):
        if "lora_B" in name:
            gen = torch.Generator().manual_seed(seed + sum(map(ord, name)))
            param.data.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _adapter_keys(model, tmp_path, name) -> set[str]:
    model.save_pretrained(tmp_path / name)
    return set(load_file(tmp_path / name / "adapter_model.safetensors"))


@pytest.mark.parametrize("arch", ARCHS)
def test_all_linear_lora_trains_only_adapters_and_saves_dense_keys(arch, tokens, tmp_path, dense_copies):
    model = _int4(arch)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    peft_model = get_peft_model(model, config)

    int4_layers = [m for m in peft_model.modules() if isinstance(m, Int4Linear)]
    lora_layers = [m for m in peft_model.modules() if isinstance(m, Int4LoraLinear)]
    assert len(lora_layers) == len(int4_layers) == (8 if arch == "phi3" else 14)
    assert all(isinstance(m.base_layer, Int4Linear) for m in lora_layers)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert dense_copies(peft_model) == []

    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    packed_before = [m.packed.clone() for m in int4_layers]
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(2):  # step 1 moves lora_B off zero, step 2 then moves lora_A
        peft_model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = dict(peft_model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.equal(a, m.packed) for a, m in zip(packed_before, int4_layers))

    dense_peft = get_peft_model(tiny(arch), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    keys = _adapter_keys(peft_model, tmp_path, "int4")
    assert keys == _adapter_keys(dense_peft, tmp_path, "dense")
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)


def test_lora_output_and_grads_equal_dense_model_with_the_same_adapter(tokens):
    """INT4 + LoRA computes exactly dense(dequantized) + the same LoRA: logits and LoRA gradients (fp32)."""
    model = _int4("qwen2")
    reference = dequantized_copy(model)
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True)
    int4_peft = get_peft_model(model, LoraConfig(**config))
    dense_peft = get_peft_model(reference, LoraConfig(**config))
    _randomise_lora_b(int4_peft)
    dense_peft.load_state_dict(int4_peft.state_dict(), strict=False)

    layer = int4_peft.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, Int4LoraLinear) and layer.scaling["default"] == 8 / 2  # rsLoRA: alpha / sqrt(r)
    assert not isinstance(int4_peft.base_model.model.model.layers[0].self_attn.k_proj, Int4LoraLinear)

    loss = int4_peft(tokens, labels=tokens).loss
    dense_loss = dense_peft(tokens, labels=tokens).loss
    assert max_diff(int4_peft(tokens).logits, dense_peft(tokens).logits) <= 1e-5
    loss.backward()
    dense_loss.backward()
    dense_grads = dict(dense_peft.named_parameters())
    for name, param in int4_peft.named_parameters():
        if param.requires_grad:
            assert max_diff(param.grad, dense_grads[name].grad) <= 1e-5, name


def test_save_and_plain_from_pretrained_round_trip(tokens, tmp_path):
    model = _int4("llama")
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    _randomise_lora_b(peft_model)
    expected = peft_model(tokens).logits
    peft_model.save_pretrained(tmp_path / "adapter")

    fresh = peft_model.unload()  # the same INT4 model, adapters stripped
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")  # nothing registered by hand
    assert isinstance(loaded.base_model.model.model.layers[1].mlp.up_proj, Int4LoraLinear)
    assert torch.equal(loaded(tokens).logits, expected)


def test_load_adapter_registers_explicitly_when_the_dispatch_is_not_installed(tokens, tmp_path):
    model = _int4("mistral")
    peft_model = get_peft_model(model, make_lora_config(r=4, target_modules=["o_proj", "up_proj"]))
    _randomise_lora_b(peft_model)
    expected = peft_model(tokens).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    base = peft_model.unload()
    uninstall_peft_dispatch()
    try:
        with pytest.raises(DenseWeightUnavailableError):  # PEFT's dense lora.Linear would need base.weight
            PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
        loaded = load_adapter(base, tmp_path / "adapter")
    finally:
        install_peft_dispatch()
    assert torch.equal(loaded(tokens).logits, expected)


def test_several_adapters_and_dropout(tokens, tmp_path):
    model = _int4("gemma2")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5))
    peft_model.add_adapter("second", LoraConfig(r=8, target_modules=["q_proj", "gate_proj"]))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert set(layer.lora_A) == {"default", "second"} and layer.lora_A["second"].out_features == 8
    assert isinstance(layer.lora_dropout["default"], nn.Dropout) and layer.lora_dropout["default"].p == 0.5
    _randomise_lora_b(peft_model)

    peft_model.set_adapter("default")
    peft_model.eval()
    eval_out = peft_model(tokens).logits
    assert torch.equal(eval_out, peft_model(tokens).logits)
    peft_model.train()
    assert not torch.equal(peft_model(tokens).logits, peft_model(tokens).logits)  # dropout on the LoRA input
    peft_model.eval()
    peft_model.set_adapter("second")
    second_out = peft_model(tokens).logits
    assert not torch.equal(second_out, eval_out)

    peft_model.save_pretrained(tmp_path / "adapters")
    assert (tmp_path / "adapters" / "second" / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(peft_model.unload(), tmp_path / "adapters")
    loaded.load_adapter(tmp_path / "adapters" / "second", adapter_name="second")
    loaded.set_adapter("second")
    assert torch.equal(loaded(tokens).logits, second_out)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"use_dora": True}, "use_dora"),
        ({"use_qalora": True}, "use_qalora"),
        ({"lora_bias": True}, "lora_bias"),
        ({"init_lora_weights": "pissa"}, "pissa"),
        ({"init_lora_weights": "olora"}, "olora"),
    ],
)
def test_options_that_need_the_dense_base_are_refused(options, match):
    with pytest.raises(UnsupportedFormatError, match=match):
        get_peft_model(_int4("llama"), LoraConfig(r=4, target_modules=["q_proj"], **options))


def test_merge_is_refused_but_unload_works(tokens):
    model = _int4("llama")
    base_logits = model(tokens).logits
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    with pytest.raises(UnsupportedFormatError, match="merging LoRA into an INT4 base"):
        peft_model.merge_and_unload()
    unloaded = peft_model.unload()
    assert isinstance(unloaded.model.layers[0].self_attn.q_proj, Int4Linear)
    assert torch.equal(unloaded(tokens).logits, base_logits)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_lora_gradients(use_reentrant, tokens):
    def grads(checkpointing: bool):
        torch.manual_seed(0)  # lora_A's init
        model = _int4("qwen3")
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
        _randomise_lora_b(peft_model)
        prepare_for_training(peft_model, gradient_checkpointing=checkpointing, use_reentrant=use_reentrant)
        peft_model.train()
        calls = []
        # The LoRA layer, not its base: the fused LoRA path computes the base matmul without calling base_layer.
        layer = peft_model.base_model.model.model.layers[0].mlp.down_proj
        # A pre-hook: a non-reentrant recompute stops early, in the middle of the last layer that saves tensors.
        layer.register_forward_pre_hook(lambda *args: calls.append(1))
        peft_model(tokens, labels=tokens).loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # the checkpointed layer ran again in backward
        return {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert set(plain) == set(checkpointed) and all(g is not None for g in checkpointed.values())
    assert max(max_diff(plain[n], checkpointed[n]) for n in plain) <= 1e-6


def test_prepare_for_training_freezes_the_base_without_upcasting(tokens):
    model = _int4("phi3", dtype=torch.bfloat16)
    prepare_for_training(model, gradient_checkpointing=True)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # prepare_model_for_kbit_training: fp32
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters())
    assert model.is_gradient_checkpointing and model.config.use_cache is False
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    prepare_for_training(peft_model)  # after get_peft_model too: adapters stay trainable
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad}


def test_autocast_bf16_training_step_on_cpu(tokens):
    peft_model = get_peft_model(_int4("llama"), LoraConfig(r=4, target_modules="all-linear"))
    _randomise_lora_b(peft_model)
    peft_model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = peft_model(tokens, labels=tokens).loss
    loss.backward()
    grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.dtype == torch.float32 for g in grads)  # adapters stay fp32 under autocast


def test_make_lora_config_registers_and_checks_up_front():
    from peft.tuners.lora.model import LoraModel

    config = make_lora_config(r=8, lora_alpha=16, use_rslora=True)
    from int4lora_train.modeling.expert_lora import Int4ExpertsLora
    from int4lora_train.modeling.int4_experts import Int4Experts

    assert config._custom_modules == {Int4Linear: Int4LoraLinear, Int4Experts: Int4ExpertsLora}
    assert config.target_modules == "all-linear" and config.use_rslora
    with pytest.raises(UnsupportedFormatError, match="use_dora"):
        make_lora_config(use_dora=True)
    install_peft_dispatch()  # idempotent: never wraps the wrapper
    original = LoraModel._create_new_module._int4lora_original
    assert getattr(original, "_int4lora_original", None) is None


def test_trainable_parameter_count_counts_int4_weights_unpacked():
    from int4lora_train.modeling import trainable_parameter_count

    model = _int4("llama")
    dense_total = sum(p.numel() for p in tiny("llama").parameters())
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    trainable, total = trainable_parameter_count(peft_model)
    assert trainable == 2 * 2 * 4 * 128  # two layers, lora_A [4, 128] + lora_B [128, 4]
    assert total == dense_total + trainable
