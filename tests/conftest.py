"""Fixtures shared by several test files (pytest finds them here; no import needed)."""

from pathlib import Path

import pytest
import torch

from test_training import make_rendered_pairs


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Toy pairs rendered once per test file (tests/test_training.py: make_rendered_pairs)."""
    return make_rendered_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models: one intra-op thread is faster, and 200x faster when another process
    keeps the second core busy (measured: 2 s vs 0.01 s per prediction). A test file opts in with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
