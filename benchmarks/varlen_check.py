"""Varlen attention on the GPU: agreement with transformers' mask path, and the time of both (one JSON line).

    python benchmarks/varlen_check.py                      # Llama-8B shape, bs 4, seq 2048, 8 segments per row
    python benchmarks/varlen_check.py --batch 2 --seq 4096 --segments 16

Two levels, both bf16 on CUDA, forward + backward:

- ``attention``: one attention call (``[B, 32, T, 128]`` queries, 8 key/value heads): transformers' ``sdpa`` function
  with the 4-D block-causal mask (what transformers builds for packed rows) against
  :func:`~int4lora_train.speed.varlen_attention.varlen_attention_forward`, with every flash kernel this torch offers
  (``aten``: the autograd node over ``aten._flash_attention_forward``; ``varlen_attn``: torch's public op, where it
  takes grouped heads). Each is also compared with an fp32 reference (the mask path in fp32), for scale.
- ``layer``: one ``LlamaDecoderLayer`` of the same shape, with ``config._attn_implementation`` ``sdpa`` (the mask from
  ``create_causal_mask``) against the registered varlen implementation (no mask: ``create_causal_mask`` returns
  None): max abs difference of the output and of the input's and ``q_proj.weight``'s gradients, and times.

Rows: ``--segments`` samples of random lengths per row, the row's end left as a padding segment (positions restart
at 0, as the collator pads). Run it from the repository root.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from int4lora_train.speed import varlen_attention as va  # noqa: E402


def packed_positions(batch: int, seq: int, segments: int, seed: int = 0) -> torch.Tensor:
    """``[batch, seq]`` positions of rows of ``segments`` samples of random lengths, then a padding segment."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(seq - 64, generator=gen)[: segments - 1].add(32).sort().values.tolist()
        end = seq - int(torch.randint(1, 32, (), generator=gen))  # the rest: padding, its own segment
        bounds = [0, *[c for c in cuts if c < end], end, seq]
        rows.append(torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:])]))
    return torch.stack(rows)


