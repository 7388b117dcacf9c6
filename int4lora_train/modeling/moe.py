"""Mixture-of-experts models: which ones, how their per-expert checkpoint tensors map onto transformers 5's fused
experts module, and the one place that turns experts into :class:`Int4Experts`.

Checkpoints (llm-compressor, GPTQ, AWQ; and what vLLM reads) store every expert's projections as separate 2-D
linears; transformers 5 fuses them into ``gate_up_proj [E, 2I, H]`` (gate rows, then up rows) and
``down_proj [E, H, I]`` (``conversion_mapping.py``: ``MergeModulelist(dim=0)`` then ``Concatenate(dim=1)``)::

    model type   checkpoint (per expert e)                                    model (fused)
    qwen3_moe    model.layers.L.mlp.experts.e.{gate,up,down}_proj.<tensors>     model.layers.L.mlp.experts
    qwen2_moe    same, plus a dense shared_expert MLP (stays Int4Linear) and     same
                 shared_expert_gate [1, H]
    mixtral      model.layers.L.block_sparse_moe.experts.e.{w1,w3,w2}.<...>      model.layers.L.mlp.experts
                 (w1 = gate, w3 = up, w2 = down; the router block_sparse_moe.gate is the model's mlp.gate)

``<tensors>`` is any registered INT4 format's module tensors (compressed-tensors ``weight_packed`` /
``weight_scale`` / ``weight_shape`` [/ ``weight_zero_point``], GPTQ ``qweight`` / ``qzeros`` / ``scales``, AWQ),
read with the scheme the quantization config gives the expert's checkpoint name. The loader
(:mod:`int4lora_train.modeling.loader`) asks :func:`plan_experts` for the experts' tensors and
:func:`install_experts` to build each :class:`Int4Experts` from them; nothing dense is made.

The router (``mlp.gate``, a ``[E, H]`` parameter, not a ``Linear`` in transformers) and Qwen2-MoE's
``shared_expert_gate`` stay dense: llm-compressor's MoE recipes ignore them (``re:.*mlp.gate$``), and vLLM's CPU
INT4 kernel cannot take a one-row linear.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from int4lora_train.errors import CheckpointError, UnsupportedFormatError
from int4lora_train.modeling.int4_experts import Int4Experts, is_fused_experts_module
from int4lora_train.quant.experts import Int4ExpertStack, shared_symmetry
from int4lora_train.quant.formats import format_named, read_int4_weight
from int4lora_train.quant.layout import Int4Weight

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MoESpec:
    """How one model type's checkpoint names its experts (see the module docstring)."""

    model_type: str
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    checkpoint_block: str | None = None
    """The checkpoint's name of the MoE block where it differs from the model's ``mlp`` (Mixtral)."""

    @property
    def projections(self) -> tuple[str, str, str]:
        return self.gate, self.up, self.down

    def to_model_key(self, key: str) -> str:
        if self.checkpoint_block is None:
            return key
        return key.replace(f".{self.checkpoint_block}.", ".mlp.")

    def to_checkpoint_key(self, key: str) -> str:
        if self.checkpoint_block is None:
            return key
        return key.replace(".mlp.", f".{self.checkpoint_block}.")

    @property
    def router_ignore(self) -> tuple[str, ...]:
        """The quantization config's ignore entries for the routers (checkpoint names), as llm-compressor writes."""
        block = re.escape(self.checkpoint_block or "mlp")
        return (f"re:.*{block}\\.gate$", "re:.*shared_expert_gate$")


MOE_SPECS: dict[str, MoESpec] = {
    "qwen3_moe": MoESpec("qwen3_moe"),
    "qwen2_moe": MoESpec("qwen2_moe"),
    "mixtral": MoESpec("mixtral", "w1", "w3", "w2", checkpoint_block="block_sparse_moe"),
}


def moe_spec_for(model_or_config) -> MoESpec | None:
    config = getattr(model_or_config, "config", model_or_config)
    return MOE_SPECS.get(getattr(config, "model_type", None))


def _supported_spec(model) -> MoESpec:
    """:func:`moe_spec_for` ``model``, which must be one of :data:`MOE_SPECS`."""
    spec = moe_spec_for(model)
    if spec is None:
        raise UnsupportedFormatError(
            f"model_type {getattr(model.config, 'model_type', None)!r} is not a supported MoE."
        )
    return spec


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every fused experts module (transformers' dense / meta ones, and :class:`Int4Experts`), by name."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, Int4Experts) or is_fused_experts_module(module)
    ]


