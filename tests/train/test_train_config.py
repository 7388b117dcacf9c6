"""The YAML config: one parser, typed sections, errors that name the key and suggest the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from int4lora_train.errors import ConfigError
from int4lora_train.train.config import config_reference, load_config, save_config

REPO = Path(__file__).resolve().parents[2]


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_misspelled_key_is_named_with_its_section_and_the_closest_key(tmp_path):
    path = _yaml(tmp_path, "data:\n  packng: true\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    assert "unknown key 'data.packng'" in message
    assert "did you mean 'data.packing'?" in message


def test_key_in_the_wrong_section_points_to_where_it_lives(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'lora.lr'.*did you mean 'train.lr'\?"):
        load_config(_yaml(tmp_path, "lora:\n  lr: 1.0e-4\n"))


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("learning_rate", "train.lr"),
        ("lerning_rate", "train.lr"),
        ("num_epochs", "train.epochs"),
        ("load_best_model_at_end", "train.keep_best"),
    ],
)
def test_other_trainers_names_point_to_ours(tmp_path, key, expected):
    with pytest.raises(ConfigError, match=rf"unknown key 'train.{key}'.*did you mean '{expected}'\?"):
        load_config(_yaml(tmp_path, f"train:\n  {key}: 1\n"))


def test_misspelled_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*did you mean 'train'\?"):
        load_config(_yaml(tmp_path, "trian:\n  lr: 1.0e-4\n"))


def test_misspelled_override_is_reported_as_an_override():
    with pytest.raises(ConfigError, match=r"override 'train.max_step=3'.*did you mean 'train.max_steps'\?"):
        load_config(None, ["train.max_step=3"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.max_steps=ten", "train.max_steps must be an integer, got 'ten'"),
        ("train.max_steps=2.5", "train.max_steps must be an integer"),
        ("train.lr=fast", "train.lr must be a number"),
        ("data.packing=maybe", "data.packing must be true or false"),
        ("data.format=chatt", "did you mean 'chat'"),
        ("train.scheduler=cosin", "did you mean 'cosine'"),
        ("lora.target_modules=5", "lora.target_modules must be"),
        ("data.train_files=[1]", r"data.train_files\[0\] must be a non-empty string"),
    ],
)
def test_type_errors(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.max_steps=0", "train.max_steps must be >= 1, got 0"),
        ("train.lr=0", "train.lr must be > 0"),
        ("lora.dropout=1.5", "lora.dropout must be <= 0.99"),
        ("data.validation_split=0.9", "data.validation_split must be <= 0.5"),
        ("lora.r=-4", "lora.r must be >= 1"),
    ],
)
def test_range_errors(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.max_steps=5", "train.epochs=2"], "train.max_steps or train.epochs, not both"),
        (["data.validation_file=v.jsonl", "data.validation_split=0.1"], "not both"),
        (["model.cache_budget_mb=512"], "only applies with model.mode: cache"),
        (["train.adam_betas=[0.9]"], "two numbers"),
    ],
)
def test_conflicting_keys(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, overrides)


def test_overrides_are_parsed_as_yaml_scalars():
    config = load_config(
        None,
        [
            "train.lr=1e-4",  # PyYAML reads this as a string: accepted as a float
            "lora.target_modules=[q_proj, v_proj]",
            "data.train_files=a.jsonl",  # one path -> a list of one
            "train.mixed_precision=no",  # YAML 1.1 `no` is false: still the choice "no"
            "train.max_grad_norm=null",
            "train.resume=true",
            "output.export.enabled=false",
        ],
    )
    assert config.train.lr == 1e-4 and isinstance(config.train.lr, float)
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.data.train_files == ["a.jsonl"]
    assert config.train.mixed_precision == "no"
    assert config.train.max_grad_norm is None
    assert config.resume_target == "latest"
    assert config.output.export.enabled is False


def test_an_override_beats_the_file(tmp_path):
    config = load_config(_yaml(tmp_path, "train:\n  lr: 0.1\n  seed: 7\n"), ["train.lr=0.2"])
    assert (config.train.lr, config.train.seed) == (0.2, 7)


def test_an_override_of_one_of_an_either_or_pair_replaces_the_files_other(tmp_path, caplog):
    path = _yaml(tmp_path, "train:\n  epochs: 2\ndata:\n  validation_split: 0.1\n")
    with caplog.at_level("INFO", logger="int4lora_train.train.config"):
        config = load_config(path, ["train.max_steps=3", "data.validation_file=v.jsonl"])
    assert (config.train.max_steps, config.train.epochs) == (3, None)
    assert (config.data.validation_file, config.data.validation_split) == ("v.jsonl", 0.0)
    assert "train.max_steps from the command line overrides train.epochs=2 of the config" in caplog.messages
    assert load_config(_yaml(tmp_path, "train:\n  max_steps: 9\n"), ["train.epochs=1.5"]).train.max_steps is None
    with pytest.raises(ConfigError, match="not both"):  # both in the file: still the user's contradiction
        load_config(_yaml(tmp_path, "train:\n  max_steps: 9\n  epochs: 1\n"), ["train.lr=0.1"])


@pytest.mark.parametrize("override", ["train.lr", "=3", "train.lr.x=1"])
def test_malformed_overrides(override):
    with pytest.raises(ConfigError):
        load_config(None, [override])


def test_saved_config_reads_back_equal(tmp_path):
    config = load_config(None, ["train.lr=3e-3", "lora.target_modules=[q_proj]", "train.resume=runs/x/step-4"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_not_yaml_and_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_yaml(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_yaml(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_parse_and_the_demo_config_is_the_embedded_default():
    from int4lora_train.demo import demo_config

    for path in sorted((REPO / "configs").glob("*.yaml")):
        if path.name.startswith("accelerate"):
            continue
        load_config(path)
    assert load_config(REPO / "configs" / "demo.yaml") == demo_config()


def test_docs_hold_the_current_config_reference():
    docs = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    table = config_reference()
    assert "| `train.lr` | float | `0.0002` |" in table and "`output.export.enabled`" in table
    assert table in docs, (
        "docs/training.md's config reference is stale: paste the output of "
        "`python -c 'from int4lora_train.train import config_reference; print(config_reference())'`"
    )
