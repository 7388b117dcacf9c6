"""Per-expert LoRA on :class:`Int4Experts` as a PEFT layer, saved in the layout vLLM's MoE LoRA loads.

``LoraConfig(target_modules=[..., "experts"])`` wraps every ``Int4Experts`` in :class:`Int4ExpertsLora` (PEFT's
custom-module dispatch, registered like ``Int4LoraLinear``'s). Each adapter holds, for all ``E`` experts at once::

    gate_A, up_A [E, r, H]   gate_B, up_B [E, I, r]   down_A [E, r, I]   down_B [E, H, r]
    expert e:  gate += s * B_gate[e] A_gate[e] x    up += s * B_up[e] A_up[e] x    down += s * B_down[e] A_down[e] h

(initialised as PEFT does: A Kaiming-uniform, B zero; ``init_lora_weights="gaussian"``: A ~ N(0, 1/r)). Only the
experts that received tokens are touched (:meth:`Int4Experts.forward_with_lora`).

**Saved layout.** PEFT saves whatever ``state_dict()`` returns with "lora_" and the adapter name in the key; this
layer's state-dict hooks write (and read back) one 2-D tensor per expert and projection::

    base_model.model.model.layers.L.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.lora_{A,B}.weight

which is exactly vLLM's per-expert ("2-D") MoE adapter format (``vllm/lora/lora_model.py``:
``check_unexpected_modules`` accepts ``experts.{e}.gate_proj`` because ``process_packed_modules_mapping`` expands
``experts`` into every expert's ``gate_proj`` / ``up_proj`` / ``down_proj`` for models with ``is_3d_moe_weight =
False``, which Qwen2-MoE, Qwen3-MoE and Mixtral are). Mixtral's names are ``w1`` / ``w3`` / ``w2``, in vLLM's module
``block_sparse_moe`` (see :data:`int4lora_train.export.vllm_rules.MOE_EXPERT_PROJECTIONS`).
``PeftModel.from_pretrained`` reads the same files back. One adapter is active at a time on an experts module.
"""

from __future__ import annotations

import math

import torch
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from int4lora_train.errors import UnsupportedFormatError
from int4lora_train.modeling.int4_experts import ExpertLora, Int4Experts

PARTS = ("gate", "up", "down")


class _ExpertAdapter(nn.Module):
    """One adapter's six ``[E, ...]`` LoRA parameters."""

    def __init__(self, experts: Int4Experts, r: int) -> None:
        super().__init__()
        e, h, i = experts.num_experts, experts.hidden_dim, experts.intermediate_dim
        device = experts.gate_up_packed.device
        shapes = {"gate": (h, i), "up": (h, i), "down": (i, h)}
        for part, (in_features, out_features) in shapes.items():
            self.register_parameter(f"{part}_A", nn.Parameter(torch.empty(e, r, in_features, device=device)))
            self.register_parameter(f"{part}_B", nn.Parameter(torch.zeros(e, out_features, r, device=device)))

    def reset(self, init) -> None:
        with torch.no_grad():
            for part in PARTS:
                a, b = getattr(self, f"{part}_A"), getattr(self, f"{part}_B")
                r = a.shape[1]
                for e in range(a.shape[0]):
                    if init == "gaussian":
                        nn.init.normal_(a[e], std=1 / r)
                    else:
                        nn.init.kaiming_uniform_(a[e], a=math.sqrt(5))
                if init is False:
                    for e in range(b.shape[0]):
                        nn.init.kaiming_uniform_(b[e], a=math.sqrt(5))
                else:
                    b.zero_()


class _ExpertKeyAnchor(nn.Module):
    """An empty child named after an expert index. PEFT picks a tuner layer's saved keys by its children's names
    (``_get_tuner_state_dict_key_prefixes``); these anchors make ``<experts>.<e>.<proj>.lora_A...`` (the per-expert
    keys the state-dict hook writes) belong to the adapter. They hold nothing and never run."""