# --------------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class ExpertsPlan:
    """One experts module to load: per ``(expert, projection)`` its scheme and its tensors' checkpoint keys. The
    flat ``keys`` (``"e.proj.local" -> key``) are the loader's request."""

    name: str
    spec: MoESpec
    num_experts: int
    schemes: dict[tuple[int, str], object]
    keys: dict[str, str]


def rename_checkpoint(model: nn.Module, checkpoint):
    """The checkpoint with its keys in the model's names (Mixtral's ``block_sparse_moe`` -> ``mlp``)."""
    spec = moe_spec_for(model)
    if spec is None or spec.checkpoint_block is None:
        return checkpoint
    return checkpoint.renamed(spec.to_model_key)


def plan_experts(model: nn.Module, quant_config, checkpoint, config_path: Path) -> dict[str, ExpertsPlan]:
    """The INT4 tensors of every experts module of the skeleton ``model``; errors name what is missing."""
    spec = moe_spec_for(model)
    modules = experts_modules(model)
    if not modules:
        return {}
    if spec is None:
        raise UnsupportedFormatError(
            f"{config_path}: model_type {getattr(model.config, 'model_type', None)!r} has fused MoE experts "
            f"({modules[0][0]}: {type(modules[0][1]).__name__}); INT4 experts are supported for "
            f"{sorted(MOE_SPECS)}."
        )
    stored = checkpoint.modules()
    plans = {}
    for name, module in modules:
        num_experts = module.gate_up_proj.shape[0]
        schemes, keys = {}, {}
        for e in range(num_experts):
            for proj in spec.projections:
                module_name = f"{name}.{e}.{proj}"
                scheme = quant_config.scheme_for(spec.to_checkpoint_key(module_name), "Linear")
                if scheme is None:
                    raise UnsupportedFormatError(
                        f"{config_path}: expert projection {spec.to_checkpoint_key(module_name)} is not quantized "
                        "(ignored or not targeted by the quantization config); only checkpoints whose experts are "
                        "all INT4 are supported. Quantize the experts, or load the model with transformers."
                    )
                if scheme.dequantize:
                    raise UnsupportedFormatError(
                        f"{config_path}: expert projection {spec.to_checkpoint_key(module_name)} is in an 8-bit "
                        f"group ({scheme.describe()}); 8-bit groups are dequantized at load only for plain linear "
                        "layers, and experts must be INT4. Re-quantize the experts with W4A16."
                    )
                fmt = format_named(scheme.format)
                own = stored.get(module_name, {})
                for local in fmt.required_tensor_names(scheme):
                    if local not in own:
                        raise CheckpointError(
                            f"missing tensor {spec.to_checkpoint_key(module_name)}.{local} of INT4 expert {e} "
                            f"({scheme.format}): not found in {checkpoint.where}; the checkpoint is incomplete or "
                            "its quantization_config does not describe it."
                        )
                schemes[(e, proj)] = scheme
                keys.update({f"{e}.{proj}.{local}": key for local, key in own.items() if local in fmt.tensor_names})
        plans[name] = ExpertsPlan(name, spec, num_experts, schemes, keys)
    return plans


def install_experts(model: nn.Module, plan: ExpertsPlan, tensors: dict, device, compute_dtype) -> Int4Experts:
    """Read one experts module's INT4 tensors (``"e.proj.local" -> tensor``), stack them and put an
    :class:`Int4Experts` in the skeleton's place; returns it."""
    grouped: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for flat, tensor in tensors.items():
        e, proj, local = flat.split(".", 2)
        grouped.setdefault((int(e), proj), {})[local] = tensor
    spec = plan.spec

    def weight(e: int, proj: str) -> Int4Weight:
        name = spec.to_checkpoint_key(f"{plan.name}.{e}.{proj}")
        return read_int4_weight(grouped[(e, proj)], name, plan.schemes[(e, proj)])

    module = model.get_submodule(plan.name)
    new = experts_from_weights(
        module,
        [weight(e, spec.gate) for e in range(plan.num_experts)],
        [weight(e, spec.up) for e in range(plan.num_experts)],
        [weight(e, spec.down) for e in range(plan.num_experts)],
        plan.name,
        device=device,
        compute_dtype=compute_dtype,
        projection_names=spec.projections,
    )
    _replace(model, plan.name, new)
    return new


