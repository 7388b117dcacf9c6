"""What the benchmark scripts share: the Llama-shaped models they build with random weights (no checkpoint), the
training modes of ``train_step.py`` (which ``multi_gpu.py`` runs too), and memory and timing helpers.

The scripts import it by name (``from common import ...``): Python puts a script's own folder on ``sys.path``. Only
torch is imported here at the top; transformers, PEFT and the toolkit's modeling code are imported by the functions
that use them, so that ``loader_memory.py`` measures its baseline as before.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
from pathlib import Path

import torch

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {
    "8b": dict(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256),
    "70b": dict(layers=80, hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=128256),
}

# ------------------------------------------------------------------------------------------------ model shape


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """``--shape`` (a :data:`SHAPES` preset) and one option per size that overrides it (see :func:`apply_shape`)."""
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b", help="model shape preset (default 8b)")
    for key in ("layers", "hidden", "intermediate", "heads", "kv-heads", "vocab"):
        parser.add_argument(f"--{key}", type=int, default=None, help="override the shape preset")


def apply_shape(args: argparse.Namespace) -> None:
    """Fill the sizes not given on the command line from the ``--shape`` preset."""
    for key, value in SHAPES[args.shape].items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def llama_config(args, max_position_embeddings: int, **extra):
    """A ``LlamaConfig`` of ``args``' sizes (``layers``, ``hidden``, ``intermediate``, ``heads``, ``kv_heads``,
    ``vocab``), Llama-3 RoPE, untied embeddings."""
    import transformers

    return transformers.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=max_position_embeddings,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        **extra,
    )


def random_int4_weight(
    out_features: int,
    in_features: int,
    group_size: int,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    scale_spread: float = 0.005,
):
    """A symmetric ``Int4Weight`` on ``device``: uniform random nibbles and bf16 scales uniform in
    ``[0.002, 0.002 + scale_spread)`` (0.005: weights of std ~0.02, like the dense models' initialisation)."""
    from int4lora_train.quant.layout import Int4Weight

    packed = torch.randint(
        0, 256, (out_features, in_features // 2), dtype=torch.uint8, device=device, generator=generator
    )
    scales = torch.rand(out_features, in_features // group_size, device=device, generator=generator)
    scales = scales * scale_spread + 0.002
    return Int4Weight.create(packed, scales.to(torch.bfloat16), in_features, group_size)


# ------------------------------------------------------------------------------------------------ training modes

BASES = ("bf16", "nf4", "int4", "int4-cache")
OPTIONS = ("fused", "keep", "lean", "group", "chunked", "kernels", "autokernels", "reentrant")
ALIASES = {
    "int4-opt": "int4+fused+keep+lean+group+chunked+kernels",
    "int4-default": "int4+fused+keep+lean+group+chunked+autokernels",
}


def parse_mode(mode: str) -> tuple[str, frozenset[str]]:
    """``"int4+fused+chunked"`` -> ``("int4", {"fused", "chunked"})``; aliases expanded; unknown parts raise."""
    head, *rest = mode.split("+")
    base, *options = ALIASES.get(head, head).split("+")
    options += rest
    if base not in BASES or any(o not in OPTIONS for o in options):
        raise ValueError(f"unknown mode {mode!r}: BASE[+OPTION...] with BASE in {BASES}, OPTION in {OPTIONS}")
    if base in ("bf16", "nf4") and set(options) & {"fused", "keep", "group"}:
        raise ValueError(f"mode {mode!r}: fused / keep / group apply to INT4 bases only")
    return base, frozenset(options)


def _projection_names(model: torch.nn.Module) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS
    ]


def _replace(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def build_model(args, base: str, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """A model with random weights on ``device``: dense, NF4 (bitsandbytes) or with every projection an Int4Linear."""
    import transformers

    config = llama_config(args, max(args.seq, 2048), use_cache=False)
    if base in ("bf16", "nf4"):
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        if base == "nf4":
            _quantize_nf4(model, device)
        return model

    from accelerate import init_empty_weights

    from int4lora_train.modeling import Int4Linear
    from int4lora_train.modeling.surgery import make_cache

    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    cache_bytes = None if args.cache_gb is None else int(args.cache_gb * 2**30)
    cache = make_cache("cache" if base == "int4-cache" else "on_the_fly", cache_bytes if base == "int4-cache" else None)
    for name in _projection_names(model):
        module = model.get_submodule(name)
        weight = random_int4_weight(module.out_features, module.in_features, args.group_size, device)
        _replace(model, name, Int4Linear(weight, cache=cache, cache_key=name))
    gen = torch.Generator(device=device).manual_seed(0)
    for name, param in list(model.named_parameters()):  # embeddings, norms, lm_head: still on the meta device
        module_name, _, local = name.rpartition(".")
        if "norm" in module_name:
            value = torch.ones(param.shape, dtype=dtype, device=device)
        else:
            value = (torch.randn(param.shape, generator=gen, device=device) * 0.02).to(dtype)
        model.get_submodule(module_name)._parameters[local] = torch.nn.Parameter(value)
    return model.to(device)  # the rotary buffers


def _quantize_nf4(model: torch.nn.Module, device: torch.device) -> None:
    """Replace every projection by bitsandbytes' NF4 ``Linear4bit`` (double quantization, bf16 compute), as
    ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.bfloat16)`` loads a checkpoint."""
    import bitsandbytes as bnb

    for name in _projection_names(model):
        dense = model.get_submodule(name)
        layer = bnb.nn.Linear4bit(
            dense.in_features,
            dense.out_features,
            bias=False,
            compute_dtype=torch.bfloat16,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            dense.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
        ).to(device)
        _replace(model, name, layer)
        del dense
    model.is_loaded_in_4bit = True  # what PEFT checks to pick its bnb LoRA layer
    gc.collect()
    torch.cuda.empty_cache()


def prepare(args, mode: str, device: torch.device, dtype=torch.bfloat16, dropout: float = 0.0, init_b: bool = False):
    """The model of ``mode`` with LoRA applied and the mode's options set."""
    from peft import LoraConfig, get_peft_model

    from int4lora_train import speed
    from int4lora_train.modeling import prepare_for_training

    base, options = parse_mode(mode)
    torch.manual_seed(0)  # the random base weights: the same in every build of a base
    model = build_model(args, base, device, dtype)
    torch.manual_seed(0)  # lora_A's init: the same adapters in every mode
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=list(PROJECTIONS), lora_dropout=dropout)
    model = get_peft_model(model, lora)
    if init_b:  # lora_B starts at zero; make the adapters do something (correctness checks)
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                gen = torch.Generator(device=device).manual_seed(sum(map(ord, name)))
                param.data.normal_(0, 0.02, generator=gen)
    features = {
        "chunked_loss": "chunked" in options,
        "fused_kernels": "on" if "kernels" in options else "auto" if "autokernels" in options else "off",
    }
    if base.startswith("int4"):
        features.update(
            fused_lora="fused" in options,
            keep_dense_for_backward="keep" in options,
            lean_recompute="lean" in options,
            group_projections="group" in options,
        )
    speed.apply(model, **features)
    reentrant = args.reentrant or "reentrant" in options
    prepare_for_training(model, gradient_checkpointing=not args.no_checkpointing, use_reentrant=reentrant)
    apply_memory_options(args, model)
    model.train()
    return model


def add_memory_arguments(parser) -> None:
    """``--offload-activations``, ``--embeddings-on-cpu``, ``--mlp-chunk-tokens``, ``--optimizer-on-cpu``:
    int4lora_train.memory's features (docs/memory.md); off unless asked, so the other measurements stay as they
    were."""
    choices = ("auto", "on", "off")
    parser.add_argument("--offload-activations", choices=choices, default="off", help="checkpointed inputs to host")
    parser.add_argument("--embeddings-on-cpu", choices=choices, default="off", help="input embedding table on host")
    parser.add_argument(
        "--mlp-chunk-tokens",
        type=lambda v: None if v == "auto" else int(v),
        default=0,
        help="decoder MLP in chunks of this many tokens; 0 = off, auto = the memory plan's choice",
    )
    parser.add_argument("--optimizer-on-cpu", action="store_true", help="AdamW state and update on the host")


def make_optimizer(args, params, **kwargs) -> torch.optim.Optimizer:
    """AdamW over ``params``; :class:`~int4lora_train.memory.HostAdamW` (state on the host) with
    ``--optimizer-on-cpu`` (``fused`` then dropped: the update runs on the host)."""
    if getattr(args, "optimizer_on_cpu", False):
        from int4lora_train.memory import HostAdamW

        kwargs.pop("fused", None)
        return HostAdamW(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def apply_memory_options(args, model: torch.nn.Module) -> dict | None:
    """``memory.apply`` with the options of :func:`add_memory_arguments` (nothing when all are off); the report is
    kept as ``model.memory_report`` and returned."""
    offload = getattr(args, "offload_activations", "off")
    embeddings = getattr(args, "embeddings_on_cpu", "off")
    chunk = getattr(args, "mlp_chunk_tokens", 0)
    host_optimizer = "on" if getattr(args, "optimizer_on_cpu", False) else "off"  # make_optimizer builds it
    if offload == "off" and embeddings == "off" and chunk == 0 and host_optimizer == "off":
        return None
    from int4lora_train import memory

    world = int(os.environ.get("WORLD_SIZE", "1"))
    report = memory.apply(
        model,
        memory.MemoryConfig(
            offload_activations=offload,
            embeddings_on_cpu=embeddings,
            mlp_chunk_tokens=chunk,
            optimizer_on_cpu=host_optimizer,
        ),
        micro_batch_size=args.bs,
        seq_len=args.seq,
        strategy=getattr(args, "strategy", "single") if world > 1 else "single",
        world_size=world,
    )
    print(report["summary"], flush=True)
    model.memory_report = report
    return report


# ------------------------------------------------------------------------------------------------ memory, timing


def proc_status(*keys: str) -> dict[str, int]:
    """``/proc/self/status`` fields (``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile``, ...) in bytes; {} off Linux."""
    fields = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in keys:
                fields[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return fields


def memory_reset(device: torch.device) -> None:
    """Free what can be freed and restart the peak counter (CUDA: peak allocated; CPU: peak RSS)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # "5" resets the peak RSS (VmHWM) of this process (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def memory_now(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return proc_status("VmRSS").get("VmRSS", 0)


def memory_peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return proc_status("VmHWM").get("VmHWM", 0)


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA), so that a wall-clock time covers the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
