"""FSDP2 for INT4 models: shard the packed INT4 weights, the LoRA parameters and the optimizer state over processes.

These are FSDP's primitives; the trainer reaches them only through
:class:`~int4lora_train.train.strategy.FSDPStrategy`, which decides when each is called.

With ``train.strategy: ddp`` every process holds the whole INT4 model; with ``fsdp`` each holds ``1/N`` of it::

    per process          DDP                        FSDP (N processes)
    INT4 weights         all                        rows [r*out/N, (r+1)*out/N) of every packed / scales /
                                                    zero_points tensor (g_idx: its slice of the input columns)
    LoRA A, B            all                        1/N of the rows of each
    AdamW state          all                        1/N (the state of the local rows)
    during a layer's     -                          that layer's whole INT4 tensors and LoRA (all-gathered,
    forward / backward                              freed after it: ``train.fsdp.reshard_after_forward``)

**How the INT4 tensors get sharded.** FSDP shards parameters; ``Int4Linear`` keeps its INT4 tensors as buffers,
which FSDP would replicate on every process. :func:`int4_buffers_to_parameters` re-registers them, under the same
names and without a copy, as frozen parameters (``requires_grad=False``) just before wrapping; the forward reads
``self.packed`` etc. exactly as before, and FSDP's pre-forward hook puts the all-gathered tensors there. The choice,
against the two other known designs:

- *4-bit data stored in a float-typed parameter* (fsdp_qlora / bitsandbytes ``quant_storage=bfloat16``) exists
  because FSDP1 flattens a unit's parameters into one tensor of one dtype. FSDP2 keeps per-parameter DTensors and
  all-gathers a unit whose parameters have mixed dtypes as raw bytes (``torch.uint8``; see
  ``_get_all_gather_input_metadatas`` in ``torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py``), so the bytes
  travel as they are whatever dtype they are viewed in. But FSDP2 before torch 2.13 cannot *create* an integer
  parameter (:func:`float_storage` says why), so the integer tensors are stored as same-width float views
  (``packed`` / ``zero_points`` as float8_e4m3fn, ``g_idx`` as float32: same shape, same bytes, no copy) and
  ``Int4Linear.int4_tensors`` views them back; scales stay as they are.
- *A tensor subclass with* ``fsdp_pre_all_gather`` / ``fsdp_post_all_gather`` (torchao's NF4Tensor) pays off when
  the gathered form must differ from the stored one (e.g. dequantize after the gather). Here the gathered form is the
  stored form, and a subclass would have to support every op the forward, PEFT, state dicts and the fingerprint
  apply to it, on torch 2.11 and 2.13 alike.
- *Frozen parameters* (chosen, with those float views): zero-copy, same state-dict keys and module attributes, reversible
  (:func:`int4_parameters_to_buffers`), and the forward reads the very bytes the checkpoint holds, so it is
  bit-identical to the unsharded model. Verified on torch 2.13 (CPU, gloo): FSDP2 ``fully_shard`` accepts uint8 /
  int8 / int32 parameters with ``requires_grad=False`` next to fp32 trainable ones in one unit, shards ``[1, G]``
  per-tensor scales unevenly (one process holds an empty shard), and the all-gathered tensors equal the originals.
  Mixed-dtype byte all-gather is in torch since FSDP2's first releases, so torch 2.11 (the GPU machines) has it too.

Mixed precision: the FSDP ``MixedPrecisionPolicy`` casts *every floating parameter* of a unit to ``param_dtype``
(it would turn fp16 scales into bf16, changing the dequantized weights), and reduces gradients in ``reduce_dtype``.
So no FSDP casting is configured; mixed precision is the same ``torch.autocast`` the DDP path uses
(:func:`prepare_fsdp` wraps the forward like accelerate's ``prepare_model``), LoRA weights and their gradient
reduction stay fp32, and an FSDP run computes what a DDP run computes up to the reduction order.

Where accelerate comes in: the sharding itself is accelerate's FSDP2 path (``FullyShardedDataParallelPlugin`` with
``fsdp_version=2``: one ``fully_shard`` unit per decoder layer, embeddings and the output head in their own units,
the root last, the optimizer's parameters swapped for the sharded ones). accelerate turns its FSDP plugin on only
for GPU-like process groups; on CPUs (gloo: tests, CI) :func:`activate_fsdp` switches the accelerator's
state to FSDP itself, so the CPU tests run the same accelerate code path the GPUs do.

Checkpoints (:mod:`int4lora_train.train.checkpoint`): the LoRA tensors are gathered into full tensors (small: the
adapter) and saved by the main process as in DDP; the optimizer state stays sharded, one file per process
(:func:`local_optimizer_state` / :func:`load_local_optimizer_state`), so resuming needs the same number of
processes. Exports gather the full adapter on every process and the main process writes it
(:func:`save_gathered_adapter`); the base's fingerprint then comes from the INT4 checkpoint directory.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MethodType
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..modeling.int4_linear import Int4Linear
from ..quant.layout import INT4_INTEGER_DTYPES, INT4_TENSOR_NAMES  # the INT4 tensors FSDP shards

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# INT4 buffers <-> frozen parameters


def int4_buffers_to_parameters(model: nn.Module) -> int:
    """Re-register every ``Int4Linear``'s INT4 buffers as frozen ``nn.Parameter``\\ s (same names, no copy).

    ``packed`` uint8 ``[out, in/2]``, ``scales`` ``[out, G]`` (or ``[1, 1]``), ``zero_points`` int8 ``[out, G]``,
    ``g_idx`` int32 ``[in]`` become parameters with ``requires_grad=False`` (the integer ones viewed as floats of the
    same width, :func:`float_storage`); absent ones (None) stay None buffers. The layer's forward is unchanged (it
    reads them through ``Int4Linear.int4_tensors``, which views them back). Idempotent; returns the number of layers
    converted by this call. Do not cast the model's dtype afterwards (``model.to(dtype)``): the scales' dtype is
    part of the exact weight and ``Int4Linear`` protects it only while it is a buffer.
    """
    return _reregister_int4_tensors(model, as_parameters=True)


def int4_parameters_to_buffers(model: nn.Module) -> int:
    """Undo :func:`int4_buffers_to_parameters` on a model that is not sharded; returns the layers converted back.

    Raises ``ConfigError`` for a sharded (FSDP-wrapped) model: its parameters are shards, not whole tensors.
    """
    return _reregister_int4_tensors(model, as_parameters=False)


FLOAT_STORAGE = {1: torch.float8_e4m3fn, 2: torch.bfloat16, 4: torch.float32}
"""Per element size, the float dtype an integer INT4 tensor is viewed as while it is an FSDP parameter."""


def float_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` viewed (no copy, same shape, same bytes) as a float dtype of its element size when it is an integer
    tensor; float tensors as they are.

    FSDP2 in torch < 2.13 creates its sharded parameters as ``nn.Parameter(dtensor)`` and only then sets
    ``requires_grad``, which raises "only Tensors of floating point dtype can require gradients" for uint8 / int8 /
    int32 parameters (pytorch issues #177844, #185239; fixed in 2.13). A float view passes on every version, and FSDP
    only ever copies these bytes (shards, pads, all-gathers them as raw bytes), never computes on them.
    ``Int4Linear.int4_tensors`` views them back to their canonical dtypes.
    """
    if tensor.is_floating_point():
        return tensor
    return tensor.view(FLOAT_STORAGE[tensor.element_size()])


