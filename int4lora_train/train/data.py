"""Training data from local files: read records, tokenize with loss masks, pack, collate.

Three formats (``data.format``):

- ``text``: ``{"text": ...}`` records (or the lines of a ``.txt`` file); every token is a target.
- ``instruction``: ``{"prompt": ..., "completion": ...}``; only the completion (and EOS) is a target.
- ``chat``: ``{"messages": [{"role", "content"}, ...]}`` rendered with the tokenizer's chat template; only assistant
  turns are targets (from the template's ``{% generation %}`` marks, else by diffing rendered prefixes).

and two presets that map other tools' records onto them:

- ``alpaca``: ``{"instruction", "input" (optional), "output"}``, the prompt rendered with the Alpaca template, then
  the ``instruction`` path (the output is the completion).
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}``, mapped to messages
  (user / assistant / system), then the ``chat`` path.

``pretokenized`` records carry ``input_ids`` (and optional ``labels``, ``-100`` = no loss) and skip the tokenizer.

Files are ``.jsonl`` / ``.json`` / ``.txt``; with the ``datasets`` library (the ``datasets`` extra) also Parquet,
Arrow and ``save_to_disk`` directories, whose records are rows (``file: row N`` in errors). ``data.mix`` draws the
training set from several files in given proportions (:func:`mix_samples`).

Labels are aligned with ``input_ids`` (the loss shifts them); a label of ``-100`` is not a target. The first label of
every sample is ``-100`` (nothing precedes it), so samples packed into one row never predict across a boundary;
``position_ids`` restart at 0 for each packed sample and transformers then keeps attention inside each sample
(``attention_mask`` stays ``None``). Padding is one more segment with ``-100`` labels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from .config import DEMO, DataConfig

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Sample:
    """One training row. All three are int32 ``[T]``; packed rows restart ``position_ids`` at each sample."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


@dataclass
class DataStats:
    records: int = 0
    samples: int = 0
    dropped_no_target: int = 0
    truncated: int = 0
    tokens: int = 0
    target_tokens: int = 0


@dataclass
class Datasets:
    train: list[Sample]
    validation: list[Sample]
    stats: dict[str, DataStats] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Reading files


@dataclass(frozen=True)
class Record:
    value: Any
    file: str
    line: int  # 1-based: the line of a text file, the row of a table (``row``)
    row: bool = False

    @property
    def where(self) -> str:
        return f"{self.file}: row {self.line}" if self.row else f"{self.file}:{self.line}"


