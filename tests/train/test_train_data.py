"""Data: loss masks per format, packing that keeps samples apart, errors that name file and line."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch
from train_helpers import TINY, write_jsonl

from int4lora_train.errors import DataError
from int4lora_train.modeling.tiny_models import CHAT_TEMPLATE, build_tiny_model, build_tokenizer
from int4lora_train.train.config import DataConfig, TrainConfig
from int4lora_train.train.data import (
    IGNORE_INDEX,
    Record,
    build_samples,
    chat_assistant_mask,
    collate,
    load_datasets,
    make_sample,
    pack_samples,
    read_records,
    tokenize_record,
)
from int4lora_train.train.module import LoraModule

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "q"},
    {"role": "assistant", "content": "ab"},
]


def _targets(tokenizer, ids, labels) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])


def test_text_every_token_is_a_target(tokenizer):
    ids, labels = tokenize_record(Record({"text": "hello"}, "f", 1), DataConfig(format="text"), tokenizer)
    assert ids == labels
    assert tokenizer.decode(ids) == "hello</s>"


def test_instruction_loss_only_on_the_completion(tokenizer):
    record = Record({"prompt": "2+2=", "completion": "4"}, "f", 1)
    ids, labels = tokenize_record(record, DataConfig(format="instruction"), tokenizer)
    assert tokenizer.decode(ids) == "2+2=4</s>"
    assert labels[:4] == [IGNORE_INDEX] * 4
    assert _targets(tokenizer, ids, labels) == "4</s>"


def test_chat_loss_only_on_assistant_turns(tokenizer):
    record = Record({"messages": CHAT}, "f", 1)
    ids, labels = tokenize_record(record, DataConfig(format="chat"), tokenizer)
    assert _targets(tokenizer, ids, labels) == "yo</s>ab</s>"
    assert tokenizer.decode(ids).startswith("<s>system\nbe brief</s>")


def test_chat_without_generation_marks_falls_back_to_prefix_diffing(tokenizer):
    plain = build_tokenizer()
    plain.chat_template = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    ids, marked = chat_assistant_mask(tokenizer, CHAT)
    plain_ids, diffed = chat_assistant_mask(plain, CHAT)
    assert plain_ids == ids
    # The diff covers each assistant turn as rendered: the marked tokens plus the template's newline after them.
    assert all(d >= m for d, m in zip(diffed, marked))
    extra = [i for i, d, m in zip(ids, diffed, marked) if d and not m]
    assert tokenizer.decode(extra) == "\n\n"


def test_truncation_and_samples_left_without_targets(tokenizer, tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "p" * 20, "completion": "c"},  # the prompt fills max_length: no target left, dropped
            {"prompt": "ab", "completion": "c" * 20},  # truncated, kept
        ],
    )
    samples, stats = build_samples([path], DataConfig(format="instruction", max_length=8), tokenizer)
    assert len(samples) == 1 and stats.dropped_no_target == 1 and stats.truncated == 2
    assert len(samples[0]) == 8
    assert samples[0].labels[0] == IGNORE_INDEX  # the first token never has a predecessor


def test_packing_keeps_samples_independent(tokenizer):
    """A packed row gives the same per-token losses as its samples one by one: attention stays within each
    sample (position_ids restart) and no sample predicts across a boundary."""
    config = DataConfig(format="instruction")
    records = [
        {"prompt": "Q: 12+3", "completion": "=15"},
        {"prompt": "hi", "completion": " there"},
        {"prompt": "x", "completion": "yz"},
    ]
    samples = [
        make_sample(*tokenize_record(Record(r, "f", i), config, tokenizer), 64)[0] for i, r in enumerate(records)
    ]
    (row,) = pack_samples(samples, max_length=64)
    assert len(row) == sum(len(s) for s in samples)
    model = build_tiny_model("llama", **TINY)

    module = LoraModule(model, TrainConfig())

    def loss_of(rows):  # the (loss_sum, num_targets) the Trainer sums over a validation set
        return module.validation_step(collate(rows, pad_token_id=0))

    with torch.no_grad():
        packed_sum, packed_count = loss_of([row])
        separate = [loss_of([s]) for s in samples]
        padded_sum, _ = loss_of(samples)  # one batch, right-padded to the longest
    assert int(packed_count) == sum(int(c) for _, c in separate) == sum(s.num_targets for s in samples)
    expected = sum(float(s) for s, _ in separate)
    assert float(packed_sum) == pytest.approx(expected, rel=1e-5)
    assert float(padded_sum) == pytest.approx(expected, rel=1e-5)


def test_packing_never_exceeds_max_length_and_keeps_order(tokenizer):
    samples = [make_sample(list(range(3, 3 + n)), list(range(3, 3 + n)), 64)[0] for n in (5, 9, 4, 7, 2)]
    rows = pack_samples(samples, max_length=12)
    assert [len(r) for r in rows] == [5, 9, 11, 2]
    flat = torch.cat([r.input_ids for r in rows]).tolist()
    assert flat == torch.cat([s.input_ids for s in samples]).tolist()


BAD_FILES = [
    (
        "bad.jsonl",
        '{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": }\n',
        r"bad.jsonl:3: invalid JSON",
    ),
    (
        "missing.jsonl",
        '{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n',
        r"missing.jsonl:2: the record has no 'completion' field \(fields: prompt\); set data.completion_field",
    ),
    ("typed.jsonl", '{"prompt": "a", "completion": 5}\n', r"typed.jsonl:1: field 'completion' must be a str, got int"),
    (
        "array.json",
        '[\n  {"prompt": "a", "completion": "b"},\n\n  {"prompt": "a",\n   "answer": "b"}\n]\n',
        r"array.json:4: the record has no 'completion' field",
    ),
    ("notalist.json", '{"prompt": "a"}', r"notalist.json:1: a .json data file must hold one list"),
    ("scalar.jsonl", '"just a string"\n', r"scalar.jsonl:1: a record must be a JSON object"),
    ("data.csv", "a,b\n", r"unknown extension '.csv'"),
]


@pytest.mark.parametrize(("name", "content", "expected"), BAD_FILES)
def test_bad_records_name_file_and_line(tmp_path, tokenizer, name, content, expected):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=expected):
        build_samples([path], DataConfig(format="instruction"), tokenizer)


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([{"role": "user", "content": "hi"}], r"chat.jsonl:1: the conversation has no assistant turn"),
        ([{"role": "user"}, {"role": "assistant", "content": "x"}], r"chat.jsonl:1: message 0 \(user\) needs a string"),
        (["hi"], r"chat.jsonl:1: message 0 must be an object"),
    ],
)
def test_bad_chat_records(tmp_path, tokenizer, messages, expected):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    with pytest.raises(DataError, match=expected):
        build_samples([path], DataConfig(format="chat"), tokenizer)


def test_missing_file_and_text_files(tmp_path, tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")
    text = tmp_path / "corpus.txt"
    text.write_text("first line\n\nsecond line\n", encoding="utf-8")
    records = read_records(text)
    assert [(r.value["text"], r.line) for r in records] == [("first line", 1), ("second line", 3)]


def test_validation_split_is_seeded_and_disjoint(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"sample {i}"} for i in range(20)])
    config = DataConfig(train_files=[str(path)], format="text", validation_split=0.2)
    first, again, other = (load_datasets(config, tokenizer, seed) for seed in (1, 1, 2))
    assert len(first.train) == 16 and len(first.validation) == 4

    def texts(rows):
        return {tokenizer.decode(r.input_ids.tolist()) for r in rows}

    assert texts(first.validation) == texts(again.validation) != texts(other.validation)
    assert not texts(first.train) & texts(first.validation)


def test_json_array_records_keep_their_lines(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=1), encoding="utf-8")
    assert [r.line for r in read_records(path)] == [2, 5]


def test_alpaca_preset_is_the_instruction_path_with_the_alpaca_prompt(tokenizer):
    config = DataConfig(format="alpaca")
    plain = tokenize_record(Record({"instruction": "add", "input": "", "output": "4"}, "f", 1), config, tokenizer)
    ids, labels = plain
    assert _targets(tokenizer, ids, labels) == "4</s>"
    assert tokenizer.decode(ids).endswith("### Instruction:\nadd\n\n### Response:\n4</s>")
    assert "### Input" not in tokenizer.decode(ids)
    ids, labels = tokenize_record(
        Record({"instruction": "add", "input": "2+2", "output": "4"}, "f", 1), config, tokenizer
    )
    assert "### Input:\n2+2\n\n### Response:\n4</s>" in tokenizer.decode(ids)
    assert _targets(tokenizer, ids, labels) == "4</s>"


def test_sharegpt_preset_is_the_chat_path(tokenizer):
    speakers = {"system": "system", "user": "human", "assistant": "gpt"}
    conversations = [{"from": speakers[m["role"]], "value": m["content"]} for m in CHAT]
    sharegpt = tokenize_record(
        Record({"conversations": conversations}, "f", 1), DataConfig(format="sharegpt"), tokenizer
    )
    chat = tokenize_record(Record({"messages": CHAT}, "f", 1), DataConfig(format="chat"), tokenizer)
    assert sharegpt == chat
    assert _targets(tokenizer, *sharegpt) == "yo</s>ab</s>"


@pytest.mark.parametrize(
    ("data_format", "record", "expected"),
    [
        ("alpaca", {"instruction": "a", "response": "b"}, r"p.jsonl:1: the record has no 'output' field"),
        ("alpaca", {"instruction": "a", "input": 3, "output": "b"}, r"p.jsonl:1: field 'input' must be a str"),
        ("sharegpt", {"messages": []}, r"p.jsonl:1: the record has no 'conversations' field"),
        ("sharegpt", {"conversations": [{"from": "bot", "value": "x"}]}, r"p.jsonl:1: turn 0 is from 'bot'"),
        ("sharegpt", {"conversations": [{"from": "gpt"}]}, r"p.jsonl:1: turn 0 \(gpt\) needs a string 'value'"),
        ("sharegpt", {"conversations": [{"from": "human", "value": "x"}]}, r"p.jsonl:1: the conversation has no"),
    ],
)
def test_bad_preset_records_name_file_and_line(tmp_path, tokenizer, data_format, record, expected):
    path = write_jsonl(tmp_path / "p.jsonl", [record])
    with pytest.raises(DataError, match=expected):
        build_samples([path], DataConfig(format=data_format), tokenizer)


def test_pretokenized_records_skip_the_tokenizer(tokenizer):
    config = DataConfig(format="pretokenized")
    ids, labels = tokenize_record(Record({"input_ids": [1, 2, 3]}, "f", 1), config, tokenizer)
    assert ids == labels == [1, 2, 3]
    record = Record({"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, "f", 1)
    assert tokenize_record(record, config, tokenizer) == ([5, 6, 7], [-100, 6, 7])


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"text": "a"}, r"t.jsonl:1: the record has no 'input_ids' field"),
        ({"input_ids": [1, 100000]}, r"t.jsonl:1: input_ids must be token ids in \[0, \d+\).*found 100000"),
        ({"input_ids": []}, r"t.jsonl:1: input_ids .* it is empty"),
        ({"input_ids": [1, 2], "labels": [1]}, r"t.jsonl:1: labels must be a list as long as input_ids \(2\), got 1"),
        ({"input_ids": [1, 2], "labels": [1, -5]}, r"t.jsonl:1: labels must be token ids"),
    ],
)
def test_bad_pretokenized_records(tmp_path, tokenizer, record, expected):
    path = write_jsonl(tmp_path / "t.jsonl", [record])
    with pytest.raises(DataError, match=expected):
        build_samples([path], DataConfig(format="pretokenized"), tokenizer)


def test_parquet_arrow_and_save_to_disk_sources(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(6)]
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    config = DataConfig(format="instruction")
    reference, _ = build_samples([write_jsonl(tmp_path / "d.jsonl", rows)], config, tokenizer)
    for source in (tmp_path / "d.parquet", tmp_path / "saved", arrow):
        samples, stats = build_samples([source], config, tokenizer)
        assert stats.records == 6
        assert [s.input_ids.tolist() for s in samples] == [s.input_ids.tolist() for s in reference], source
    datasets.Dataset.from_list([{"prompt": "a", "answer": "b"}]).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad.parquet: row 1: the record has no 'completion' field"):
        build_samples([tmp_path / "bad.parquet"], config, tokenizer)
    datasets.DatasetDict({"train": table, "test": table}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(DataError, match=r"holds several splits \(train, test\)"):
        read_records(tmp_path / "splits")
    pretokenized = datasets.Dataset.from_list([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}])
    pretokenized.to_parquet(str(tmp_path / "tok.parquet"))
    (sample,), _ = build_samples([tmp_path / "tok.parquet"], DataConfig(format="pretokenized"), tokenizer)
    assert sample.labels.tolist() == [-100, 2, 3]


def test_a_table_without_datasets_names_the_extra(tmp_path, tokenizer, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(DataError, match=r"pip install 'int4lora-train\[datasets\]'"):
        read_records(tmp_path / "d.parquet")


def test_mix_draws_each_file_in_proportion(tmp_path, tokenizer):
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": f"s{i}"} for i in range(4)])
    large = write_jsonl(tmp_path / "large.jsonl", [{"text": f"l{i}"} for i in range(16)])
    config = DataConfig(train_files=[str(small), str(large)], format="text", mix=[1.0, 1.0])

    def texts(rows):
        return [tokenizer.decode(r.input_ids.tolist(), skip_special_tokens=True) for r in rows]

    first, again = (load_datasets(config, tokenizer, 7) for _ in range(2))
    mixed = texts(first.train)
    assert len(mixed) == 20 and texts(again.train) == mixed  # as many as the files hold together; seeded
    assert sum(t.startswith("s") for t in mixed) == 10  # the small file twice over and 2 more of its 4
    assert set(t for t in mixed if t.startswith("l")) <= {f"l{i}" for i in range(16)}
    assert len(set(t for t in mixed if t.startswith("l"))) == 10  # 10 of 16, none twice
    split = load_datasets(dataclasses.replace(config, validation_split=0.25), tokenizer, 7)
    held = texts(split.validation)
    assert sum(t.startswith("s") for t in held) == 1 and sum(t.startswith("l") for t in held) == 4
    assert not set(held) & set(texts(split.train))  # each file split first: nothing in both


def test_mix_needs_one_weight_per_file():
    from int4lora_train.errors import ConfigError
    from int4lora_train.train.config import load_config

    with pytest.raises(ConfigError, match="data.mix needs one positive weight per training file"):
        load_config(None, ["data.train_files=[a.jsonl, b.jsonl]", "data.mix=[1.0]"])
