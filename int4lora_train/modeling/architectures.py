"""Per-architecture facts: which model types are tested, their projection names, fused projections, and the layouts
the toolkit cannot handle (MoE experts stored as fused 3-D parameters).

Surgery itself is generic (every INT4 linear of any transformers model is converted); these facts name the LoRA
targets ("the seven projections"), explain fused projections (Phi-3 keeps q/k/v in one ``qkv_proj`` and gate/up in
one ``gate_up_proj``, so LoRA attaches to the fused module and its ``lora_B`` spans all stacked outputs), and turn
unsupported layouts into an error that names the module instead of a shape mismatch deep in a forward.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from int4lora_train.errors import UnsupportedFormatError
from int4lora_train.quant.formats import is_int4_tensor_name, module_tensors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchitectureSpec:
    """The linear projections of one decoder layer of a model type, by leaf module name."""

    model_type: str
    attention: tuple[str, ...]
    mlp: tuple[str, ...]
    fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """A fused projection's leaf name -> the projections it stacks along its output axis, in order."""

    @property
    def projections(self) -> tuple[str, ...]:
        """Every linear projection leaf name (LoRA's usual targets), attention first."""
        return self.attention + self.mlp


_LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    name: ArchitectureSpec(name, _LLAMA_ATTENTION, _LLAMA_MLP)
    for name in ("llama", "mistral", "qwen2", "qwen3", "gemma2")
}
ARCHITECTURES["phi3"] = ArchitectureSpec(
    "phi3",
    ("qkv_proj", "o_proj"),
    ("gate_up_proj", "down_proj"),
    fused={"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")},
)
"""Model types whose INT4 surgery, loading and LoRA are tested on tiny models (tests/modeling)."""

MOE_ARCHITECTURES: dict[str, ArchitectureSpec] = {
    name: ArchitectureSpec(name, _LLAMA_ATTENTION, _LLAMA_MLP) for name in ("qwen3_moe", "qwen2_moe", "mixtral")
}
"""Mixture-of-experts model types whose fused experts load as ``Int4Experts`` (modeling/moe.py, tests/moe). Their
``mlp`` names are those of the dense MLPs (Qwen2-MoE's ``shared_expert``) and of each expert in checkpoints and
vLLM adapters; the experts module itself is targeted as ``experts``."""


@dataclass(frozen=True)
class FusedExperts:
    """A module that stores many experts' weights as 3-D ``[experts, out, in]`` tensors."""

    name: str
    class_name: str
    shapes: Mapping[str, tuple[int, ...]]

    def describe(self) -> str:
        shapes = ", ".join(f"{key} {list(shape)}" for key, shape in self.shapes.items())
        return f"{self.name} ({self.class_name}: {shapes})"


def model_type_of(model_or_config) -> str | None:
    """The ``model_type`` of a transformers model or config (None for other modules)."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None)


def architecture_for(model_or_config) -> ArchitectureSpec | None:
    """The tested spec of this model's type, or None (surgery still works; LoRA target names are then generic)."""
    model_type = model_type_of(model_or_config)
    return ARCHITECTURES.get(model_type) or MOE_ARCHITECTURES.get(model_type)


def projection_names(model: nn.Module) -> tuple[str, ...]:
    """The leaf names of the model's linear projections: the tested spec's, else every distinct leaf name of a
    linear layer (``nn.Linear`` and subclasses, so ``Int4Linear`` too) except the output head."""
    spec = architecture_for(model)
    if spec is not None:
        return spec.projections
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = dict.fromkeys(
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head
    )
    return tuple(names)


def find_fused_expert_modules(model: nn.Module) -> list[FusedExperts]:
    """Modules that own 3-D (or higher) weight tensors: MoE experts fused into ``[experts, out, in]`` parameters
    (transformers 5's Mixtral / Qwen-MoE layout) or INT4 tensors packed per expert."""
    from int4lora_train.modeling.int4_experts import Int4Experts

    found = []
    for name, module in model.named_modules():
        if isinstance(module, Int4Experts):  # already converted: INT4 experts the toolkit runs
            continue
        shapes = {
            key: tuple(t.shape)
            for key, t in module_tensors(module).items()
            if t.dim() >= 3 and (t.is_floating_point() or is_int4_tensor_name(key))
        }
        if shapes:
            found.append(FusedExperts(name, type(module).__name__, shapes))
    return found


def check_no_int4_fused_experts(model: nn.Module) -> None:
    """Raise :class:`UnsupportedFormatError` naming every module whose experts carry INT4 tensors in a fused 3-D
    layout; fused experts that are plain float parameters are left alone (they are not INT4)."""
    bad = []
    for experts in find_fused_expert_modules(model):
        module = model.get_submodule(experts.name)
        int4_keys = [key for key in module_tensors(module) if is_int4_tensor_name(key)]
        if int4_keys:
            bad.append(f"{experts.describe()} with INT4 tensors {int4_keys}")
    if bad:
        raise UnsupportedFormatError(
            "unsupported layout: MoE experts stored as fused 3-D parameters carry INT4 weights in "
            + "; ".join(bad)
            + ". Only 2-D linear layers can be INT4 here; add the experts to the quantization config's ignore list "
            "(keep them dense) or use a dense (non-MoE) model."
        )


def check_loadable_architecture(model: nn.Module, source: str) -> None:
    """Raise :class:`UnsupportedFormatError` when the skeleton built from ``source`` (a config.json path) has fused
    3-D expert parameters and its model type is not one whose per-expert checkpoint tensors the loader maps onto them
    (:data:`MOE_ARCHITECTURES`)."""
    experts = find_fused_expert_modules(model)
    if experts and model_type_of(model) not in MOE_ARCHITECTURES:
        listed = "; ".join(e.describe() for e in experts[:3]) + (
            f"; and {len(experts) - 3} more" if len(experts) > 3 else ""
        )
        raise UnsupportedFormatError(
            f"{source}: model_type {model_type_of(model)!r} stores MoE experts as fused 3-D parameters ({listed}); "
            "this layout is not supported by the INT4 loader for this model type. Supported: dense decoder models "
            f"({', '.join(sorted(ARCHITECTURES))} and similar) and the MoE types {sorted(MOE_ARCHITECTURES)}."
        )
    if architecture_for(model) is None:
        logger.warning(
            "%s: model_type %r is not one of the tested architectures (%s); loading it generically",
            source,
            model_type_of(model),
            ", ".join(sorted(ARCHITECTURES)),
        )


def is_decoder_mlp(name: str, module: nn.Module) -> bool:
    """Whether ``module`` (named ``name`` in the model) is a decoder layer's token-wise MLP: an ``mlp`` attribute
    whose class is named ``...MLP`` and which has a ``down_proj`` (Llama, Mistral, Qwen2/3, Gemma, Phi-3)."""
    return (
        name.rsplit(".", 1)[-1] == "mlp"
        and type(module).__name__.endswith("MLP")
        and isinstance(getattr(module, "down_proj", None), nn.Module)
    )
