"""The search logic of the benchmark scripts that decide what to run (no GPU, no model)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "longest_seq", Path(__file__).resolve().parents[1] / "benchmarks" / "longest_seq.py"
)
longest_seq = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(longest_seq)


@pytest.mark.parametrize(
    ("fits_up_to", "expected", "tried"),
    [
        (100_000, 98_304, [8192, 16384, 32768, 65536, 131072, 98304, 114688, 106496]),
        (5_000, None, [8192]),  # the first length fails: nothing fits
        (10**9, 262_144, [8192, 16384, 32768, 65536, 131072, 262144]),  # --max reached without a failure
    ],
)
def test_the_longest_length_doubles_then_bisects_to_the_granularity(fits_up_to, expected, tried):
    seen = []

    def outcome(seq):
        seen.append(seq)
        return seq <= fits_up_to

    assert longest_seq.lengths_to_try(8192, 262_144, 8192, outcome) == expected
    assert seen == tried