def read_records(path: str | Path) -> list[Record]:
    """Records of a ``.jsonl`` (one JSON value per line), ``.json`` (one top-level list) or ``.txt`` file.

    A ``.txt`` line becomes ``{"text": line}``; blank lines are skipped. Each record keeps its file and line.

    Raises:
        DataError: a missing file, or invalid JSON (naming file and line).
    """
    path = Path(path)
    if str(path) == DEMO:
        raise DataError("data path 'demo' is the bundled data set; resolve it with int4lora_train.demo first")
    if path.is_dir():
        return _table_records(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist (check data.train_files / data.validation_file)")
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        return _table_records(path)
    text = path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        return list(_jsonl_records(text, str(path)))
    if suffix == ".json":
        return list(_json_array_records(text, str(path)))
    if suffix == ".txt":
        return [Record({"text": line}, str(path), n) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    raise DataError(
        f"data file {path}: unknown extension {suffix!r}; use .jsonl, .json, .txt, .parquet, .arrow or a "
        "save_to_disk directory"
    )


TABLE_SUFFIXES = (".parquet", ".arrow")


def _table_records(path: Path) -> list[Record]:
    """The rows of a Parquet file, an Arrow file or a ``save_to_disk`` directory, read with ``datasets``."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet / Arrow / save_to_disk data needs the datasets library; "
            "pip install 'int4lora-train[datasets]'"
        ) from None
    try:
        if path.is_dir():
            table = datasets.load_from_disk(str(path))
        elif path.suffix.lower() == ".parquet":
            table = datasets.Dataset.from_parquet(str(path))
        else:
            table = datasets.Dataset.from_file(str(path))
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these; FileNotFoundError for a bare dir
        raise DataError(f"{path}: cannot be read as a data set ({type(exc).__name__}: {exc})") from exc
    if isinstance(table, datasets.DatasetDict):
        raise DataError(
            f"{path} holds several splits ({', '.join(table)}); point data.train_files / data.validation_file at "
            f"one of them ({path}/<split>)"
        )
    return [Record(row, str(path), number, row=True) for number, row in enumerate(table, 1)]


def _jsonl_records(text: str, file: str) -> Iterator[Record]:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield Record(json.loads(line), file, number)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}:{number}: invalid JSON ({exc.msg} at column {exc.colno})") from exc


def _json_array_records(text: str, file: str) -> Iterator[Record]:
    """Decode a top-level JSON list element by element, so each record knows the line it starts on."""
    decoder = json.JSONDecoder()

    def fail(pos: int, msg: str) -> DataError:
        return DataError(f"{file}:{text.count(chr(10), 0, pos) + 1}: {msg}")

    pos = _skip_space(text, 0)
    if pos >= len(text) or text[pos] != "[":
        raise fail(pos, "a .json data file must hold one list of records (use .jsonl for one record per line)")
    pos = _skip_space(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
        yield Record(value, file, text.count("\n", 0, pos) + 1)
        pos = _skip_space(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_space(text, pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            return
        raise fail(pos, "invalid JSON (expected ',' or ']' after a record)")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


# ---------------------------------------------------------------------------------------------------------------
# Tokenizing one record


def tokenize_record(record: Record, config: DataConfig, tokenizer: Any) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one record in ``config.format`` (untruncated; labels ``-100`` = no loss).

    Raises:
        DataError: the record lacks the configured field or has the wrong type (naming file and line).
    """
    if config.format == "text":
        text = _field(record, config.text_field, str, "data.text_field")
        ids = _encode(tokenizer, text, add_special_tokens=True) + _eos(tokenizer)
        return ids, list(ids)
    if config.format == "instruction":
        prompt = _field(record, config.prompt_field, str, "data.prompt_field")
        completion = _field(record, config.completion_field, str, "data.completion_field")
        return _instruction_ids(tokenizer, prompt, completion)
    if config.format == "alpaca":
        prompt, completion = alpaca_prompt_completion(record)
        return _instruction_ids(tokenizer, prompt, completion)
    if config.format == "pretokenized":
        return pretokenized_ids(record, tokenizer)
    if config.format in ("chat", "sharegpt"):
        if config.format == "chat":
            messages = _field(record, config.messages_field, list, "data.messages_field")
        else:
            messages = sharegpt_messages(record)
        _check_messages(messages, record)
        ids, mask = chat_assistant_mask(tokenizer, messages, where=record.where)
        return ids, [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]
    raise DataError(f"unknown data.format {config.format!r}")


def pretokenized_ids(record: Record, tokenizer: Any) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` as the record gives them (``labels`` default to ``input_ids``: every token a target).

    Raises:
        DataError: ids that are not integers in the tokenizer's vocabulary, or labels of another length.
    """
    ids = _field(record, "input_ids", list, "data.format (pretokenized records need input_ids)")
    vocab = len(tokenizer)
    bad = next((i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab), None)
    if bad is not None or not ids:
        shown = "it is empty" if not ids else f"found {bad!r}"
        raise DataError(f"{record.where}: input_ids must be token ids in [0, {vocab}) (the tokenizer's); {shown}")
    labels = record.value.get("labels")
    if labels is None:
        return list(ids), list(ids)
    if not isinstance(labels, list) or len(labels) != len(ids):
        got = f"{len(labels)} labels" if isinstance(labels, list) else type(labels).__name__
        raise DataError(f"{record.where}: labels must be a list as long as input_ids ({len(ids)}), got {got}")
    if any(isinstance(x, bool) or not isinstance(x, int) or not (x == IGNORE_INDEX or 0 <= x < vocab) for x in labels):
        raise DataError(f"{record.where}: labels must be token ids in [0, {vocab}) or {IGNORE_INDEX} (no loss)")
    return list(ids), list(labels)


def _instruction_ids(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    # Encoded apart so the boundary is exact: the prompt never leaks into the targets.
    prompt_ids = _encode(tokenizer, prompt, add_special_tokens=True)
    completion_ids = _encode(tokenizer, completion, add_special_tokens=False) + _eos(tokenizer)
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


# The Stanford Alpaca prompt (axolotl's and TRL's ``alpaca`` type), with and without an ``input``.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n"
    "{input}\n\n### Response:\n"
)

# ShareGPT speaker names (``from``) and the chat roles they become.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def alpaca_prompt_completion(record: Record) -> tuple[str, str]:
    """``(prompt, completion)`` of an Alpaca record: the Alpaca template around ``instruction`` (and a non-empty
    ``input``), ``output`` as the completion.

    Raises:
        DataError: a missing or non-string field (naming file and line).
    """
    instruction = _field(record, "instruction", str, "data.format (alpaca records need instruction/output)")
    output = _field(record, "output", str, "data.format (alpaca records need instruction/output)")
    extra = record.value.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DataError(f"{record.where}: field 'input' must be a str, got {type(extra).__name__} {extra!r:.60}")
    if extra and extra.strip():
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=extra), output
    return ALPACA_PROMPT.format(instruction=instruction), output


def sharegpt_messages(record: Record) -> list[dict]:
    """The ``{role, content}`` messages of a ShareGPT record's ``conversations`` (``from``/``value`` turns).

    Raises:
        DataError: a missing ``conversations`` list, a turn without ``from``/``value``, or an unknown speaker
            (naming file, line and turn).
    """
    turns = _field(record, "conversations", list, "data.format (sharegpt records need conversations)")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("from"), str):
            raise DataError(f"{record.where}: turn {i} must be an object with a string 'from', got {turn!r:.60}")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise DataError(
                f"{record.where}: turn {i} is from {turn['from']!r}; ShareGPT speakers are {', '.join(SHAREGPT_ROLES)}"
            )
        if not isinstance(turn.get("value"), str):
            raise DataError(f"{record.where}: turn {i} ({turn['from']}) needs a string 'value'")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def chat_assistant_mask(tokenizer: Any, messages: list[dict], where: str = "") -> tuple[list[int], list[int]]:
    """Render ``messages`` with the chat template: ``(input_ids, mask)``, mask 1 on assistant-turn tokens.

    Uses the template's ``{% generation %}`` marks when it has them. Otherwise each assistant turn is the tokens
    between the rendering of the turns before it (with the generation prompt) and the rendering that includes it,
    which needs a template whose renderings extend each other (most do); one that does not is a DataError.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise DataError(f"{where}: data.format is chat but the tokenizer has no chat template")
    if "{% generation %}" in template or "{%- generation %}" in template:
        encoded = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return list(encoded["input_ids"]), list(encoded["assistant_masks"])

    def render(turns: list[dict], generation_prompt: bool) -> list[int]:
        out = tokenizer.apply_chat_template(
            turns, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt
        )
        return list(out["input_ids"])

    ids = render(messages, False)
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(messages[:i], True)) if i else 0
        upto = render(messages[: i + 1], False)
        if upto != ids[: len(upto)] or start > len(upto):
            raise DataError(
                f"{where}: the chat template renders turn {i} differently inside the whole conversation, so the "
                "assistant tokens cannot be found; add {% generation %} marks to the template"
            )
        mask[start : len(upto)] = [1] * (len(upto) - start)
    return ids, mask


def _check_messages(messages: list, record: Record) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise DataError(f"{record.where}: message {i} must be an object with a string 'role', got {message!r}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{record.where}: message {i} ({message['role']}) needs a string 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{record.where}: the conversation has no assistant turn, so nothing to train on")


def _field(record: Record, name: str, kind: type, config_key: str) -> Any:
    if not isinstance(record.value, Mapping):
        raise DataError(f"{record.where}: a record must be a JSON object, got {type(record.value).__name__}")
    if name not in record.value:
        present = ", ".join(sorted(map(str, record.value))) or "none"
        raise DataError(f"{record.where}: the record has no '{name}' field (fields: {present}); set {config_key}")
    value = record.value[name]
    if not isinstance(value, kind):
        raise DataError(
            f"{record.where}: field '{name}' must be a {kind.__name__}, got {type(value).__name__} {value!r:.60}"
        )
    return value


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _eos(tokenizer: Any) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


# ---------------------------------------------------------------------------------------------------------------
# Samples, packing, batches


def make_sample(input_ids: Sequence[int], labels: Sequence[int], max_length: int) -> tuple[Sample | None, bool]:
    """Truncate to ``max_length`` and mask the first label: ``(sample or None if no target is left, truncated)``."""
    truncated = len(input_ids) > max_length
    ids = torch.tensor(list(input_ids[:max_length]), dtype=torch.int32)
    lab = torch.tensor(list(labels[:max_length]), dtype=torch.int32)
    if lab.numel():
        lab[0] = IGNORE_INDEX
    if ids.numel() < 2 or not bool((lab != IGNORE_INDEX).any()):
        return None, truncated
    return Sample(ids, lab, torch.arange(ids.numel(), dtype=torch.int32)), truncated


def pack_samples(samples: Sequence[Sample], max_length: int) -> list[Sample]:
    """Concatenate consecutive samples into rows of at most ``max_length`` tokens (order kept, none split)."""
    rows: list[Sample] = []
    current: list[Sample] = []
    length = 0
    for sample in samples:
        if current and length + len(sample) > max_length:
            rows.append(_concat(current))
            current, length = [], 0
        current.append(sample)
        length += len(sample)
    if current:
        rows.append(_concat(current))
    return rows


def _concat(parts: list[Sample]) -> Sample:
    if len(parts) == 1:
        return parts[0]
    return Sample(
        torch.cat([p.input_ids for p in parts]),
        torch.cat([p.labels for p in parts]),
        torch.cat([p.position_ids for p in parts]),
    )


def collate(samples: Sequence[Sample], pad_token_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row (or to ``width`` tokens, when the rows are not longer): ``input_ids``,
    ``labels``, ``position_ids``, all int64 ``[B, T]``.

    Padding restarts ``position_ids`` at 0, so it forms its own attention segment and never touches real tokens.
    """
    width = max(max(len(s) for s in samples), width or 0)
    batch = len(samples)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(width, dtype=torch.long).repeat(batch, 1)
    for row, sample in enumerate(samples):
        n = len(sample)
        input_ids[row, :n] = sample.input_ids
        labels[row, :n] = sample.labels
        position_ids[row, :n] = sample.position_ids
        position_ids[row, n:] = torch.arange(width - n)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def num_targets(batch: Mapping[str, torch.Tensor]) -> int:
    """Tokens that carry a loss in ``batch`` (labels are shifted by one inside the loss)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------------------------------------------
# Whole data sets


def build_samples(paths: Sequence[str | Path], config: DataConfig, tokenizer: Any) -> tuple[list[Sample], DataStats]:
    """Read, tokenize and truncate every record of ``paths`` (unpacked). Samples left without a target are dropped."""
    stats = DataStats()
    samples: list[Sample] = []
    for path in paths:
        for record in read_records(path):
            stats.records += 1
            ids, labels = tokenize_record(record, config, tokenizer)
            sample, truncated = make_sample(ids, labels, config.max_length)
            stats.truncated += truncated
            if sample is None:
                stats.dropped_no_target += 1
                continue
            samples.append(sample)
    if not samples:
        raise DataError(
            f"no usable samples in {', '.join(map(str, paths))} ({stats.records} records; "
            f"{stats.dropped_no_target} had no target token left after truncation to data.max_length="
            f"{config.max_length})"
        )
    return samples, stats


def load_datasets(config: DataConfig, tokenizer: Any, seed: int) -> Datasets:
    """Train and validation rows for ``config`` (validation from its file or a seeded split; mixed and packed if
    asked). With ``data.mix`` and ``validation_split`` each file is split first, so no sample is in both sets."""
    split = config.validation_file is None and config.validation_split > 0
    if config.mix is None:
        train, train_stats = build_samples(config.train_files, config, tokenizer)
        validation: list[Sample] = []
        if split:
            train, validation = split_samples(train, config.validation_split, seed)
    else:
        parts, validation, train_stats = [], [], DataStats()
        for path in config.train_files:
            part, stats = build_samples([path], config, tokenizer)
            for name in ("records", "dropped_no_target", "truncated"):
                setattr(train_stats, name, getattr(train_stats, name) + getattr(stats, name))
            if split:
                part, held = split_samples(part, config.validation_split, seed)
                validation += held
            parts.append(part)
        train = mix_samples(parts, config.mix, seed)
        logger.info(
            "data.mix: %s",
            ", ".join(
                f"{p}: {n} of {len(part)}" for p, n, part in zip(config.train_files, _shares(parts, config.mix), parts)
            ),
        )
    if config.validation_file is not None:
        validation, val_stats = build_samples([config.validation_file], config, tokenizer)
    else:
        val_stats = DataStats()
    if config.packing:
        train, validation = pack_samples(train, config.max_length), pack_samples(validation, config.max_length)
    if not validation:
        logger.info("no validation data (set data.validation_file or data.validation_split to evaluate)")
    for name, rows, stats in (("train", train, train_stats), ("validation", validation, val_stats)):
        if not rows:
            continue
        stats.samples = len(rows)
        stats.tokens = sum(len(r) for r in rows)
        stats.target_tokens = sum(r.num_targets for r in rows)
        if stats.truncated:
            logger.warning(
                "%s: %d samples were truncated to data.max_length=%d", name, stats.truncated, config.max_length
            )
        if stats.dropped_no_target:
            logger.warning(
                "%s: %d samples had no target token after truncation and were dropped", name, stats.dropped_no_target
            )
        logger.info(
            "%s data: %d rows, %d tokens, %d target tokens", name, stats.samples, stats.tokens, stats.target_tokens
        )
    return Datasets(train, validation, {"train": train_stats, "validation": val_stats})


def check_positions(datasets: Datasets, max_position_embeddings: int | None, max_length: int) -> int:
    """Warn when rows are longer than the model's ``max_position_embeddings`` (positions past it were never trained:
    RoPE extrapolates, learned position tables fail); returns how many rows are. Packed rows count as one row."""
    if not max_position_embeddings:
        return 0
    rows = [len(r) for r in (*datasets.train, *datasets.validation)]
    too_long = [n for n in rows if n > max_position_embeddings]
    if too_long:
        logger.warning(
            "%d of %d rows are longer than the model's max_position_embeddings=%d (longest %d tokens; "
            "data.max_length=%d): the model was not trained on positions that far. Set data.max_length to at most %d.",
            len(too_long), len(rows), max_position_embeddings, max(too_long), max_length, max_position_embeddings,
        )  # fmt: skip
    return len(too_long)


def split_samples(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``ceil(fraction * n)`` samples (at least one, leaving at least one) chosen by ``seed``."""
    if len(samples) < 2:
        raise DataError("data.validation_split needs at least 2 training samples")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    count = min(max(1, math.ceil(fraction * len(samples))), len(samples) - 1)
    held = set(order[:count])
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]


def _shares(parts: Sequence[Sequence[Sample]], weights: Sequence[float]) -> list[int]:
    """Samples drawn from each part: the parts' total, divided in proportion to ``weights`` (largest remainders)."""
    total = sum(len(p) for p in parts)
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[: total - sum(counts)]:
        counts[i] += 1
    return counts


def mix_samples(parts: Sequence[Sequence[Sample]], weights: Sequence[float], seed: int) -> list[Sample]:
    """One training set of as many samples as ``parts`` hold together, drawn from part ``i`` in proportion to
    ``weights[i]``: whole passes over a part as often as its share holds it, then a seeded choice of the rest
    (without replacement). Order: part by part (the trainer shuffles every epoch)."""
    if len(parts) != len(weights):
        raise DataError(f"data.mix has {len(weights)} weights for {len(parts)} training files")
    rng = random.Random(seed)
    mixed: list[Sample] = []
    for part, count in zip(parts, _shares(parts, weights)):
        passes, rest = divmod(count, len(part))
        mixed += list(part) * passes
        mixed += [part[i] for i in sorted(rng.sample(range(len(part)), rest))]
    return mixed


def fingerprint(samples: Sequence[Sample]) -> str:
    """A short hash of the rows' tokens and labels (a resumed run checks it sees the same data)."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(sample.input_ids.numpy().tobytes())
        digest.update(sample.labels.numpy().tobytes())
        digest.update(sample.position_ids.numpy().tobytes())
    return digest.hexdigest()[:16]
