"""``int4lora-train``: one command line over the toolkit.

::

    int4lora-train demo [section.key=value ...]               the embedded demo, end to end
    int4lora-train train [--config x.yaml] [section.key=value ...]
    int4lora-train export RUN_OR_ADAPTER_DIR [--base MODEL_DIR] [--out DIR] [--checkpoint best|last|step-N]
    int4lora-train inspect MODEL_DIR                           the INT4 layout of a checkpoint
    int4lora-train quantize DENSE_DIR OUT_DIR [--format compressed-tensors|gptq|awq] [--group-size 128]
                                                               a dense checkpoint -> INT4 W4A16 (RTN)
    int4lora-train verify MODEL_DIR [ADAPTER_DIR]              vLLM reproduces the toolkit's model (needs vLLM)

``train`` without ``--config`` runs the embedded demo config. Under ``accelerate launch`` every process runs the
same command (``scripts/train.py`` is this entry point); only the main process prints. Exit status: 0 done, 2 an
error the message explains (config, data, checkpoint, export), 3 a run that stopped before its last step, 130
interrupted (Ctrl-C; a training run saves a checkpoint and prints the command that resumes it).

Start-up stays fast: torch, transformers and PEFT are imported inside the commands that need them, never at the
top of this module (``--help`` imports none of them).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from .errors import ConfigError, ExportError, Int4LoraError

logger = logging.getLogger("int4lora_train")

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


PEFT_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"
"""PEFT (0.21) reads transformers' old property name in every PeftModel; nothing a user (or this toolkit) can change."""


def main(argv: Sequence[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=PEFT_DEPRECATION, category=FutureWarning)
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        return args.handler(args)
    except Int4LoraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # training handles its own (_train); anywhere else there is nothing to save
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`int4lora-train inspect --all | head`). Python flushes stdout again at exit and
        # would fail there too, so stdout goes to /dev/null first; then exit quietly.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout without a file descriptor (replaced in-process): nothing to flush
            pass
        return EXIT_BROKEN_PIPE
    except OSError as exc:  # a filesystem failure no library call turned into a toolkit error: name the file
        where = f" ({exc.filename})" if exc.filename else ""
        print(
            f"error: {exc.strerror or exc}{where}; check the path, its permissions and the free space", file=sys.stderr
        )
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="int4lora-train", description="LoRA on the exact INT4 weights vLLM serves.")
    common = _common_options()
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, parents=[common])

    demo = command("demo", "build the tiny INT4 demo model and run the main job on it")
    demo.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    demo.set_defaults(handler=_cmd_demo)

    train = command("train", "train a LoRA adapter from a YAML config")
    train.add_argument("--config", "-c", help="YAML config (default: the embedded demo config)")
    train.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    train.set_defaults(handler=_cmd_train)

    export = command("export", "export an adapter for vLLM (checked against vLLM's rules)")
    export.add_argument("source", help="a run directory (uses its adapter/ and config.yaml) or a PEFT adapter dir")
    export.add_argument("--base", help="the INT4 checkpoint it will be served on (default: the run's model.path)")
    export.add_argument("--out", help="output directory (default: <source>-vllm)")
    export.add_argument("--fold-scaling", action="store_true", help="fold per-module LoRA scales into lora_B")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    export.add_argument(
        "--checkpoint",
        metavar="best|last|step-N",
        help="export a checkpoint of the run instead of its final adapter: best (lowest validation loss, "
        "train.keep_best), last, or step-N (default out: <run>/adapter-<step-N>-vllm)",
    )
    export.set_defaults(handler=_cmd_export)

    inspect = command("inspect", "print a checkpoint's INT4 layout, module by module")
    inspect.add_argument("path", help="an INT4 checkpoint directory")
    inspect.add_argument("--all", action="store_true", help="one line per module (default: grouped by layout)")
    inspect.set_defaults(handler=_cmd_inspect)

    quantize = command("quantize", "quantize a dense transformers checkpoint to INT4 W4A16 (round to nearest)")
    quantize.add_argument("dense_dir", help="a dense checkpoint directory (save_pretrained; nothing is downloaded)")
    quantize.add_argument("out_dir", help="the INT4 checkpoint directory to write")
    quantize.add_argument("--scheme", choices=["w4a16"], default="w4a16", help="quantization scheme (default w4a16)")
    quantize.add_argument("--group-size", type=int, default=128, help="input columns per scale (default 128)")
    sym = quantize.add_mutually_exclusive_group()
    sym.add_argument(
        "--symmetric", dest="symmetric", action="store_true", default=True, help="no zero points (default)"
    )
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", help="per-group zero points")
    quantize.add_argument(
        "--format",
        choices=["compressed-tensors", "gptq", "awq"],
        default="compressed-tensors",
        help="checkpoint format",
    )
    quantize.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default="auto",
        help="dtype of the dense tensors and the scales (default: the checkpoint's)",
    )
    quantize.add_argument(
        "--ignore",
        action="append",
        metavar="NAME",
        help="a linear left dense (exact name or re:REGEX; default lm_head)",
    )
    quantize.add_argument("--overwrite", action="store_true", help="replace an OUT_DIR that int4lora-train wrote")
    quantize.add_argument("--per-layer", action="store_true", help="print every layer's quantization error")
    quantize.add_argument("--trust-remote-code", action="store_true", help="run model code shipped with the checkpoint")
    quantize.set_defaults(handler=_cmd_quantize)

    verify = command("verify", "check that vLLM reproduces the toolkit's model (+ adapter)")
    verify.add_argument("model_dir", help="the INT4 checkpoint directory vLLM serves")
    verify.add_argument("adapter_dir", nargs="?", help="an exported adapter directory (optional)")
    verify.add_argument("--prompt", action="append", dest="prompts", help="a prompt (repeat for more)")
    verify.add_argument("--max-tokens", type=int, default=16, help="greedy tokens to generate per prompt")
    verify.add_argument("--logprobs", type=int, default=20, help="top tokens compared per position (-1: all)")
    verify.add_argument(
        "--path",
        choices=["auto", "int4", "dense"],
        default="auto",
        help="int4: vLLM serves the INT4 checkpoint (needs its W4A16 kernel: AVX-512 on CPUs); dense: vLLM serves a "
        "float32 copy decompressed by compressed-tensors; auto: int4 where it can run (docs/verification.md)",
    )
    verify.add_argument("--dtype", help="vLLM dtype (default: float16 on the int4 path, float32 on the dense path)")
    verify.add_argument(
        "--tolerance", type=float, help="max allowed |logprob difference| (default: 1e-2 int4, 1e-4 dense)"
    )
    verify.add_argument("--device", default="cpu", help="device for the toolkit's reference forward")
    verify.add_argument("--strict-base", action="store_true", help="refuse an adapter trained on another base")
    verify.add_argument("--vllm-python", help="interpreter with vLLM (default: .venv-vllm/bin/python)")
    verify.set_defaults(handler=_cmd_verify)
    return parser


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    common.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bar")
    return common


