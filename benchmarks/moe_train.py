"""LoRA training steps on a Qwen3-MoE-shaped model with random INT4 weights: step time and peak memory.

Default shape: Qwen3-30B-A3B (48 layers, hidden 2048, 32 heads of 128 with 4 KV heads, 128 experts of width 768,
8 active, vocab 151936), sequence 2048, bf16 compute, group size 128. Weights are random INT4 built directly in the
packed layout (no dense weight is ever allocated for them), so the numbers measure the toolkit, not a checkpoint.

Modes (``--modes``, comma separated):
  int4-attn      INT4 attention + INT4 experts (Int4Experts), LoRA on q/k/v/o
  int4-experts   the same plus per-expert LoRA on every experts module (target "experts")
  bf16-peft      the baseline: a dense bf16 model (experts as transformers' fused bf16 parameters) + PEFT LoRA on
                 q/k/v/o; skipped with a note where it does not fit (about 61 GB of bf16 weights at the full shape)

``--experts-impl loop,grouped`` runs each INT4 mode once per ``Int4Experts.experts_impl`` (per-expert matmul loop
vs one grouped GEMM per dequantization chunk; default ``auto``), so one call compares them.

GPU (one H200):  python benchmarks/moe_train.py
CPU smoke test:  python benchmarks/moe_train.py --device cpu --dtype float32 --layers 1 --hidden 128 --heads 4 \\
                     --kv-heads 2 --head-dim 32 --experts 4 --top-k 2 --expert-intermediate 64 --vocab 320 \\
                     --seq 32 --steps 1 --warmup 0 --group-size 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--expert-intermediate", type=int, default=768)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--modes", default="int4-attn,int4-experts,bf16-peft")
    p.add_argument("--max-dense-experts", type=int, default=None, help="Int4Experts dequantization chunk (experts)")
    p.add_argument(
        "--experts-impl",
        default="auto",
        help="Int4Experts.experts_impl for the INT4 modes, comma separated to run each (auto, grouped, loop)",
    )
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p.parse_args(argv)


def qwen3_moe_config(args):
    import transformers

    return transformers.Qwen3MoeConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.expert_intermediate,
        intermediate_size=args.expert_intermediate * 8,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        max_position_embeddings=max(4096, args.seq),
        tie_word_embeddings=False,
        use_cache=False,
    )


def random_int4(out_features, in_features, group_size, device, dtype, gen, experts=None):
    """Random packed INT4 (uint8 [.., out, in/2]) and scales ([.., out, G]) without any dense tensor."""
    lead = () if experts is None else (experts,)
    packed = torch.randint(0, 256, (*lead, out_features, in_features // 2), dtype=torch.uint8, device=device,
                           generator=gen)  # fmt: skip
    groups = -(-in_features // group_size)
    scales = (torch.rand((*lead, out_features, groups), device=device, generator=gen) * 0.004 + 0.001).to(dtype)
    return packed, scales


def build_int4_model(args, device, dtype, experts_impl="auto"):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from int4lora_train.modeling.int4_experts import Int4Experts, is_fused_experts_module
    from int4lora_train.modeling.int4_linear import Int4Linear
    from int4lora_train.quant.experts import Int4ExpertStack
    from int4lora_train.quant.layout import Int4Weight

    gen = torch.Generator(device=device).manual_seed(0)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(qwen3_moe_config(args), dtype=dtype)
    gs = args.group_size
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            packed, scales = random_int4(module.out_features, module.in_features, gs, device, dtype, gen)
            setattr(parent, child, Int4Linear(Int4Weight.create(packed, scales, module.in_features, gs)))
        elif is_fused_experts_module(module):
            e, two_i, h = module.gate_up_proj.shape
            stacks = []
            for out_features, in_features in ((two_i, h), (h, two_i // 2)):
                packed, scales = random_int4(out_features, in_features, gs, device, dtype, gen, experts=e)
                stacks.append(Int4ExpertStack(packed, scales, in_features, gs))
            experts = Int4Experts(
                *stacks, module.act_fn, max_dense_experts=args.max_dense_experts, experts_impl=experts_impl
            )
            setattr(parent, child, experts)
    materialise(model, device, dtype, gen)
    return model


def build_dense_model(args, device, dtype):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    gen = torch.Generator(device=device).manual_seed(0)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(qwen3_moe_config(args), dtype=dtype)
    materialise(model, device, dtype, gen)
    return model


def materialise(model, device, dtype, gen):
    """Every parameter / buffer still on the meta device: norms ones, the rest N(0, 0.02), frozen."""
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                if "norm" in module_name.rsplit(".", 1)[-1] or "norm" in name:
                    value = torch.ones(param.shape, device=device, dtype=dtype)
                else:
                    value = (torch.randn(param.shape, device=device, generator=gen) * 0.02).to(dtype)
                module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.zeros(buf.shape, device=device, dtype=buf.dtype)
    model.to(device)


def run_mode(mode, args, device, dtype, experts_impl="auto"):
    from peft import LoraConfig, get_peft_model

    from int4lora_train.modeling import prepare_for_training

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] + (["experts"] if mode == "int4-experts" else [])
    try:
        if mode == "bf16-peft":
            model = build_dense_model(args, device, dtype)
        else:
            model = build_int4_model(args, device, dtype, experts_impl)
    except torch.OutOfMemoryError as exc:
        return {"mode": mode, "skipped": f"does not fit: {exc}".splitlines()[0]}
    weights_gib = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets))
    prepare_for_training(model, gradient_checkpointing=not args.no_gradient_checkpointing)
    model.train()
    for p in model.parameters():  # adapters in the compute dtype
        if p.requires_grad:
            p.data = p.data.to(dtype)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    from int4lora_train.modeling.int4_experts import grouped_mm_supported

    grouped_available = grouped_mm_supported(device, dtype)  # what "auto" takes (alignment aside)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    times = []
    try:
        for step in range(args.warmup + args.steps):
            sync()
            start = time.perf_counter()
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError as exc:
        return {"mode": mode, "skipped": f"out of memory while training: {exc}".splitlines()[0]}
    result = {
        "mode": mode,
        **({} if mode == "bf16-peft" else {"experts_impl": experts_impl, "grouped_mm_available": grouped_available}),
        "step_s": sum(times) / max(1, len(times)),
        "tokens_per_s": args.batch * args.seq * len(times) / max(sum(times), 1e-9),
        "trainable_params": trainable,
        "loss": loss.item(),
    }
    if device.type == "cuda":
        result["weights_gib"] = weights_gib
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del model, optimizer
    return result


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    impls = [i.strip() for i in args.experts_impl.split(",") if i.strip()]
    from int4lora_train.modeling.int4_experts import EXPERTS_IMPLS

    if not impls or any(i not in EXPERTS_IMPLS for i in impls):
        raise SystemExit(f"--experts-impl takes {list(EXPERTS_IMPLS)}, comma separated; got {args.experts_impl!r}")
    results = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        if mode not in ("int4-attn", "int4-experts", "bf16-peft"):
            raise SystemExit(f"unknown mode {mode!r}")
        for impl in impls if mode != "bf16-peft" else ["auto"]:
            result = run_mode(mode, args, device, dtype, impl)
            print(json.dumps(result), flush=True)
            results.append(result)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
