"""Train a LoRA adapter from a YAML config; the entry point for ``accelerate launch``.

    python scripts/train.py --config configs/demo.yaml
    accelerate launch --num_processes 2 scripts/train.py --config configs/multi_gpu_ddp.yaml train.lr=1e-4

The same as ``int4lora-train train``: every process runs it, accelerate provides the process group.
"""

import sys

from int4lora_train.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