class Int4ExpertsLora(nn.Module, LoraLayer):
    """PEFT LoRA layer around :class:`Int4Experts` (see the module docstring)."""

    adapter_layer_names = ("lora_experts",)
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 0, lora_alpha: int = 1, **kwargs) -> None:
        nn.Module.__init__(self)
        # LoraLayer.__init__ would ask the base for in/out features, which an experts module does not have.
        self.base_layer = base_layer
        self.r, self.lora_alpha, self.scaling = {}, {}, {}
        self.lora_dropout = nn.ModuleDict({})
        self.lora_A, self.lora_B = nn.ModuleDict({}), nn.ModuleDict({})
        self.lora_embedding_A, self.lora_embedding_B = nn.ParameterDict({}), nn.ParameterDict({})
        self.lora_experts = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        self.use_dora, self.use_rslora, self.lora_bias = {}, {}, {}
        self.lora_magnitude_vector = nn.ModuleDict()
        self._caches = {}
        self.ephemeral_gpu_offload = False
        self.cast_input_dtype_enabled = True
        self.lora_variant = {}
        self.kwargs = kwargs
        self.in_features = base_layer.hidden_dim
        self.out_features = base_layer.hidden_dim
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, **kwargs)
        for e in range(base_layer.num_experts):
            self.add_module(str(e), _ExpertKeyAnchor())
        self._register_state_dict_hook(_save_per_expert)
        self.register_load_state_dict_pre_hook(_load_per_expert)

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights=True,
        use_rslora: bool = False,
        use_dora: bool = False,
        lora_bias: bool = False,
        **kwargs,
    ) -> None:
        if r <= 0:
            raise UnsupportedFormatError(f"experts LoRA rank must be positive, got r={r}.")
        if use_dora or lora_bias:
            raise UnsupportedFormatError("experts LoRA: DoRA and lora_bias are not supported (vLLM serves neither).")
        if init_lora_weights not in (True, False, "gaussian"):
            raise UnsupportedFormatError(
                f"experts LoRA: init_lora_weights={init_lora_weights!r} needs the dense base weight; use True, False "
                "or 'gaussian'."
            )
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = use_rslora
        self.use_dora[adapter_name] = False
        self.lora_bias[adapter_name] = False
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        adapter = _ExpertAdapter(self.base_layer, r)
        adapter.reset(init_lora_weights)
        self.lora_experts[adapter_name] = adapter
        self.set_adapter(self.active_adapters)

    def merge(self, *args, **kwargs) -> None:
        raise UnsupportedFormatError("merging LoRA into INT4 experts is not supported; export a merged model instead.")

    def unmerge(self, *args, **kwargs) -> None:
        raise UnsupportedFormatError("INT4 experts are never merged.")

    def forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        active = [a for a in self.active_adapters if a in self.lora_experts]
        if self.disable_adapters or not active:
            return self.base_layer(hidden_states, top_k_index, top_k_weights)
        if len(active) > 1:
            raise UnsupportedFormatError(f"Int4ExpertsLora runs one active adapter at a time, got {active}.")
        name = active[0]
        weights = self.lora_experts[name]
        lora = ExpertLora(
            *(getattr(weights, f"{part}_{ab}") for part in PARTS for ab in "AB"),
            scaling=self.scaling[name],
            dropout=self.lora_dropout[name],
        )
        return self.base_layer.forward_with_lora(hidden_states, top_k_index, top_k_weights, lora)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _names(layer: Int4ExpertsLora) -> dict[str, str]:
    gate, up, down = layer.base_layer.projection_names
    return {"gate": gate, "up": up, "down": down}


def _save_per_expert(layer, state_dict, prefix, local_metadata):
    """``lora_experts.<adapter>.<part>_<A|B>`` [E, ...] -> ``<e>.<proj>.lora_<A|B>.<adapter>.weight`` per expert."""
    names = _names(layer)
    for adapter in list(layer.lora_experts):
        for part in PARTS:
            for ab in "AB":
                key = f"{prefix}lora_experts.{adapter}.{part}_{ab}"
                stacked = state_dict.pop(key, None)
                if stacked is None:
                    continue
                for e in range(stacked.shape[0]):
                    state_dict[f"{prefix}{e}.{names[part]}.lora_{ab}.{adapter}.weight"] = stacked[e].clone()
    return state_dict


def _load_per_expert(layer, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """The reverse of :func:`_save_per_expert`, before the parameters load (keys without the per-expert form pass)."""
    names = _names(layer)
    num_experts = layer.base_layer.num_experts
    for adapter in list(layer.lora_experts):
        for part in PARTS:
            for ab in "AB":
                keys = [f"{prefix}{e}.{names[part]}.lora_{ab}.{adapter}.weight" for e in range(num_experts)]
                present = [k for k in keys if k in state_dict]
                if not present:
                    continue
                if len(present) != num_experts:
                    error_msgs.append(
                        f"{prefix}: per-expert LoRA {names[part]}.lora_{ab} found for {len(present)} of "
                        f"{num_experts} experts; an adapter must hold every expert."
                    )
                    continue
                state_dict[f"{prefix}lora_experts.{adapter}.{part}_{ab}"] = torch.stack(
                    [state_dict.pop(k) for k in keys]
                )


def install_transformers_conversion_passthrough() -> None:
    """Keep PEFT's transformers-5 adapter conversion away from per-expert keys of :class:`Int4ExpertsLora` layers
    (idempotent).

    Why: ``set_peft_model_state_dict`` runs ``convert_peft_adapter_state_dict_for_transformers``, which applies the
    model type's checkpoint conversion (``mlp.experts.*.gate_proj`` -> fused ``gate_up_proj``) to adapter keys and
    fuses per-expert LoRA tensors into the layout of PEFT's ``target_parameters`` wrapper. This layer reads the
    per-expert keys itself (its load pre-hook), so those keys are passed through unchanged; every other key is
    converted as before.
    """
    from peft.utils import transformers_weight_conversion as conversion

    current = conversion.convert_peft_adapter_state_dict_for_transformers
    if getattr(current, "_int4lora_original", None) is not None:
        return

    def convert(model, peft_config, adapter_state_dict, adapter_name="default"):
        prefixes = tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, Int4ExpertsLora))
        if not prefixes:
            return current(model, peft_config, adapter_state_dict, adapter_name)
        ours = {k: v for k, v in adapter_state_dict.items() if k.startswith(prefixes)}
        rest = {k: v for k, v in adapter_state_dict.items() if k not in ours}
        converted = current(model, peft_config, rest, adapter_name) if rest else {}
        return {**converted, **ours}

    convert._int4lora_original = current
    conversion.convert_peft_adapter_state_dict_for_transformers = convert
