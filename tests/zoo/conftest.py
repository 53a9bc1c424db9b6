"""Fixtures of the toy-zoo tests: one tiny zoo per session (seconds to build)."""

from __future__ import annotations

import pytest

from dfsmerge.zoo import build_zoo


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every zoo test runs on one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.mktemp("zoo") / "tiny", size="tiny", seed=0, progress=False, threads=1)
