"""Fixtures for the modeling tests.

Helpers are fixtures (or library functions such as ``dequantized_copy``) rather than imports from this file: every
test directory has a ``conftest.py``, and ``from conftest import ...`` would pick whichever was imported first.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from int4lora_train.modeling import Int4Linear


@pytest.fixture
def tokens() -> torch.Tensor:
    """A [2, 12] batch of byte-token ids."""
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def dense_copies():
    """``dense_copies(model)``: names of float tensors (parameters or buffers) shaped like a converted layer's dense
    weight ``[out, in]``: a retained dense copy of an INT4 weight would show up here."""

    def find(model: nn.Module) -> list[str]:
        shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, Int4Linear)}
        return [
            name
            for name, t in [*model.named_parameters(), *model.named_buffers()]
            if t.is_floating_point() and tuple(t.shape) in shapes
        ]

    return find