def _cmd_verify(args: argparse.Namespace) -> int:
    """Run the vLLM parity check, print its table; exit status 0 on PASS, 1 on FAIL."""
    from .export.verify import verify_with_vllm

    report = verify_with_vllm(
        args.model_dir,
        args.adapter_dir,
        args.prompts,
        max_tokens=args.max_tokens,
        logprobs=args.logprobs,
        path=args.path,
        dtype=args.dtype,
        tolerance=args.tolerance,
        device=args.device,
        strict_base=args.strict_base,
        vllm_python=args.vllm_python,
    )
    print(report.format_table())
    return 0 if report.passed else 1


# ---------------------------------------------------------------------------------------------------------------
# train / demo


def _cmd_demo(args: argparse.Namespace) -> int:
    _refuse_config_files_as_overrides("demo", args.overrides)
    from .demo import demo_config

    config = demo_config(args.overrides)
    _say(
        "int4lora-train demo: builds a tiny Llama, quantizes it to a real compressed-tensors W4A16 checkpoint, "
        f"trains LoRA on the bundled Q/A data and exports the adapter; run directory {config.output.dir}"
    )
    return _train(config, quiet=args.quiet)


def _cmd_train(args: argparse.Namespace) -> int:
    _refuse_config_files_as_overrides("train", args.overrides)
    from .demo import demo_config
    from .train.config import load_config

    if args.config is None:
        _say("no --config given: running the embedded demo config (int4lora_train/resources/demo.yaml)")
        config = demo_config(args.overrides)
    else:
        config = load_config(args.config, args.overrides)
    return _train(config, quiet=args.quiet)


def _refuse_config_files_as_overrides(command: str, overrides: Sequence[str]) -> None:
    """A config file given without ``--config`` (``int4lora-train train my.yaml``) is named as such, before
    anything is announced or loaded."""
    for item in overrides:
        if "=" not in item and (item.lower().endswith((".yaml", ".yml")) or Path(item).is_file()):
            fix = f"--config {item}" if command == "train" else f"`int4lora-train train --config {item}`"
            raise ConfigError(
                f"{item!r} is not a section.key=value override; did you mean {fix}? "
                f"(`{command}` takes a config file only through --config)"
            )


