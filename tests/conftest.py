"""Fixtures shared by the test modules; the functions they share are in helpers.py.

Heavy imports stay inside the fixtures, so modules that need neither (baselines, compare) collect fast.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: one intra-op thread is ~40x faster than two on a busy 2-core machine
    (OpenMP threads spin against each other). A module opts in with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def target():
    """The tiny random Llama target (vocab 64, seed 0) of `helpers.tiny_target`, one per module."""
    from helpers import tiny_target

    return tiny_target()