def _reregister_int4_tensors(model: nn.Module, as_parameters: bool) -> int:
    """Move every ``Int4Linear``'s INT4 tensors between its buffers and its (frozen) parameters, same names, no
    copy; returns the number of layers changed."""
    converted = 0
    for module in model.modules():
        if not isinstance(module, Int4Linear):
            continue
        source, target = (
            (module._buffers, module._parameters) if as_parameters else (module._parameters, module._buffers)
        )
        changed = False
        for name in INT4_TENSOR_NAMES:
            tensor = source.get(name)
            if tensor is None:
                continue
            if not as_parameters and is_sharded(tensor):
                raise ConfigError(
                    f"{type(module).__name__}.{name} is an FSDP shard; INT4 parameters of a sharded model cannot "
                    "become buffers again (gather what you need with full_trainable_state instead)"
                )
            del source[name]
            if as_parameters:
                target[name] = nn.Parameter(float_storage(tensor), requires_grad=False)
            else:
                target[name] = tensor.detach().view(INT4_INTEGER_DTYPES.get(name, tensor.dtype))
            changed = True
        converted += changed
    return converted


# ---------------------------------------------------------------------------------------------------------------
# Sharded tensors


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP-sharded parameter, its gradient or its optimizer state)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of ``tensor`` (the tensor itself when it is not sharded)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of ``tensor``: all-gathered if sharded (a collective: every process must call it), else itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def full_trainable_state(named_params: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{name: full CPU copy}`` of ``named_params`` (the LoRA parameters), gathered on every process.

    A collective when the parameters are sharded: every process calls it with the same names in the same order.
    """
    return {name: full_tensor(param.detach()).to("cpu", copy=True) for name, param in named_params}


def shard_like(saved: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``saved`` full tensors laid out like the (sharded) ``params`` of the same names, for ``param.copy_``.

    Names not in ``params``, and tensors whose parameter is not sharded, are returned unchanged (the caller's checks
    report missing / unexpected / mis-shaped tensors). A collective over the sharded names (``distribute_tensor``
    scatters from process 0), so every process calls it with the same ``saved`` keys.
    """
    from torch.distributed.tensor import distribute_tensor

    out = dict(saved)
    for name in sorted(saved):
        param = params.get(name)
        if param is None or not is_sharded(param):
            continue
        full = saved[name].to(device=param.device, dtype=param.dtype)
        out[name] = distribute_tensor(full, param.device_mesh, param.placements)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Optimizer state, sharded


def _ordered_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters in ``optimizer.state_dict()``'s index order (param groups in order, then their params)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def local_optimizer_state(optimizer: torch.optim.Optimizer, rank: int, world_size: int) -> dict[str, Any]:
    """This process's optimizer state: ``optimizer.state_dict()`` with each sharded tensor replaced by its local part.

    Adds ``shard_shapes`` (each state tensor's whole shape) and the process layout, which
    :func:`load_local_optimizer_state` checks. Loadable with ``torch.load(weights_only=True)``.
    """
    state_dict = optimizer.state_dict()
    shapes: dict[int, dict[str, list[int]]] = {}
    local_state: dict[int, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        local_state[index] = {}
        for key, value in entry.items():
            if is_sharded(value):
                shapes.setdefault(index, {})[key] = list(value.shape)
                value = value.to_local()
            local_state[index][key] = value.detach().to("cpu", copy=True) if torch.is_tensor(value) else value
    return {
        "state": local_state,
        "param_groups": state_dict["param_groups"],
        "shard_shapes": shapes,
        "rank": rank,
        "world_size": world_size,
    }


def load_local_optimizer_state(
    optimizer: torch.optim.Optimizer, saved: Mapping[str, Any], rank: int, world_size: int, source: str
) -> None:
    """Load what :func:`local_optimizer_state` saved on this process back into the (sharded) ``optimizer``.

    Raises ``CheckpointError`` when the shard was written by another process layout or for other parameters.
    """
    from torch.distributed.tensor import DTensor

    if "shard_shapes" not in saved:
        raise CheckpointError(
            f"{source} holds a whole (DDP) optimizer state, not this process's FSDP shard; resume with "
            "train.strategy: ddp, or start a new run"
        )
    if (saved.get("rank"), saved.get("world_size")) != (rank, world_size):
        raise CheckpointError(
            f"{source} is the optimizer shard of process {saved.get('rank')} of {saved.get('world_size')}, but this "
            f"is process {rank} of {world_size}; an FSDP checkpoint resumes with the same number of processes"
        )
    params = _ordered_params(optimizer)
    state: dict[int, dict[str, Any]] = {}
    for index, entry in saved["state"].items():
        if index >= len(params):
            raise CheckpointError(
                f"{source}: optimizer state for parameter #{index}, but the optimizer has "
                f"{len(params)}; resume with the same model and lora settings"
            )
        param = params[index]
        state[index] = {}
        for key, value in entry.items():
            shape = saved["shard_shapes"].get(index, {}).get(key)
            if shape is not None:
                if not is_sharded(param) or list(param.shape) != shape:
                    raise CheckpointError(
                        f"{source}: optimizer state {key} of parameter #{index} has shape {shape}, the parameter "
                        f"{list(param.shape)}; resume with the same model, lora settings and train.strategy"
                    )
                local = value.to(device=param.device)
                if tuple(local.shape) != tuple(param.to_local().shape):
                    raise CheckpointError(
                        f"{source}: the local optimizer shard of parameter #{index} has shape "
                        f"{tuple(local.shape)}, this process holds {tuple(param.to_local().shape)}"
                    )
                value = DTensor.from_local(
                    local,
                    param.device_mesh,
                    param.placements,
                    run_check=False,
                    shape=param.shape,
                    stride=param.stride(),
                )
            state[index][key] = value
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


# ---------------------------------------------------------------------------------------------------------------
# Accelerate: the plugin, the accelerator, preparing the model


def fsdp_plugin(reshard_after_forward: bool = True, wrap_classes: list[str] | None = None):
    """accelerate's FSDP2 plugin as the toolkit uses it (see the module docstring for why no FSDP mixed precision).

    ``wrap_classes``: class names of the blocks that become one FSDP unit each (default: the model's
    ``_no_split_modules``, its decoder layer).
    """
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=reshard_after_forward,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=list(wrap_classes) if wrap_classes else None,
        mixed_precision_policy=MixedPrecisionPolicy(),  # no casting: autocast does mixed precision
        state_dict_type="SHARDED_STATE_DICT",
        cpu_ram_efficient_loading=False,  # every process loads the INT4 model itself (memory-mapped on the CPU)
        activation_checkpointing=False,  # train.gradient_checkpointing uses transformers' own, with RNG restore
    )


def fsdp_requested(strategy: str, num_processes: int) -> bool:
    """Whether to give accelerate the toolkit's FSDP plugin: ``train.strategy: fsdp`` with several processes, or
    under an ``accelerate launch`` FSDP config (which would otherwise build its own plugin from the environment,
    with FSDP mixed precision and the INT4 tensors left as buffers).

    Raises ``ConfigError`` for an FSDP launch with ``train.strategy: ddp``, which would shard nothing of the INT4
    weights while the user expects it to.
    """
    launched_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if launched_fsdp and strategy != "fsdp":
        raise ConfigError(
            "accelerate launch was configured for FSDP (distributed_type: FSDP) but train.strategy is "
            f"{strategy!r}; set train.strategy: fsdp (configs/multi_gpu_fsdp.yaml), or launch with a DDP config"
        )
    if strategy == "fsdp" and num_processes == 1 and not launched_fsdp:
        logger.warning("train.strategy is fsdp but this run has one process: nothing to shard, training unsharded")
    return strategy == "fsdp" and (num_processes > 1 or launched_fsdp)


def activate_fsdp(accelerator, plugin) -> bool:
    """Make ``accelerator`` (created with ``fsdp_plugin=plugin``) run FSDP2; True if it does.

    On GPUs accelerate has done it already. It enables ``fsdp_plugin`` only for GPU-like process groups
    (``AcceleratorState``), while FSDP2 itself runs on gloo too; so on CPUs this sets the state's
    ``distributed_type`` and ``fsdp_plugin`` as accelerate does for GPUs, and ``prepare`` takes its FSDP2 path.
    Collectives keep using the process group (``PartialState`` is untouched). False with a single process.
    """
    from accelerate.utils import DistributedType

    state = accelerator.state
    if accelerator.num_processes > 1 and state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
    return bool(accelerator.is_fsdp2)


def prepare_fsdp(
    accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, *, all_gathers_on_compute_stream: bool = True
):
    """Shard ``model`` (INT4 tensors included) and switch ``optimizer`` to the shards; returns ``(model, optimizer)``.

    Every process calls it with the same, whole model. Then: the INT4 buffers become frozen parameters, accelerate's
    FSDP2 preparation shards each decoder layer (then embeddings, head, root), and the forward is wrapped in the
    accelerator's autocast exactly as its DDP preparation does (accelerate's FSDP2 path relies on FSDP mixed
    precision instead, which the toolkit leaves off). With ``all_gathers_on_compute_stream`` (the default) FSDP's
    all-gathers run on the compute stream (:func:`gather_on_compute_stream`). The model's training setup stays as it
    is.
    """
    converted = int4_buffers_to_parameters(model)
    logger.debug("FSDP: %d Int4Linear layers hold their INT4 tensors as frozen parameters", converted)
    # The fused LoRA node (and the q/k/v, gate/up groups) read the INT4 tensors through Int4Linear.int4_tensors
    # (buffers or these parameters) and the LoRA weights inside the decoder layer's forward, where FSDP has gathered
    # that layer's unit. The chunked loss runs as the output head's forward (chunked_loss.call_as_forward), where
    # FSDP has gathered the head.
    model, optimizer = accelerator.prepare(model, optimizer)
    if all_gathers_on_compute_stream:
        gather_on_compute_stream(model)
    if accelerator.native_amp:
        _wrap_forward_in_autocast(accelerator, model)
    return model, optimizer


def gather_on_compute_stream(model: nn.Module) -> int:
    """Make every FSDP2 unit of ``model`` gather its shards on the stream that computes, in program order.

    FSDP2 runs the all-gathers of its implicit prefetching on two side streams (copy-in, collective) so that they
    overlap compute. On CUDA with torch 2.11 that path made some runs read a gathered frozen tensor wrong: in the
    micro-batch after a backward, one process's half of the final norm's weight (or two rows of the embedding at
    the shard boundary), found by ``tests/train/fsdp_recorder.py`` in 5 of 6 runs; on the compute stream none of 7
    runs did (issue 12, BENCHMARKS.md). The cost is the overlap: each unit's gather waits for the compute before it.

    Replaces, on each unit's communication context (FSDP2's private ``FSDPCommContext``, shared by the units after
    the first forward), the choice of streams with the current stream for both. Returns the number of contexts
    changed (0 for a model without FSDP2 units). Idempotent.
    """
    contexts = {}
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        if get_state is not None:
            context = getattr(get_state(), "_comm_ctx", None)
            if context is None or not hasattr(context, "get_all_gather_streams"):
                raise ConfigError(
                    f"train.fsdp.all_gather_stream: compute needs FSDP2's communication context, which torch "
                    f"{torch.__version__} does not have where torch 2.11-2.13 keep it; set "
                    "train.fsdp.all_gather_stream: separate (FSDP2's own streams; see issue 12 for the risk on GPUs)"
                )
            contexts[id(context)] = context
    for context in contexts.values():
        context.get_all_gather_streams = MethodType(_current_stream_twice, context)
    return len(contexts)


def _current_stream_twice(context, async_op: bool, training_state) -> tuple:
    """``FSDPCommContext.get_all_gather_streams`` with the current stream as copy-in and all-gather stream."""
    stream = context.device_handle.current_stream()
    return stream, stream


def _wrap_forward_in_autocast(accelerator, model: nn.Module) -> None:
    """What ``Accelerator.prepare_model`` does for DDP: forward under autocast, outputs cast to fp32, and
    ``_original_forward`` kept so that ``unwrap_model(keep_fp32_wrapper=False)`` restores it."""
    from accelerate.utils import convert_outputs_to_fp32, get_mixed_precision_context_manager

    autocast = get_mixed_precision_context_manager(accelerator.native_amp, accelerator.autocast_handler)
    model._original_forward = model.forward
    forward = model.forward.__func__ if hasattr(model.forward, "__func__") else model.forward
    model.forward = MethodType(convert_outputs_to_fp32(autocast(forward)), model)


# ---------------------------------------------------------------------------------------------------------------
# Evidence and exports


def sharding_report(model: nn.Module, rank: int) -> dict[str, Any]:
    """What this process holds: local and whole element counts and bytes of the INT4 tensors, by name, and of the
    trainable (LoRA) parameters. Plain numbers (JSON-ready)."""
    int4 = {name: {"local_numel": 0, "numel": 0, "local_bytes": 0, "bytes": 0} for name in INT4_TENSOR_NAMES}
    for module in model.modules():
        if not isinstance(module, Int4Linear):
            continue
        for name in INT4_TENSOR_NAMES:
            tensor = getattr(module, name, None)
            if tensor is None:
                continue
            size = tensor.element_size()
            local = local_tensor(tensor).numel()
            entry = int4[name]
            entry["local_numel"] += local
            entry["numel"] += tensor.numel()
            entry["local_bytes"] += local * size
            entry["bytes"] += tensor.numel() * size
    lora_local = lora_total = 0
    for param in model.parameters():
        if param.requires_grad:
            lora_local += local_tensor(param).numel()
            lora_total += param.numel()
    return {
        "rank": rank,
        "int4": {k: v for k, v in int4.items() if v["numel"]},
        "int4_local_bytes": sum(v["local_bytes"] for v in int4.values()),
        "int4_bytes": sum(v["bytes"] for v in int4.values()),
        "trainable_local_numel": lora_local,
        "trainable_numel": lora_total,
    }


def eval_batch_count(num_rows: int, batch_size: int, world_size: int) -> int:
    """Forward passes every process runs to cover ``num_rows`` validation rows dealt round-robin.

    Under FSDP every forward is a collective, so processes with fewer rows pad with forwards whose result is
    dropped: all run ``ceil(ceil(num_rows / world_size) / batch_size)``.
    """
    most_rows = -(-num_rows // world_size)
    return -(-most_rows // batch_size)


def save_gathered_adapter(peft_model: nn.Module, out_dir: str | Path, *, is_main: bool, barrier) -> Path:
    """Write the trained adapter of a sharded PEFT model as a plain PEFT adapter directory (a collective).

    Every process gathers the full LoRA tensors; the main process writes ``adapter_config.json`` and
    ``adapter_model.safetensors`` with PEFT's own ``save_pretrained`` (same keys as an unsharded model's). Returns
    ``out_dir``, complete on every process after the call.
    """
    out_dir = Path(out_dir)
    state = full_trainable_state((n, p) for n, p in peft_model.named_parameters() if p.requires_grad)
    if is_main:
        if out_dir.exists():
            shutil.rmtree(out_dir)
        peft_model.save_pretrained(str(out_dir), state_dict=state, save_embedding_layers=False)
        logger.info("gathered the sharded adapter (%d tensors) into %s", len(state), out_dir)
    barrier()
    return out_dir
