"""Exports for serving: vLLM-ready LoRA adapters with their base's identity, merged checkpoints, and the check that
a real vLLM reproduces the trained model.

- :mod:`~int4lora_train.export.vllm_rules`: every rule vLLM applies to an adapter (one place).
- :mod:`~int4lora_train.export.fingerprint`: the INT4 base's identity (``int4lora_base.json``).
- :mod:`~int4lora_train.export.adapter`: :func:`export_adapter`, :func:`check_base_fingerprint`,
  :func:`load_adapter` (the fingerprint check, then PEFT).
- :mod:`~int4lora_train.export.merge`: :func:`merge_to_dense`, :func:`merge_to_w4a16`.
- :mod:`~int4lora_train.export.verify`: :func:`verify_with_vllm` (runs ``vllm_worker.py`` in the vLLM venv).
"""

from int4lora_train.export.adapter import (
    BaseMismatchWarning,
    ExportReport,
    check_base_fingerprint,
    export_adapter,
    load_adapter,
    read_adapter_dir,
)
from int4lora_train.export.fingerprint import (
    SIDECAR_NAME,
    BaseIdentity,
    checkpoint_identity,
    model_identity,
    read_sidecar,
)
from int4lora_train.export.merge import MergeReport, iter_merged_tensors, merge_to_dense, merge_to_w4a16
from int4lora_train.export.verify import ParityReport, compare_with_vllm, find_vllm_python, verify_with_vllm
from int4lora_train.export.vllm_rules import MAX_LORA_RANKS, VLLM_LORA_MODULES, max_lora_rank_for, serve_commands

__all__ = [
    "MAX_LORA_RANKS",
    "SIDECAR_NAME",
    "VLLM_LORA_MODULES",
    "BaseIdentity",
    "BaseMismatchWarning",
    "ExportReport",
    "MergeReport",
    "ParityReport",
    "check_base_fingerprint",
    "checkpoint_identity",
    "compare_with_vllm",
    "export_adapter",
    "find_vllm_python",
    "iter_merged_tensors",
    "load_adapter",
    "max_lora_rank_for",
    "merge_to_dense",
    "merge_to_w4a16",
    "model_identity",
    "read_adapter_dir",
    "read_sidecar",
    "serve_commands",
    "verify_with_vllm",
]
