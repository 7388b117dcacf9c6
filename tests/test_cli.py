"""The command line itself: start-up cost, argument mistakes, a closed pipe (no model needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from int4lora_train import cli

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, **kwargs) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that imports this checkout's package."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, **kwargs)


@pytest.mark.parametrize("command", [[], ["train"], ["demo"], ["export"], ["inspect"], ["quantize"], ["verify"]])
def test_help_imports_no_heavy_library(command):
    code = (
        "import sys\n"
        "from int4lora_train import cli\n"
        "try:\n"
        f"    cli.main({[*command, '--help']!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('heavy:', sorted({'torch', 'transformers', 'peft', 'accelerate'} & set(sys.modules)))\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert "usage: int4lora-train" in done.stdout
    if command == ["verify"]:
        assert "--max-tokens" in done.stdout
    assert done.stdout.splitlines()[-1] == "heavy: []"


def test_verify_options_reach_verify(monkeypatch, capsys):
    from types import SimpleNamespace

    import int4lora_train.export.verify as verify

    seen = {}

    def fake_verify(*args, **kwargs):
        seen.update(args=args, **kwargs)
        return SimpleNamespace(passed=True, format_table=lambda: "PASS")

    monkeypatch.setattr(verify, "verify_with_vllm", fake_verify)
    assert cli.main(["verify", "-q", "model", "adapter", "--max-tokens", "4", "--prompt", "a b"]) == 0
    assert (seen["args"], seen["max_tokens"], seen["path"]) == (("model", "adapter", ["a b"]), 4, "auto")
    assert capsys.readouterr().out == "PASS\n"
    with pytest.raises(SystemExit):
        cli.main(["train", "--no-such-option"])


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "{file}"], "did you mean --config {file}?"),
        (["train", "missing.yml"], "did you mean --config missing.yml?"),
        (["demo", "{file}"], "did you mean `int4lora-train train --config {file}`?"),
    ],
)
def test_a_config_file_without_config_is_named_before_anything_runs(tmp_path, capsys, argv, expected):
    file = tmp_path / "my.yaml"
    file.write_text("train:\n  max_steps: 1\n", encoding="utf-8")
    argv = [a.format(file=file) for a in argv]
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert expected.format(file=file) in err
    assert out == ""  # nothing announced (the demo, the run directory)


def test_a_closed_pipe_ends_quietly():
    """``int4lora-train inspect --all | head -1``: the reader leaves, the command stops without a traceback."""
    code = (
        "import sys\n"
        "from int4lora_train import cli\n"
        "def endless(args):\n"
        "    while True:\n"
        "        print('model.layers.0.self_attn.q_proj  compressed-tensors  4096 x 4096')\n"
        "cli._cmd_inspect = endless\n"
        "sys.exit(cli.main(['inspect', '--all', 'some/dir']))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().startswith("model.layers.0")
    process.stdout.close()  # what `head -1` does after its line
    err = process.stderr.read()
    assert process.wait(timeout=60) == cli.EXIT_BROKEN_PIPE
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
