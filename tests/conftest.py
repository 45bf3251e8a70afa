"""Fixtures shared by several test files (pytest finds them here; no import needed)."""

import os
from pathlib import Path

# Tiny models: one intra-op thread is faster, and 50-200x faster when another process keeps the
# second core busy (measured: tests/test_training.py 260 s with 2 threads vs 7 s with 1 while a
# benchmark ran). For the whole session, and for the processes the tests start.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from test_training import make_rendered_pairs  # noqa: E402


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Toy pairs rendered once per test file (tests/test_training.py: make_rendered_pairs)."""
    return make_rendered_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture
def hub_offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 with an empty Hub cache (huggingface_hub reads both at import, so the
    module constants are patched): nothing can be fetched, whatever the machine."""
    import huggingface_hub.constants as hub
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
