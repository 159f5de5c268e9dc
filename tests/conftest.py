"""Shared test setup: fixed seeds, few threads, NaN-poisoned torch.empty (catches unwritten outputs)."""

from __future__ import annotations

import os

import pytest
import torch

# nothing in the suite may reach the network: Hugging Face loads fail fast instead of trying the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

_real_empty = torch.empty


def _nan_empty(*args, **kwargs):
    t = _real_empty(*args, **kwargs)
    if t.is_floating_point():
        t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    """Any output a kernel allocates with torch.empty and forgets to write shows up as NaN."""
    monkeypatch.setattr(torch, "empty", _nan_empty)
    torch.manual_seed(42)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