def timed(fn, repeat: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeat`` runs after 3 warm-up runs (CUDA events)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


class _Module(torch.nn.Module):
    """What an attention function reads from its module: ``is_causal``, ``num_key_value_groups``, ``training``."""

    def __init__(self, groups: int):
        super().__init__()
        self.is_causal, self.num_key_value_groups = True, groups


def check_attention(args, positions: torch.Tensor) -> dict:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    gen = torch.Generator(device="cuda").manual_seed(0)
    shape_q = (args.batch, args.heads, args.seq, args.head_dim)
    shape_kv = (args.batch, args.kv_heads, args.seq, args.head_dim)
    q32, k32, v32 = (torch.randn(s, device="cuda", generator=gen) for s in (shape_q, shape_kv, shape_kv))
    grad_out = torch.randn(args.batch, args.seq, args.heads, args.head_dim, device="cuda", generator=gen)
    module = _Module(args.heads // args.kv_heads)
    scale = args.head_dim**-0.5
    segments = va.compute_segments(positions, args.batch)
    mask = segments.block_causal_mask()

    def run(fn, dtype):
        q, k, v = (t.detach().to(dtype).clone().requires_grad_() for t in (q32, k32, v32))
        out = fn(q, k, v)
        out.backward(grad_out.to(dtype))
        return out.detach(), q.grad, k.grad, v.grad

    def mask_path(q, k, v):
        return sdpa_attention_forward(module, q, k, v, mask, scaling=scale)[0]

    def varlen_path(kernel):
        def fn(q, k, v):
            out = va.flash_varlen(va.to_varlen(q), va.to_varlen(k), va.to_varlen(v), segments.cu_seqlens,
                                  segments.max_seqlen, scale=scale, kernel=kernel)  # fmt: skip
            return va.from_varlen(out, q.shape[0])

        return fn

    def via_interface(q, k, v):  # the registered function, as a decoder layer calls it
        return va.varlen_attention_forward(module, q, k, v, None, scaling=scale, position_ids=positions)[0]

    reference = run(mask_path, torch.float32)
    expected = run(mask_path, torch.bfloat16)
    paths = {"mask": mask_path, "varlen": via_interface}
    for kernel in ("aten", "varlen_attn"):
        try:
            va.flash_kernel(args.heads, args.kv_heads, kernel)
        except Exception:  # noqa: BLE001 - this torch does not offer it for these heads
            continue
        paths[f"varlen_{kernel}"] = varlen_path(kernel)
    result = {"kernel_auto": va.flash_kernel(args.heads, args.kv_heads), "paths": {}}
    for name, fn in paths.items():
        got = run(fn, torch.bfloat16)
        result["paths"][name] = {
            "max_abs_diff_vs_mask": {t: diff(a, b) for t, a, b in zip(("out", "dq", "dk", "dv"), got, expected)},
            "max_abs_diff_vs_fp32": {t: diff(a, b) for t, a, b in zip(("out", "dq", "dk", "dv"), got, reference)},
            "fwd_bwd_ms": timed(lambda fn=fn: run(fn, torch.bfloat16), args.repeat),
        }
    return result


def _causal_mask(config, hidden: torch.Tensor, positions: torch.Tensor):
    """``create_causal_mask`` for a forward without cache, whatever its argument names in this transformers."""
    from transformers.masking_utils import create_causal_mask

    params = inspect.signature(create_causal_mask).parameters
    kwargs = {"attention_mask": None, "position_ids": positions}
    for name in ("cache", "past_key_values"):
        if name in params:
            kwargs[name] = None
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(hidden.shape[1], device=hidden.device)
    return create_causal_mask(config, hidden, **kwargs)


def check_layer(args, positions: torch.Tensor) -> dict:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    va.register()
    config = LlamaConfig(
        hidden_size=args.heads * args.head_dim, intermediate_size=args.intermediate, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim, num_hidden_layers=1,
        max_position_embeddings=max(args.seq, 8192),
    )  # fmt: skip
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, layer_idx=0).to("cuda", torch.bfloat16)
    rotary = LlamaRotaryEmbedding(config).to("cuda")
    gen = torch.Generator(device="cuda").manual_seed(1)
    x0 = torch.randn(args.batch, args.seq, config.hidden_size, device="cuda", generator=gen).to(torch.bfloat16)
    grad_out = torch.randn_like(x0)

    masks = {}
    for implementation in ("sdpa", va.IMPLEMENTATION):  # built once per model forward, so outside the timing
        config._attn_implementation = implementation
        masks[implementation] = _causal_mask(config, x0, positions)

    def run(implementation: str):
        config._attn_implementation = implementation
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        mask = masks[implementation]
        out = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=rotary(x, positions))
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad_out)
        return out.detach(), x.grad, layer.self_attn.q_proj.weight.grad, mask is None

    (ref_out, ref_dx, ref_dw, _), (out, dx, dw, no_mask) = run("sdpa"), run(va.IMPLEMENTATION)
    return {
        "varlen_builds_no_mask": no_mask,
        "max_abs_diff": {"out": diff(out, ref_out), "dx": diff(dx, ref_dx), "d_q_proj": diff(dw, ref_dw)},
        "max_abs_ref": {"out": ref_out.abs().max().item(), "dx": ref_dx.abs().max().item()},
        "fwd_bwd_ms": {
            "mask": timed(lambda: run("sdpa"), args.repeat),
            "varlen": timed(lambda: run(va.IMPLEMENTATION), args.repeat),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--segments", type=int, default=8, help="samples per row (plus a padding segment)")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--skip-layer", action="store_true", help="only the attention call")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("varlen_check.py needs a CUDA GPU")
    import transformers

    positions = packed_positions(args.batch, args.seq, args.segments).cuda()
    segments = va.compute_segments(positions, args.batch)
    result = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(),
        "python": platform.python_version(),
        "shape": {k: getattr(args, k) for k in ("batch", "seq", "heads", "kv_heads", "head_dim")},
        "segments": len(segments.lengths),
        "max_seqlen": segments.max_seqlen,
        "flash_supported": va.flash_supported("cuda", torch.bfloat16),
        "attention": check_attention(args, positions),
    }
    if not args.skip_layer:
        result["layer"] = check_layer(args, positions)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
