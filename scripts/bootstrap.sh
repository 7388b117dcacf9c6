#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv: torch 2.13.0 CPU first (a local wheel on these
# machines; any other spec may pull a multi-GB CUDA build), then the package with its test and Triton extras.
# Idempotent: does nothing when .venv already matches pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
stamp="$VENV/.int4lora-installed"
want="$(sha256sum pyproject.toml scripts/bootstrap.sh scripts/pip_quiet.sh | sha256sum | cut -c1-16)"
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
source scripts/pip_quiet.sh
echo "[bootstrap] setting up $VENV (first run: a few minutes) ..."
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
pip_quiet "$VENV/bin/python" "torch==2.13.0"
pip_quiet "$VENV/bin/python" "triton==3.6.0" -e ".[test,plots]"
echo "$want" > "$stamp"
echo "[bootstrap] ready: $("$VENV/bin/python" -c 'import torch, transformers, peft; print("torch", torch.__version__, "| transformers", transformers.__version__, "| peft", peft.__version__)')"
