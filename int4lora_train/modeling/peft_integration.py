"""PEFT LoRA on :class:`Int4Linear`: the LoRA layer, its registration, and training preparation.

::

    y = Int4Linear(x) + lora_B(lora_A(dropout(x))) * scaling        scaling = alpha / r   (rsLoRA: alpha / sqrt(r))
        \\_ frozen INT4 base, no weight gradient _/  \\_ trainable, fp32 by default (PEFT's autocast_adapter_dtype) _/

:class:`Int4LoraLinear` follows PEFT's quantized-layer pattern (``gptq.py`` / ``awq.py``): the INT4 module stays
``base_layer``, adapter parameters live in ``lora_A`` / ``lora_B`` ``ModuleDict``\\ s keyed by adapter name, so the
saved keys are exactly a dense model's (``...q_proj.lora_A.weight``) and vLLM parses them.

How PEFT finds it:

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

Refused with :class:`UnsupportedFormatError` (they read or rewrite the dense base weight, or vLLM cannot serve them):
DoRA and other LoRA variants, merging / unmerging into the INT4 base (export a merged model instead), ``lora_bias``,
and initialisations computed from the base weight (PiSSA, OLoRA, CorDA, LoftQ, MiCA, orthogonal, LoRA-GA).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from peft import LoraConfig, PeftConfig, PeftModel
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from int4lora_train.errors import UnsupportedFormatError
from int4lora_train.modeling.fused_lora import fused_lora_applies, fused_lora_forward
from int4lora_train.modeling.int4_linear import Int4Linear

logger = logging.getLogger(__name__)

SUPPORTED_INITS = (True, False, "gaussian")
"""``init_lora_weights`` values that do not need the dense base weight."""


class Int4LoraLinear(nn.Module, LoraLayer):
    """LoRA around an :class:`Int4Linear` base: ``base(x) + lora_B(lora_A(dropout(x))) * scaling``.

    With one active adapter the forward is one fused autograd node
    (:mod:`int4lora_train.modeling.fused_lora`; ``fused_lora = False`` on the layer or
    :func:`~int4lora_train.modeling.fused_lora.enable_fused_lora` switches it off); otherwise PEFT's generic path.
    """

    fused_lora: bool = True
    _lora_group = None  # a fused_lora.ProjectionGroup when configure_int4_training(group_projections=True)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        check_lora_config(config, where=kwargs.get("target_name") or type(base_layer).__name__)
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        # PEFT's generic lookup reads module.weight for nn.Linear; Int4Linear has none.
        return module.in_features, module.out_features

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        # Also the entry point for a second adapter on an existing layer, so the config is checked here too.
        check_lora_config(config, where=kwargs.get("target_name") or "Int4LoraLinear")
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any) -> None:
        requested = requested_variants(config)
        if requested:
            raise UnsupportedFormatError(_variant_message(requested))
        return None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        call = fused_lora_applies(self, x, args, kwargs)
        if call is not None:
            if self._lora_group is not None:
                out = self._lora_group.forward_member(self, x, call)
                if out is not None:
                    return out
            return fused_lora_forward(self, x, call)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for active_adapter in self.active_adapters:
            if active_adapter not in self.lora_A.keys():
                continue
            lora_A = self.lora_A[active_adapter]
            lora_B = self.lora_B[active_adapter]
            dropout = self.lora_dropout[active_adapter]
            x = self._cast_input_dtype(x, lora_A.weight.dtype)
            result = result + lora_B(lora_A(dropout(x))) * self.scaling[active_adapter]
        return result.to(result_dtype)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The dense ``[out, in]`` update ``B @ A * scaling`` (fp32), for merged exports; the base is not touched."""
        weight_a = self.lora_A[adapter].weight.float()
        weight_b = self.lora_B[adapter].weight.float()
        return (weight_b @ weight_a) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise UnsupportedFormatError(
            "merging LoRA into an INT4 base is not supported: the sum is not INT4 and re-quantizing it would change "
            "the weights vLLM serves. Keep the adapter separate, or use int4lora_train's merged export (dense bf16 "
            "or re-quantized W4A16)."
        )

    def unmerge(self) -> None:
        raise UnsupportedFormatError("unmerge: LoRA is never merged into an INT4 base (see merge).")

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


# ------------------------------------------------------------------------------------------------ config checks


def requested_variants(config: LoraConfig) -> list[str]:
    """The LoRA variants ``config`` asks for (DoRA, VeLoRA, aLoRA, ...), as PEFT detects them, by field name."""
    requested = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name, None)
        if f.name == "init_lora_weights":
            continue
        if f.metadata.get("is_lora_variant") and value:
            requested.append(f.name)
    for name in ("use_dora", "use_qalora"):  # older PEFT without the metadata; QA-LoRA is GPTQ-only, untagged
        if getattr(config, name, False) and name not in requested:
            requested.append(name)
    return requested


def check_lora_config(config: LoraConfig, where: str = "Int4Linear") -> None:
    """Raise :class:`UnsupportedFormatError` for options that cannot work on an INT4 base (see the module doc)."""
    variants = requested_variants(config)
    if variants:
        raise UnsupportedFormatError(f"{where}: {_variant_message(variants)}")
    if config.lora_bias:
        raise UnsupportedFormatError(
            f"{where}: lora_bias=True is not supported on an INT4 base (it could only be merged into a dense bias, "
            "and vLLM rejects LoRA biases); set lora_bias=False."
        )
    init = config.init_lora_weights
    if not any(init is allowed or (isinstance(init, str) and init == allowed) for allowed in SUPPORTED_INITS):
        raise UnsupportedFormatError(
            f"{where}: init_lora_weights={init!r} computes the adapter from the dense base weight (or is untested "
            f"on INT4 bases); use one of {list(SUPPORTED_INITS)}."
        )


def _variant_message(variants: list[str]) -> str:
    return (
        f"LoRA variant(s) {variants} are not supported on an INT4 base: DoRA and the other variants read or "
        "rewrite the dense base weight, and vLLM serves only plain LoRA. Use plain LoRA (e.g. use_dora=False); "
        "rsLoRA (use_rslora=True) is fine."
    )


# --------------------------------------------------------------------------------------------------- registration


def register_int4_lora(config: LoraConfig) -> LoraConfig:
    """Register :class:`Int4LoraLinear` for :class:`Int4Linear` on ``config`` (PEFT's custom-module dispatch);
    idempotent. Returns ``config``."""
    if not isinstance(config, LoraConfig):
        raise UnsupportedFormatError(
            f"register_int4_lora needs a peft.LoraConfig, got {type(config).__name__}; only LoRA adapters are "
            "supported on INT4 bases."
        )
    if (getattr(config, "_custom_modules", None) or {}).get(Int4Linear) is not Int4LoraLinear:
        config._register_custom_module({Int4Linear: Int4LoraLinear})
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
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, Int4Linear):
            register_int4_lora(lora_config)
        return current(lora_config, adapter_name, target, **kwargs)

    _create_new_module._int4lora_original = current
    LoraModel._create_new_module = staticmethod(_create_new_module)
    logger.debug("installed the Int4Linear LoRA dispatch on peft.tuners.lora.model.LoraModel")


def uninstall_peft_dispatch() -> None:
    """Undo :func:`install_peft_dispatch` (for tests; configs registered explicitly keep working)."""
    from peft.tuners.lora.model import LoraModel

    original = getattr(LoraModel._create_new_module, "_int4lora_original", None)
    if original is not None:
        LoraModel._create_new_module = staticmethod(original)


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
