#!/usr/bin/env bash
# The main job on its embedded default: builds a tiny INT4 (compressed-tensors W4A16) model with the toolkit's own
# packer, fine-tunes a LoRA adapter on the bundled data on the CPU, exports it for vLLM and checks that the exported
# adapter, reloaded with plain PEFT onto the INT4 base, reproduces the trained model.
# Extra arguments go to `int4lora-train demo` (e.g. train.max_steps=20).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/int4lora-train demo "$@"