def experts_from_weights(
    module: nn.Module,
    gates,
    ups,
    downs,
    name: str,
    device=None,
    compute_dtype=None,
    backend=None,
    projection_names=("gate_proj", "up_proj", "down_proj"),
) -> Int4Experts:
    """An :class:`Int4Experts` replacing the transformers experts ``module`` from per-expert canonical weights
    (gate and up stacked along the output axis per expert, as transformers' ``gate_up_proj``).

    Every expert's gate must share one symmetry and so must every up (:func:`shared_symmetry`), but gate and up may
    differ: then the symmetric one's zero points are stacked as zeros and :class:`Int4Experts` is told which half is
    symmetric (its fingerprint hashes no zeros the checkpoint lacks).
    """
    gate_up_symmetric = (
        shared_symmetry(gates, f"{name}.{projection_names[0]}"),
        shared_symmetry(ups, f"{name}.{projection_names[1]}"),
    )
    gate_up = [
        Int4Weight.create(
            torch.cat([g.packed, u.packed]),
            torch.cat([g.scales.contiguous(), u.scales.contiguous()]),
            g.in_features,
            g.group_size,
            None if all(gate_up_symmetric) else torch.cat([g.zero_points_or_zeros(), u.zero_points_or_zeros()]),
            name=f"{name}.{e}.gate_up",
        )
        if g.group_size == u.group_size and g.packed.shape[1] == u.packed.shape[1]
        else _mismatch(name, e)
        for e, (g, u) in enumerate(zip(gates, ups))
    ]
    gate_up_stack = Int4ExpertStack.from_weights(gate_up, f"{name}.gate_up_proj")
    down_stack = Int4ExpertStack.from_weights(downs, f"{name}.down_proj")
    expected = tuple(module.gate_up_proj.shape), tuple(module.down_proj.shape)
    got = (
        (gate_up_stack.num_experts, gate_up_stack.out_features, gate_up_stack.in_features),
        (down_stack.num_experts, down_stack.out_features, down_stack.in_features),
    )
    if got != expected:
        raise CheckpointError(
            f"{name}: the INT4 experts are gate_up {list(got[0])} and down {list(got[1])} (experts, out, in), but the "
            f"model config builds {list(expected[0])} and {list(expected[1])}; the config and the weights are from "
            "different models."
        )
    if device is not None:
        gate_up_stack, down_stack = gate_up_stack.to(device), down_stack.to(device)
    new = Int4Experts(
        gate_up_stack,
        down_stack,
        module.act_fn,
        compute_dtype=compute_dtype,
        backend=backend,
        name=name,
        projection_names=projection_names,
        gate_up_symmetric=gate_up_symmetric,
    )
    new.source_class = type(module)
    return new


def _mismatch(name: str, e: int):
    raise CheckpointError(f"{name}.{e}: gate and up projections have different group sizes or packed widths.")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


# ------------------------------------------------------------------------------------- in memory, checkpoints


