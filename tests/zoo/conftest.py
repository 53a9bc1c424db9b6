"""Fixtures of the toy-zoo tests: one tiny zoo per session (seconds to build)."""

from __future__ import annotations

import pytest
import torch

from dfsmerge.zoo import build_zoo


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: one thread is faster, and on a shared machine two threads can stall in OpenMP barriers
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.mktemp("zoo") / "tiny", size="tiny", seed=0, progress=False, threads=1)
