"""Run a real vLLM on a model dir (+ LoRA adapter dir) and write logprobs / greedy tokens as JSON.

Runs INSIDE the vLLM venv: ``.venv-vllm/bin/python scripts/vllm_worker.py --request REQ.json --output OUT.json``.
The worker itself ships inside the package (``int4lora_train/export/vllm_worker.py``) so that ``verify_with_vllm``
works from an installed wheel too; it is executed here by path, which does not import ``int4lora_train`` (whose
dependencies differ from the vLLM venv's). See that file for the request and output format.
"""

import runpy
from pathlib import Path

if __name__ == "__main__":
    worker = Path(__file__).resolve().parents[1] / "int4lora_train" / "export" / "vllm_worker.py"
    runpy.run_path(str(worker), run_name="__main__")