def quantize_experts_rtn(
    model: nn.Module,
    group_size: int | None = 128,
    symmetric: bool = True,
    strategy: str = "group",
    scale_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> list[str]:
    """Replace every dense experts module of ``model`` by an :class:`Int4Experts` quantized per expert and per
    projection with the toolkit's RTN packer (as a checkpoint written by :func:`save_int4_moe_checkpoint` would
    load); returns the names replaced."""
    from int4lora_train.quant.packer import quantize_rtn

    def q(dense):
        return quantize_rtn(
            dense, group_size=group_size, symmetric=symmetric, strategy=strategy, scale_dtype=scale_dtype
        )

    spec = moe_spec_for(model) or MoESpec("unknown")
    names = []
    for name, module in experts_modules(model):
        if isinstance(module, Int4Experts):
            continue
        gate_up, down = module.gate_up_proj.detach(), module.down_proj.detach()
        inter = gate_up.shape[1] // 2
        new = experts_from_weights(
            module,
            [q(w[:inter]) for w in gate_up],
            [q(w[inter:]) for w in gate_up],
            [q(w) for w in down],
            name,
            compute_dtype=compute_dtype,
            backend=backend,
            projection_names=spec.projections,
        )
        _replace(model, name, new)
        names.append(name)
    return names


def dequantized_moe_copy(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A deep copy of ``model`` with every ``Int4Linear`` and :class:`Int4Experts` replaced by transformers' own
    dense modules holding the dequantized weights in ``dtype``: the dense model the INT4 one computes."""
    from int4lora_train.modeling.surgery import dequantized_copy

    dense = dequantized_copy(model, dtype)
    for name, module in experts_modules(dense):
        if not isinstance(module, Int4Experts):
            continue
        source = getattr(module, "source_class", None)
        if source is None:
            raise UnsupportedFormatError(f"{name}: Int4Experts does not know the transformers class it replaced.")
        config = getattr(dense, "config", None)
        with torch.device("meta"):
            ref = source(config)
        ref.gate_up_proj = nn.Parameter(module.dequantize("gate_up", dtype), requires_grad=False)
        ref.down_proj = nn.Parameter(module.dequantize("down", dtype), requires_grad=False)
        _replace(dense, name, ref)
    return dense


def moe_checkpoint_stream(
    model: nn.Module,
    group_size: int | None = 128,
    symmetric: bool = True,
    strategy: str = "group",
    quantize_linears: bool = True,
    ignore: tuple[str, ...] = ("lm_head",),
) -> Iterator[tuple[str, torch.Tensor | Int4Weight]]:
    """A dense MoE model's state as a per-expert INT4 checkpoint stream in the checkpoint's names (for
    :func:`int4lora_train.quant.packer.write_int4_checkpoint`): every expert projection quantized with the RTN
    packer, other linears too (``quantize_linears``, except ``ignore`` and the routers), the rest dense."""
    from int4lora_train.quant.packer import quantize_rtn
    from int4lora_train.quant.scheme import _matches

    spec = _supported_spec(model)

    def q(dense, name):
        return quantize_rtn(dense, group_size=group_size, symmetric=symmetric, strategy=strategy, name=name)

    experts = dict(experts_modules(model))
    ignored = (*ignore, *spec.router_ignore)
    linears = {
        name
        for name, module in model.named_modules()
        if quantize_linears
        and isinstance(module, nn.Linear)
        and not any(_matches(spec.to_checkpoint_key(name), (), entry) for entry in ignored)
    }
    seen = set()
    for key, tensor in model.state_dict().items():
        module_name, _, local = key.rpartition(".")
        identity = (tensor.data_ptr(), tuple(tensor.shape))
        if identity in seen and tensor.numel():
            continue
        seen.add(identity)
        if module_name in experts and local in ("gate_up_proj", "down_proj"):
            for e in range(tensor.shape[0]):
                prefix = spec.to_checkpoint_key(f"{module_name}.{e}")
                if local == "gate_up_proj":
                    inter = tensor.shape[1] // 2
                    yield f"{prefix}.{spec.gate}", q(tensor[e, :inter], f"{prefix}.{spec.gate}")
                    yield f"{prefix}.{spec.up}", q(tensor[e, inter:], f"{prefix}.{spec.up}")
                else:
                    yield f"{prefix}.{spec.down}", q(tensor[e], f"{prefix}.{spec.down}")
        elif module_name in linears and local == "weight":
            yield spec.to_checkpoint_key(module_name), q(tensor, spec.to_checkpoint_key(module_name))
        else:
            yield spec.to_checkpoint_key(key), tensor


def save_int4_moe_checkpoint(
    model: nn.Module,
    out_dir,
    format: str = "compressed-tensors",
    group_size: int | None = 128,
    symmetric: bool = True,
    strategy: str = "group",
    quantize_linears: bool = True,
    ignore: tuple[str, ...] = ("lm_head",),
    tokenizer=None,
    overwrite: bool = False,
    checkpoint_format: str = "gptq",
) -> Path:
    """Write a dense transformers MoE ``model`` as an INT4 checkpoint with per-expert tensors, as llm-compressor /
    GPTQ / AWQ tools write them (the toolkit's RTN packer, :func:`moe_checkpoint_stream`); the routers and, unless
    ``quantize_linears``, every other linear stay dense and are listed in the config's ignore."""
    from int4lora_train.quant.packer import model_checkpoint_config, write_int4_checkpoint

    spec = _supported_spec(model)
    dense_linears = [
        spec.to_checkpoint_key(n)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not quantize_linears and n.rpartition(".")[2] not in ignore
    ]
    ignore_all = tuple(dict.fromkeys([*ignore, *spec.router_ignore, *dense_linears]))
    dtype, config = model_checkpoint_config(model)
    return write_int4_checkpoint(
        config,
        moe_checkpoint_stream(model, group_size, symmetric, strategy, quantize_linears, ignore),
        out_dir,
        format=format,
        group_size=group_size,
        symmetric=symmetric,
        strategy=strategy,
        ignore=ignore_all,
        checkpoint_format=checkpoint_format,
        tokenizer=tokenizer,
        overwrite=overwrite,
        dtype=dtype,
    )


def experts_report_entry(name: str, plan: ExpertsPlan, experts: Int4Experts):
    """The loader report's entry of one experts module (sizes per expert; bytes for all of them)."""
    from int4lora_train.modeling.surgery import ConvertedModule

    scheme = plan.schemes[(0, plan.spec.gate)]
    return ConvertedModule(
        name=name,
        source_format=f"{scheme.format} experts x{experts.num_experts}",
        in_features=experts.hidden_dim,
        out_features=2 * experts.intermediate_dim,
        group_size=experts.group_sizes["gate_up"],
        symmetric=experts.gate_up_zero_points is None,
        g_idx=False,
        nbytes=experts.nbytes,
    )
