"""Compressed-tensors MoE checkpoints whose expert projections differ in symmetry (one config group per scheme: a
symmetric gate beside an asymmetric up, or the reverse): loaded bit-exactly against the library's per-projection
decompression, with the same base fingerprint on the model as in the checkpoint directory (what export and verify
compare), and trainable with per-expert LoRA. The uniform checkpoints go through the same checks."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from moe_helpers import GROUP_SIZE
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from int4lora_train.export.fingerprint import checkpoint_identity, compare_identities, model_identity
from int4lora_train.modeling import load_int4_model
from int4lora_train.modeling.int4_experts import Int4Experts
from int4lora_train.modeling.moe import MOE_SPECS
from int4lora_train.quant.experts import dequantize_experts

pytest.importorskip("compressed_tensors")  # the reference decompression

TOKENS = torch.tensor([[1, 5, 9, 200, 33, 7, 81, 12, 64, 3, 99, 150]])

SYMMETRIES = {
    "gate sym, up asym": (True, False, False),
    "gate asym, up sym": (False, True, True),
    "all sym": (True, True, True),
    "all asym": (False, False, False),
}
"""(gate, up, down) symmetric, per case."""


def _weights(symmetric: bool) -> dict:
    return {
        "num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": GROUP_SIZE,
        "dynamic": False,
    }  # fmt: skip


def _checkpoint(moe_checkpoints, arch: str, symmetric: tuple[bool, bool, bool], tmp_path):
    """A checkpoint of ``arch`` whose expert (gate, up, down) projections have the ``symmetric`` schemes.

    Uniform: the fixture's own checkpoint. Mixed: the asymmetric checkpoint with the symmetric projections' tensors
    taken from the symmetric one (no zero point stored, as compressed-tensors writes a symmetric module) and a
    first config group that targets them with a symmetric scheme (the first matching group wins)."""
    if len(set(symmetric)) == 1:
        return moe_checkpoints(arch, "compressed-tensors", symmetric[0])[1]
    sym_path = moe_checkpoints(arch, "compressed-tensors", True)[1]
    asym_path = moe_checkpoints(arch, "compressed-tensors", False)[1]
    path = shutil.copytree(asym_path, tmp_path / "mixed")
    projections = [p for p, sym in zip(MOE_SPECS[arch].projections, symmetric) if sym]
    pattern = rf".*experts\.\d+\.({'|'.join(projections)})\."
    tensors = {k: v for k, v in load_file(str(asym_path / "model.safetensors")).items() if not re.match(pattern, k)}
    tensors.update({k: v for k, v in load_file(str(sym_path / "model.safetensors")).items() if re.match(pattern, k)})
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"]
    sym_group = {**groups["group_0"], "targets": [rf"re:.*experts\.\d+\.({'|'.join(projections)})$"]}
    sym_group["weights"] = _weights(True)
    config["quantization_config"]["config_groups"] = {"group_0": sym_group, "group_1": groups["group_0"]}
    config["quantization_config"]["format"] = "mixed-precision"
    (path / "config.json").write_text(json.dumps(config))
    return path


def _library_decompress(tensors: dict, symmetric: bool) -> torch.Tensor:
    """compressed-tensors' own decompression of one stored projection with its scheme's symmetry."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**_weights(symmetric)))
    return PackedQuantizationCompressor.decompress(dict(tensors), scheme)["weight"]


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("case", list(SYMMETRIES))
def test_per_projection_symmetry_loads_exactly_and_keeps_the_base_fingerprint(
    moe_checkpoints, grouped_dequant, arch, case, tmp_path
):
    symmetric = SYMMETRIES[case]
    path = _checkpoint(moe_checkpoints, arch, symmetric, tmp_path)
    model = load_int4_model(path, dtype=torch.float32)
    spec = MOE_SPECS[arch]
    stored = load_file(str(path / "model.safetensors"))
    keys = {}
    for key in stored:
        module, _, local = key.rpartition(".")
        keys.setdefault(module, {})[local] = key
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Int4Experts)]
    assert len(layers) == 2
    for name, experts in layers:
        gate_up, down = experts.dequantize("gate_up"), experts.dequantize("down")
        ids = torch.arange(experts.num_experts)
        for stack, dense in (("gate_up", gate_up), ("down", down)):  # the grouped kernel reads the same stacks
            assert torch.equal(dequantize_experts(experts.stack(stack), ids, backend="triton"), dense), stack
        for e in range(experts.num_experts):
            prefix = spec.to_checkpoint_key(f"{name}.{e}")
            gate, up, down_ref = (
                _library_decompress({local: stored[k] for local, k in keys[f"{prefix}.{proj}"].items()}, sym)
                for proj, sym in zip(spec.projections, symmetric)
            )
            assert torch.equal(gate_up[e], torch.cat([gate, up])), f"{name} expert {e} gate_up"
            assert torch.equal(down[e], down_ref), f"{name} expert {e} down"

    on_disk = checkpoint_identity(path)
    in_memory = model_identity(model)
    assert compare_identities(in_memory, on_disk) == []
    assert in_memory.module_digests == on_disk.module_digests
    assert f"model.layers.1.{spec.checkpoint_block or 'mlp'}.experts.3.{spec.gate}" in on_disk.module_digests

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["experts"]))
    assert model_identity(peft_model).fingerprint == on_disk.fingerprint
    loss = peft_model(TOKENS, labels=TOKENS).loss
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)  # lora_B starts at zero: its gradient is not
