"""PEFT LoRA on :class:`Int4Linear`: how PEFT finds the INT4 LoRA layer, and the core training preparation.

The layer itself, :class:`~int4lora_train.modeling.lora_layer.Int4LoraLinear`, and the options it refuses live in
:mod:`int4lora_train.modeling.lora_layer`. How PEFT finds it:

- **Registration** is PEFT's own custom-module dispatch, ``LoraConfig._register_custom_module({Int4Linear:
  Int4LoraLinear})`` (:func:`register_int4_lora`). That mapping is not saved in ``adapter_config.json``, so a config
  loaded by ``PeftModel.from_pretrained`` would lack it. :func:`install_peft_dispatch` therefore wraps
  ``LoraModel._create_new_module`` once (idempotent, reversible with :func:`uninstall_peft_dispatch`) so that every
  LoRA config that meets an ``Int4Linear`` gets the mapping registered just before dispatch. Nothing else changes:
  configs that never meet an ``Int4Linear`` are untouched, and the mapping added is the documented one. It is
  installed when ``int4lora_train.modeling`` is imported, which any code holding an ``Int4Linear`` has done; so plain
  ``get_peft_model(model, LoraConfig(...))`` and ``PeftModel.from_pretrained(model, path)`` just work.
- **"all-linear"**: PEFT collects ``nn.Linear`` instances; ``Int4Linear`` is an ``nn.Linear`` subclass (without a
  weight parameter), so ``target_modules="all-linear"`` selects it and excludes the output head as usual.
- **Device**: PEFT moves new adapters to the device of the base's ``qweight`` (``Int4Linear.qweight`` is the packed
  buffer), which also avoids the ``StopIteration`` of a parameterless base layer in ``_replace_module``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from peft import LoraConfig, PeftConfig, PeftModel
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from int4lora_train.errors import UnsupportedFormatError
from int4lora_train.modeling.int4_linear import Int4Linear
from int4lora_train.modeling.lora_layer import Int4LoraLinear, check_lora_config

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------- registration


def register_int4_lora(config: LoraConfig) -> LoraConfig:
    """Register :class:`Int4LoraLinear` for :class:`Int4Linear` on ``config`` (PEFT's custom-module dispatch);
    idempotent. Returns ``config``.

    A user's own registration for ``Int4Linear`` (or a subclass of it) is kept: PEFT's custom modules are the user's
    API, and theirs wins. A broader one (``nn.Linear``, which ``Int4Linear`` subclasses) is kept too, but the INT4
    layer goes first, so that dense layers keep the user's class and INT4 layers get one that works without a dense
    weight (PEFT's dispatch takes the first ``isinstance`` match).
    """
    if not isinstance(config, LoraConfig):
        raise UnsupportedFormatError(
            f"register_int4_lora needs a peft.LoraConfig, got {type(config).__name__}; only LoRA adapters are "
            "supported on INT4 bases."
        )
    # MoE: per-expert LoRA on INT4 experts (target_modules "experts"; modeling/expert_lora.py).
    from int4lora_train.modeling.expert_lora import Int4ExpertsLora
    from int4lora_train.modeling.int4_experts import Int4Experts

    custom = dict(getattr(config, "_custom_modules", None) or {})
    ours = {
        base: layer
        for base, layer in ((Int4Linear, Int4LoraLinear), (Int4Experts, Int4ExpertsLora))
        # registered already: ours (idempotent) or the user's own, which wins
        if not any(isinstance(key, type) and issubclass(key, base) for key in custom)
    }
    if ours:
        config._custom_modules = {**ours, **custom}
    return config


def make_lora_config(
    r: int = 16,
    lora_alpha: float = 32,
    target_modules: str | list[str] = "all-linear",
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    task_type: str | None = "CAUSAL_LM",
    **kwargs: Any,
) -> LoraConfig:
    """A ``LoraConfig`` with the INT4 layer registered (``kwargs`` go to ``LoraConfig``); checked up front."""
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules,
        lora_dropout=lora_dropout,
        use_rslora=use_rslora,
        task_type=task_type,
        **kwargs,
    )
    check_lora_config(config, where="make_lora_config")
    return register_int4_lora(config)


def install_peft_dispatch() -> None:
    """Make every ``LoraConfig`` that meets an :class:`Int4Linear` register :class:`Int4LoraLinear` (idempotent).

    Why a patch: PEFT does not persist ``_custom_modules``, so ``PeftModel.from_pretrained(model, path)`` and any
    caller that builds its own ``LoraConfig`` would otherwise wrap ``Int4Linear`` in PEFT's dense ``lora.Linear``.
    The wrapper only calls :func:`register_int4_lora` on the config and then PEFT's own dispatch.
    """
    from peft.tuners.lora.model import LoraModel

    current = LoraModel._create_new_module
    if getattr(current, "_int4lora_original", None) is not None:
        return

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        from int4lora_train.modeling.int4_experts import Int4Experts

        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, (Int4Linear, Int4Experts)):
            register_int4_lora(lora_config)
        return current(lora_config, adapter_name, target, **kwargs)

    _create_new_module._int4lora_original = current
    LoraModel._create_new_module = staticmethod(_create_new_module)
    from int4lora_train.modeling.expert_lora import install_transformers_conversion_passthrough

    install_transformers_conversion_passthrough()
    _install_modules_to_save_check()
    _install_adapter_dtype()
    logger.debug("installed the Int4Linear LoRA dispatch on peft.tuners.lora.model.LoraModel")


def _install_modules_to_save_check() -> None:
    """Refuse ``modules_to_save`` on an :class:`Int4Linear` (PEFT's ``ModulesToSaveWrapper.update``).

    PEFT would deep-copy the layer and mark its parameters trainable; an INT4 layer's weight is packed buffers, so
    only the bias would train, silently, and vLLM refuses ``modules_to_save`` anyway.
    """
    from peft.utils.other import ModulesToSaveWrapper

    current = ModulesToSaveWrapper.update
    if getattr(current, "_int4lora_original", None) is not None:
        return

    def update(self, adapter_name, *args, **kwargs):
        original = self.original_module
        if isinstance(original, Int4Linear):
            raise UnsupportedFormatError(
                f"modules_to_save names an INT4 layer ({original.extra_repr()}): a trainable full copy of it would "
                "need its dense weight, which an INT4 layer does not have (only its bias would train), and vLLM "
                "refuses modules_to_save. Target the layer with LoRA instead (target_modules), and remove it from "
                "modules_to_save."
            )
        return current(self, adapter_name, *args, **kwargs)

    update._int4lora_original = current
    ModulesToSaveWrapper.update = update


def _install_adapter_dtype() -> None:
    """With ``autocast_adapter_dtype=False`` give INT4 layers' adapters the dtype the base computes in.

    PEFT moves a new adapter to the dtype of the base's float ``weight`` or its ``compute_dtype``. An Int4Linear
    has no float weight, and without a ``compute_dtype`` it computes in its input's dtype (the model's dense dtype),
    so PEFT would leave the adapter fp32. ``LoraModel._cast_adapter_dtype`` sees the whole model: after PEFT's own
    step it casts those adapters to the model's dtype (with ``autocast_adapter_dtype=True``, the default, PEFT's
    fp32 adapters stay as they are).
    """
    from peft.tuners.lora.model import LoraModel

    current = LoraModel._cast_adapter_dtype
    if getattr(current, "_int4lora_original", None) is not None:
        return

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        current(self, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if autocast_adapter_dtype:
            return
        dtype = getattr(self.model, "dtype", None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            return
        for module in self.model.modules():
            if isinstance(module, Int4LoraLinear) and module.get_base_layer().compute_dtype is None:
                for name in module.adapter_layer_names:
                    container = getattr(module, name, None)
                    if isinstance(container, nn.ModuleDict) and adapter_name in container:
                        container[adapter_name].to(dtype)

    _cast_adapter_dtype._int4lora_original = current
    LoraModel._cast_adapter_dtype = _cast_adapter_dtype


def uninstall_peft_dispatch() -> None:
    """Undo :func:`install_peft_dispatch` (for tests; configs registered explicitly keep working)."""
    from peft.tuners.lora.model import LoraModel
    from peft.utils.other import ModulesToSaveWrapper

    original = getattr(LoraModel._create_new_module, "_int4lora_original", None)
    if original is not None:
        LoraModel._create_new_module = staticmethod(original)
    original_update = getattr(ModulesToSaveWrapper.update, "_int4lora_original", None)
    if original_update is not None:
        ModulesToSaveWrapper.update = original_update
    original_cast = getattr(LoraModel._cast_adapter_dtype, "_int4lora_original", None)
    if original_cast is not None:
        LoraModel._cast_adapter_dtype = original_cast


def load_adapter(
    model: nn.Module, path: str, adapter_name: str = "default", is_trainable: bool = False, **kwargs: Any
) -> PeftModel:
    """``PeftModel.from_pretrained`` with the INT4 layer registered on the loaded config explicitly (works even
    when :func:`install_peft_dispatch` was undone)."""
    config = PeftConfig.from_pretrained(path)
    if isinstance(config, LoraConfig):
        register_int4_lora(config)
    return PeftModel.from_pretrained(
        model, path, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **kwargs
    )


# ------------------------------------------------------------------------------------------------------- training


def prepare_for_training(
    model: nn.Module, gradient_checkpointing: bool = True, use_reentrant: bool = True
) -> nn.Module:
    """Get an INT4 model (before or after ``get_peft_model``) ready to train LoRA; returns ``model``.

    Unlike ``peft.prepare_model_for_kbit_training`` it upcasts nothing (norms, embeddings and the head keep their
    dtype; that function would turn every bf16 parameter into fp32). It freezes every parameter except LoRA
    adapters, turns off the KV cache, and enables gradient checkpointing; with reentrant checkpointing it also makes
    the input embeddings' output require grad, without which no gradient reaches the checkpointed layers' adapters.
    """
    lora_params = {id(p) for m in model.modules() if isinstance(m, LoraLayer) for p in _adapter_parameters(m)}
    for param in model.parameters():
        if id(param) not in lora_params:
            param.requires_grad_(False)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False
    if gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise UnsupportedFormatError(
                f"{type(model).__name__} has no gradient_checkpointing_enable(); pass gradient_checkpointing=False."
            )
        options = {"use_reentrant": use_reentrant}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers' current name (the old one warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
        if use_reentrant:
            model.enable_input_require_grads()
    return model


def _adapter_parameters(layer: LoraLayer):
    for name in layer.adapter_layer_names:
        container = getattr(layer, name, None)
        if container is not None:
            yield from container.parameters()


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; INT4 buffers count as their unpacked element count ``out * in``."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Int4Linear))
    return trainable, total


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model under any PEFT wrapping (``get_base_model()``), or ``model`` itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model
