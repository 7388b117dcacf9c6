"""``int4lora-train``: one command line over the toolkit.

::

    int4lora-train demo [section.key=value ...]               the embedded demo, end to end
    int4lora-train train [--config x.yaml] [section.key=value ...]
    int4lora-train export RUN_OR_ADAPTER_DIR [--base MODEL_DIR] [--out DIR]
    int4lora-train inspect MODEL_DIR                           the INT4 layout of a checkpoint
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
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "verify":  # verify parses its own options (_cmd_verify)
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
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
    export.set_defaults(handler=_cmd_export)

    inspect = command("inspect", "print a checkpoint's INT4 layout, module by module")
    inspect.add_argument("path", help="an INT4 checkpoint directory")
    inspect.add_argument("--all", action="store_true", help="one line per module (default: grouped by layout)")
    inspect.set_defaults(handler=_cmd_inspect)

    # verify's options live with it (export/verify.py, which imports torch): _cmd_verify parses them.
    verify = commands.add_parser("verify", help=VERIFY_HELP, description=VERIFY_HELP, parents=[common], add_help=False)
    verify.set_defaults(handler=_cmd_verify)
    return parser


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    common.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bar")
    return common


VERIFY_HELP = "check that vLLM reproduces the toolkit's model (+ adapter)"


def _cmd_verify(args: argparse.Namespace) -> int:
    from .export.verify import add_arguments, run_from_args

    parser = argparse.ArgumentParser(prog="int4lora-train verify", description=VERIFY_HELP, parents=[_common_options()])
    add_arguments(parser)
    return run_from_args(parser.parse_args(args.extra))


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
        from .export import export_adapter

        report = export_adapter(
            model,
            out_dir,
            base_model_dir=run_config.model.path,
            fold_scaling=run_config.output.export.fold_scaling,
            overwrite=True,
        )
        reports.append(report.summary())
        if run_config.output.export.check_reload:
            diff = reload_difference(model, tokenizer, run_config, report.out_dir)
            reports.append(
                f"Reloaded with PEFT onto a fresh copy of the INT4 base, the exported adapter reproduces the trained "
                f"model: max |logit difference| {diff:.3g} on {len(RELOAD_PROMPTS)} prompts"
            )
        return report.out_dir

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


RELOAD_PROMPTS = ("Q: Add 12 and 30.\nA: ", "Q: Write 47 in words.\nA: ", "The quick brown fox")


def reload_difference(trained, tokenizer, config, adapter_dir: Path) -> float:
    """max |logits(trained) - logits(base reloaded + exported adapter)| over :data:`RELOAD_PROMPTS`.

    Both run the same weights through the same operations, so the difference is 0 in practice; ``ExportError``
    above 1e-4 (fp32) or 5e-2 (half precision) means the export lost or changed something.
    """
    import torch

    from .errors import ExportError
    from .export import load_adapter
    from .train.job import load_model

    device = next(trained.parameters()).device
    reloaded = load_adapter(load_model(config, device), adapter_dir, strict=True).eval()
    was_training = trained.training
    trained.eval()
    worst = 0.0
    try:
        with torch.no_grad():
            for prompt in RELOAD_PROMPTS:
                ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
                expected = trained(input_ids=ids, use_cache=False).logits.float()
                got = reloaded(input_ids=ids, use_cache=False).logits.float()
                worst = max(worst, float((expected - got).abs().max()))
    finally:
        trained.train(was_training)
    tolerance = 1e-4 if config.model.dtype == "float32" else 5e-2
    if worst > tolerance:
        raise ExportError(
            f"the exported adapter in {adapter_dir} does not reproduce the trained model (max |logit difference| "
            f"{worst:.3g} > {tolerance:g}); please report this with the run's config.yaml"
        )
    return worst


# ---------------------------------------------------------------------------------------------------------------
# export


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_adapter
    from .train.config import load_config
    from .train.job import ADAPTER_DIR, CONFIG_FILE

    source = Path(args.source)
    base = args.base
    if (source / CONFIG_FILE).is_file():  # a run directory
        if base is None:
            base = load_config(source / CONFIG_FILE).model.path
        source = source / ADAPTER_DIR
    if not (source / "adapter_config.json").is_file():
        print(f"error: {args.source} is neither a run directory nor an adapter directory", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else source.with_name(source.name + "-vllm")
    if out.exists() and not args.overwrite:  # export_adapter's own message names its argument, overwrite=True
        raise ExportError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    report = export_adapter(
        str(source), out, base_model_dir=base, fold_scaling=args.fold_scaling, overwrite=args.overwrite
    )
    print(report.summary())
    return 0


# ---------------------------------------------------------------------------------------------------------------
# inspect


def _cmd_inspect(args: argparse.Namespace) -> int:
    rows, dense_bytes, quant = inspect_checkpoint(args.path)
    print(f"{args.path}: quant_method {quant.quant_method}, {len(rows)} INT4 modules")
    header = ("module", "format", "out x in", "group", "sym", "g_idx", "scale", "bytes", "vs bf16")
    table = [header]
    if args.all:
        for row in rows:
            table.append(_row_cells(row["module"], row))
    else:
        grouped: dict[tuple, list[dict]] = {}
        for row in rows:
            key = (
                _module_kind(row["module"]),
                *[row[k] for k in ("format", "shape", "group", "sym", "g_idx", "scale")],
            )
            grouped.setdefault(key, []).append(row)
        for (kind, *_), members in grouped.items():
            name = f"{kind} (x{len(members)})" if len(members) > 1 else members[0]["module"]
            table.append(
                _row_cells(
                    name,
                    {
                        **members[0],
                        "bytes": sum(m["bytes"] for m in members),
                        "dense": sum(m["dense"] for m in members),
                    },
                )
            )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    int4 = sum(r["bytes"] for r in rows)
    dense = sum(r["dense"] for r in rows)
    print(
        f"INT4 linears: {_mib(int4)} (bf16 would be {_mib(dense)}, {dense / max(int4, 1):.2f}x); "
        f"other tensors: {_mib(dense_bytes)}"
    )
    return 0


def inspect_checkpoint(path: str | os.PathLike) -> tuple[list[dict], int, object]:
    """Read every INT4 module of a checkpoint (one module's tensors at a time) into its canonical layout.

    Returns ``(rows, bytes of the non-INT4 tensors, the parsed quantization config)``; each row has ``module``,
    ``format``, ``shape`` ``(out, in)``, ``group``, ``sym``, ``g_idx``, ``scale`` (dtype), ``bytes`` (as stored)
    and ``dense`` (the bf16 size). Reading the tensors checks them: a corrupt module raises with its name.
    """
    from safetensors import safe_open

    from .errors import CheckpointError
    from .modeling.loader import find_shards
    from .quant.checkpoint_config import read_checkpoint_quant_config
    from .quant.formats import detect_format, read_int4_weight

    directory = Path(path)
    quant = read_checkpoint_quant_config(directory)
    if quant is None:
        raise CheckpointError(f"{directory}/config.json has no quantization_config: not an INT4 checkpoint")
    shards, _ = find_shards(directory, allow_pickle=False)
    rows, other_bytes = [], 0
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            modules: dict[str, list[str]] = {}
            for key in handle.keys():
                prefix, _, leaf = key.rpartition(".")
                modules.setdefault(prefix, []).append(leaf)
            for prefix, leaves in modules.items():
                if "weight_packed" not in leaves and "qweight" not in leaves:
                    other_bytes += sum(_stored_bytes(handle.get_slice(f"{prefix}.{leaf}")) for leaf in leaves)
                    continue
                tensors = {leaf: handle.get_tensor(f"{prefix}.{leaf}") for leaf in leaves}
                weight = read_int4_weight(tensors, name=prefix, scheme=quant.scheme_for(prefix, "Linear"))
                out_features = weight.packed.shape[0]
                rows.append(
                    {
                        "module": prefix,
                        "format": detect_format(tensors),
                        "shape": (out_features, weight.in_features),
                        "group": weight.group_size if weight.scales.shape[1] > 1 else "channel",
                        "sym": "asym" if weight.zero_points is not None else "sym",
                        "g_idx": "yes" if weight.g_idx is not None else "no",
                        "scale": str(weight.scales.dtype).removeprefix("torch."),
                        "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                        "dense": out_features * weight.in_features * 2,
                    }
                )
    return rows, other_bytes, quant


def _stored_bytes(tensor_slice) -> int:
    sizes = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}
    count = 1
    for dim in tensor_slice.get_shape():
        count *= dim
    return count * sizes.get(tensor_slice.get_dtype(), 4)


def _module_kind(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``model.layers.*.self_attn.q_proj``."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def _row_cells(name: str, row: dict) -> tuple[str, ...]:
    out, inp = row["shape"]
    return (
        name,
        row["format"],
        f"{out} x {inp}",
        str(row["group"]),
        row["sym"],
        row["g_idx"],
        row["scale"],
        _mib(row["bytes"]),
        f"{row['dense'] / max(row['bytes'], 1):.2f}x",
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


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