def _train(config, quiet: bool) -> int:
    from .demo import resolve_demo
    from .train.job import run_training

    config = resolve_demo(config)
    reports = []

    def export_fn(model, tokenizer, run_config, out_dir: Path) -> Path:
        from .export.run import export_run_adapter

        written, paragraphs = export_run_adapter(model, tokenizer, run_config, out_dir)
        reports.extend(paragraphs)
        return written

    from tqdm.contrib.logging import logging_redirect_tqdm
    from transformers.utils import logging as hf_logging

    from .errors import TrainingInterrupted
    from .train.job import resume_command

    try:
        # On a terminal, log lines print above the progress bar, not through it (transformers' too: its handler is
        # set up on first use, so before the redirect swaps it).
        with logging_redirect_tqdm(loggers=[logger, hf_logging.get_logger()]):
            summary = run_training(config, export_fn=export_fn, progress_bar=not quiet)
    except TrainingInterrupted as stop:
        where = f"the newest checkpoint is {stop.checkpoint}" if stop.checkpoint else "no checkpoint was written yet"
        launcher = " (under the same `accelerate launch` options)" if _world_size() > 1 else ""
        if _is_main_process():
            print(
                f"Interrupted at step {stop.step}/{stop.max_steps}; {where}. Resume with{launcher}:\n"
                f"  {resume_command(config)}",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED
    if _is_main_process():
        for report in reports:
            print(report, end="\n\n")
        print(summary.format())
    return 0 if summary.completed else 3


# ---------------------------------------------------------------------------------------------------------------
# export


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_adapter
    from .export.run import export_source

    if args.checkpoint is not None:
        from .export.run import checkpoint_peft_model, run_checkpoint
        from .train.config import load_config
        from .train.job import CONFIG_FILE

        run_dir = Path(args.source)
        if not (run_dir / CONFIG_FILE).is_file():
            raise ExportError(f"--checkpoint needs a run directory (with {CONFIG_FILE}); {run_dir} is not one")
        checkpoint = run_checkpoint(run_dir, args.checkpoint)
        run_config = load_config(run_dir / CONFIG_FILE)
        base = args.base or run_config.model.path
        out = Path(args.out) if args.out else run_dir / f"adapter-{checkpoint.name}-vllm"
        source = None
    else:
        source, base = export_source(args.source, args.base)
        out = Path(args.out) if args.out else source.with_name(source.name + "-vllm")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory; choose another --out")
    if (
        out.is_dir() and any(out.iterdir()) and not args.overwrite
    ):  # export_adapter's own message names its argument, overwrite=True
        raise ExportError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    if source is None:
        _say(f"exporting {checkpoint} (loads the run's INT4 base on the CPU)")
        source = checkpoint_peft_model(run_config, checkpoint)
    else:
        source = str(source)
    report = export_adapter(source, out, base_model_dir=base, fold_scaling=args.fold_scaling, overwrite=args.overwrite)
    print(report.summary())
    return 0


# ---------------------------------------------------------------------------------------------------------------
# inspect


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .errors import UnsupportedFormatError
    from .quant.inspect import inspect_checkpoint

    try:
        layout = inspect_checkpoint(args.path)
    except UnsupportedFormatError:
        _print_groups_of_refused(args.path)
        raise
    print(layout.table(per_module=args.all))
    return 0


def _print_groups_of_refused(path: str) -> None:
    """Show every config group (and which one is refused) of a checkpoint the toolkit does not load."""
    from .quant.checkpoint_dir import read_json
    from .quant.inspect import group_lines

    try:
        block = read_json(Path(path) / "config.json", "config.json").get("quantization_config")
    except Exception:  # the error being raised says what is wrong
        return
    if isinstance(block, dict):
        for line in group_lines(block):
            print(line)


# ---------------------------------------------------------------------------------------------------------------
# quantize


def _cmd_quantize(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .quant.convert import quantize_checkpoint

    bar = None

    def on_layer(error, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="quantizing", unit="layer", disable=args.quiet, file=sys.stderr)
        bar.set_postfix_str(error.name, refresh=False)
        bar.update()

    try:
        report = quantize_checkpoint(
            args.dense_dir,
            args.out_dir,
            scheme=args.scheme,
            format=args.format,
            group_size=args.group_size,
            symmetric=args.symmetric,
            ignore=args.ignore or ("lm_head",),
            dtype=args.dtype,
            overwrite=args.overwrite,
            trust_remote_code=args.trust_remote_code,
            on_layer=on_layer,
        )
    finally:
        if bar is not None:
            bar.close()
    print(report.summary(per_layer=args.per_layer))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _say(message: str) -> None:
    if _is_main_process():
        print(message, flush=True)


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet or not _is_main_process() else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


if __name__ == "__main__":
    sys.exit(main())
