"""The identity of an INT4 base: its quantization config plus a fingerprint of its INT4 tensors.

An adapter trained on one INT4 base is only right on that base (vLLM #8945: an adapter trained on a bnb base met a
GPTQ base). The export records the base's identity in a sidecar file, ``int4lora_base.json``, next to
``adapter_config.json``; :func:`check_base_fingerprint` compares it with the base an adapter is loaded onto.

The fingerprint::

    module digest  = sha256( header | packed | scales as fp32 | zero_points int8 | g_idx int32 )   per INT4 module
    fingerprint    = sha256( "name=digest\\n" for every INT4 module, in name order )

It hashes the canonical :class:`~int4lora_train.quant.layout.Int4Weight` (the same quantized values give the same
digest whether they were read from compressed-tensors, GPTQ or AWQ tensors), never dequantizes, and streams the
bytes straight from the tensors (one pass, about 1-2 GB/s per core: a few seconds for an 8B model). Scales are hashed
as fp32, so an exact upcast (fp16 / bf16 -> fp32) does not change the identity, while a lossy cast does. Per-module
digests are kept too, so a mismatch can name the modules that differ.

Mixed-precision checkpoints: the 8-bit (int8 / FP8) modules the loader dequantizes at load
(quant/dequant_at_load.py) are covered by a digest of their tensors *as stored* (``stored_digest``: name, dtype, shape
and bytes of ``weight_packed`` / ``weight`` / scales / zero points), recorded on the module at load and read from the
shards by :func:`checkpoint_identity`; the dequantized weight itself is never hashed.

Why a sidecar file and not a custom key in ``adapter_config.json``: vLLM ignores both (``PEFTHelper.from_dict``
keeps only the fields it knows, and it reads no other file), but PEFT's ``LoraConfig.from_pretrained`` warns about
an unknown key (telling the user to upgrade PEFT), drops it, and loses it on the next ``save_pretrained``; older
PEFT releases raised a TypeError. A sidecar leaves ``adapter_config.json`` exactly as PEFT writes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from int4lora_train.errors import CheckpointError
from int4lora_train.quant.layout import Int4Weight, pack_nibbles, unpack_nibbles

logger = logging.getLogger(__name__)

SIDECAR_NAME = "int4lora_base.json"
FINGERPRINT_ALGORITHM = "int4lora-sha256-v1"
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class BaseIdentity:
    """What an adapter records about the INT4 base it was trained on."""

    fingerprint: str
    module_digests: dict[str, str]
    quantization_config: dict | None = None
    model_type: str | None = None
    base_model: str | None = None
    algorithm: str = FINGERPRINT_ALGORITHM
    extra: dict = field(default_factory=dict)

    @property
    def num_modules(self) -> int:
        return len(self.module_digests)

    def to_json(self) -> dict:
        return {
            "base_model": self.base_model,
            "model_type": self.model_type,
            "quantization_config": self.quantization_config,
            "fingerprint": {
                "algorithm": self.algorithm,
                "value": self.fingerprint,
                "num_int4_modules": self.num_modules,
                "modules": self.module_digests,
            },
            **self.extra,
        }

    @classmethod
    def from_json(cls, data: Mapping, source: str = SIDECAR_NAME) -> BaseIdentity:
        try:
            fp = data["fingerprint"]
            return cls(
                fingerprint=str(fp["value"]),
                module_digests=dict(fp.get("modules") or {}),
                quantization_config=data.get("quantization_config"),
                model_type=data.get("model_type"),
                base_model=data.get("base_model"),
                algorithm=str(fp.get("algorithm", FINGERPRINT_ALGORITHM)),
            )
        except (KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{source}: not a valid base identity record ({exc!r} missing or malformed)."
            ) from exc


# --------------------------------------------------------------------------------------------------------- digests


def weight_digest(weight: Int4Weight) -> str:
    """sha256 hex of one canonical INT4 weight: shape header, then packed / scales (fp32) / zero points / g_idx.

    Only the ``ceil(in/2)`` meaningful bytes of each packed row are hashed (the padding nibble of an odd
    ``in_features`` is masked), so writers that pad differently give the same digest.
    """
    in_features = weight.in_features
    packed = weight.packed[:, : (in_features + 1) // 2]
    if in_features % 2:  # repack the real columns: the padding nibble becomes 0
        packed = pack_nibbles(unpack_nibbles(packed)[:, :in_features])[:, : packed.shape[1]]
    h = hashlib.sha256()
    h.update(
        struct.pack(
            "<4q3?",
            weight.out_features,
            in_features,
            weight.group_size,
            weight.num_groups,
            weight.zero_points is not None,
            weight.g_idx is not None,
            True,
        )
    )
    _update(h, packed, torch.uint8)
    _update(h, _exact_fp32(weight.scales), torch.float32)
    if weight.zero_points is not None:
        _update(h, weight.zero_points, torch.int8)
    if weight.g_idx is not None:
        _update(h, weight.g_idx, torch.int32)
    return h.hexdigest()


def _update(h, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    """Feed ``tensor`` (as ``dtype``, little-endian, row-major) into the hash without another Python-level copy."""
    array = tensor.detach().to(device="cpu", dtype=dtype).contiguous().numpy()
    if sys.byteorder == "big":  # pragma: no cover - no big-endian CI machine
        array = array.byteswap()
    h.update(array.data)


def _exact_fp32(scales: torch.Tensor) -> torch.Tensor:
    """``scales`` as fp32, exactly. A bf16 value is the top half of its fp32 bit pattern, so the shift is the exact
    upcast (torch's own bf16 -> fp32 cast is several times slower than hashing on some CPUs)."""
    if scales.dtype == torch.bfloat16:
        return (scales.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)
    return scales.to(torch.float32)


def combine_digests(module_digests: Mapping[str, str]) -> str:
    """The fingerprint: sha256 over ``name=digest`` lines in name order."""
    h = hashlib.sha256()
    for name in sorted(module_digests):
        h.update(f"{name}={module_digests[name]}\n".encode())
    return h.hexdigest()


def normalize_module_name(name: str) -> str:
    """The base model's own module name: drop PEFT's ``base_model.model.`` prefix and ``.base_layer`` segments."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    return ".".join(part for part in name.split(".") if part != "base_layer")


# ---------------------------------------------------------------------------------------------------------- models


def iter_model_int4_weights(model: torch.nn.Module) -> Iterator[tuple[str, Int4Weight]]:
    """``(base module name, Int4Weight)`` for every INT4 linear of ``model`` (bare, or wrapped by PEFT).

    Recognises the toolkit's ``Int4Linear`` (``int4_weight()``) and, through the format readers, raw
    compressed-tensors / GPTQ / AWQ modules that were not converted.
    """
    from int4lora_train.modeling.moe import moe_spec_for
    from int4lora_train.quant.formats import is_int4_module, read_module_int4_weight

    seen = set()
    for name, module in model.named_modules():
        if _is_lora_wrapper(module):
            continue  # its base_layer is visited on its own
        expert_weights = getattr(module, "expert_int4_weights", None)
        if callable(expert_weights):  # packed MoE experts: one entry per expert projection, named as stored
            spec = moe_spec_for(getattr(model, "config", None) or model)
            for e, proj, weight in expert_weights():
                base_name = normalize_module_name(f"{name}.{e}.{proj}")
                yield (spec.to_checkpoint_key(base_name) if spec is not None else base_name), weight
            continue
        weight = None
        int4_weight = getattr(module, "int4_weight", None)
        if callable(int4_weight) and not isinstance(module, torch.nn.ModuleList):
            weight = int4_weight()
        elif is_int4_module(module):
            weight = read_module_int4_weight(module, name)
        if weight is None:
            continue
        base_name = normalize_module_name(name)
        if base_name in seen:
            continue
        seen.add(base_name)
        yield base_name, weight


def _dequantized_digests(model: torch.nn.Module) -> dict[str, str]:
    """``{base module name: stored digest}`` of the modules the loader dequantized at load (bare or under PEFT)."""
    digests = {}
    for name, module in model.named_modules():
        digest = module.__dict__.get("int4lora_stored_digest")  # not getattr: PEFT wrappers forward attributes
        if isinstance(digest, str):
            digests.setdefault(normalize_module_name(name), digest)
    return digests


def model_identity(model: torch.nn.Module, base_model: str | None = None) -> BaseIdentity:
    """The identity of ``model``'s INT4 base (a bare model or a ``PeftModel``): config + tensor fingerprint."""
    digests = {name: weight_digest(weight) for name, weight in iter_model_int4_weights(model)}
    digests.update(_dequantized_digests(model))
    from int4lora_train.modeling.peft_integration import unwrap_peft  # PEFT only once a model is at hand

    base = unwrap_peft(model)
    config = getattr(base, "config", None)
    # The surgery records the parsed block on the model; a model that skipped it may still carry the raw block.
    quant = getattr(base, "int4_checkpoint_config", None)
    if quant is None and config is not None:
        quant = getattr(config, "quantization_config", None)
    if quant is not None and not isinstance(quant, Mapping):
        quant = quant.to_dict() if hasattr(quant, "to_dict") else None
    if base_model is None:
        where = getattr(base, "int4_checkpoint_dir", None) or getattr(config, "_name_or_path", None)
        base_model = str(where) if where else None
    return BaseIdentity(
        fingerprint=combine_digests(digests),
        module_digests=digests,
        quantization_config=dict(quant) if quant is not None else None,
        model_type=getattr(config, "model_type", None) if config is not None else None,
        base_model=base_model,
    )


def checkpoint_identity(model_dir: str | Path) -> BaseIdentity:
    """The identity of an INT4 checkpoint directory, read module by module from its safetensors files.

    Gives the same fingerprint as :func:`model_identity` on the model the toolkit's loader builds from it.
    """
    from int4lora_train.quant.checkpoint_config import read_checkpoint_quant_config
    from int4lora_train.quant.checkpoint_dir import CheckpointDir, read_json

    model_dir = Path(model_dir)
    quant = read_checkpoint_quant_config(model_dir, required=True)
    checkpoint = CheckpointDir.open(model_dir)
    digests = {name: weight_digest(weight) for name, weight, _ in checkpoint.iter_int4_weights(quant)}
    if digests:
        from int4lora_train.quant.dequant_at_load import stored_digest

        digests.update({name: stored_digest(t) for name, _, t in checkpoint.iter_dequantized_modules(quant)})
    if not digests:
        raise CheckpointError(f"{model_dir}: no INT4 tensors found in {[p.name for p in checkpoint.shards]}.")
    return BaseIdentity(
        fingerprint=combine_digests(digests),
        module_digests=digests,
        quantization_config=quant.to_dict(),
        model_type=read_json(model_dir / "config.json", "config.json").get("model_type"),
        base_model=str(model_dir),
    )


def compare_identities(recorded: BaseIdentity, actual: BaseIdentity) -> list[str]:
    """Human-readable differences between the base an adapter recorded and the one it meets (empty = same)."""
    problems = []
    if recorded.algorithm != actual.algorithm:
        return [f"fingerprint algorithms differ ({recorded.algorithm} vs {actual.algorithm}); cannot compare."]
    if recorded.model_type and actual.model_type and recorded.model_type != actual.model_type:
        problems.append(f"model_type: adapter trained on {recorded.model_type!r}, base is {actual.model_type!r}")
    rq, aq = _quant_summary(recorded.quantization_config), _quant_summary(actual.quantization_config)
    if rq != aq and recorded.quantization_config is not None and actual.quantization_config is not None:
        problems.append(f"quantization: adapter trained on {rq}, base is {aq}")
    if recorded.fingerprint != actual.fingerprint:
        rec, act = recorded.module_digests, actual.module_digests
        missing = sorted(set(rec) - set(act))
        extra = sorted(set(act) - set(rec))
        changed = sorted(n for n in set(rec) & set(act) if rec[n] != act[n])
        detail = []
        if changed:
            detail.append(f"{len(changed)} of {len(rec)} INT4 modules hold different weights (first: {changed[0]})")
        if missing:
            detail.append(f"{len(missing)} INT4 modules of the training base are not INT4 here (first: {missing[0]})")
        if extra:
            detail.append(f"{len(extra)} INT4 modules are new (first: {extra[0]})")
        problems.append(
            f"INT4 weights differ: fingerprint {recorded.fingerprint[:16]}... recorded, {actual.fingerprint[:16]}... "
            f"found" + (f" ({'; '.join(detail)})" if detail else "")
        )
    return problems


def write_sidecar(identity: BaseIdentity, adapter_dir: str | Path) -> Path:
    path = Path(adapter_dir) / SIDECAR_NAME
    path.write_text(json.dumps(identity.to_json(), indent=2, sort_keys=True) + "\n")
    return path


def read_sidecar(adapter_dir: str | Path) -> BaseIdentity | None:
    """The identity recorded next to an adapter, or None when the adapter has no sidecar."""
    path = Path(adapter_dir) / SIDECAR_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); delete it or re-export the adapter.") from exc
    return BaseIdentity.from_json(data, str(path))


# --------------------------------------------------------------------------------------------------------- helpers


def _is_lora_wrapper(module: torch.nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(module, BaseTunerLayer)


def _quant_summary(block: Mapping | None) -> str:
    """A short description of a quantization_config block: method, format, bits, group size, symmetry."""
    if not block:
        return "not quantized"
    from int4lora_train.quant.checkpoint_config import parse_quantization_config

    try:
        scheme = parse_quantization_config(block, "quantization_config").default_scheme
    except ValueError:
        return str(block.get("quant_method"))
    return (
        f"{scheme.format} {scheme.checkpoint_format} int{scheme.num_bits} {scheme.strategy}"
        f"{'' if scheme.group_size is None else f' gs={scheme.group_size}'} "
        f"{'symmetric' if scheme.symmetric else 'asymmetric'}{' act-order' if scheme.actorder else ''}"
    )
