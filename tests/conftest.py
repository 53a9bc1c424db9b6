"""Shared fixtures: tiny random checkpoints written once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run in the CPU interpreter (tests/kernels). triton.jit reads TRITON_INTERPRET when triton is
# imported, and any test module may import it first (peft does, in tests/io), so it is set here, before them all.
os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one process per core (pytest -n): each runs torch, and the subprocesses it starts, on one thread, so two
    # workers do not oversubscribe the cores (OpenMP barrier stalls on small matmuls). Read when torch is imported.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one torch thread avoids OpenMP barrier stalls (up to 100x on small
    matmuls). Restores the previous count afterwards."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_family_models(tmp_path_factory):
    """``{family: {"base": path, "ft1": path, "ft2": path, "ft3": path}}``: a base and three perturbed fine-tunes
    per supported family (2 layers, hidden 32)."""
    from dfsmerge.zoo.tiny import FAMILIES, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny_families")
    out = {}
    for fam in FAMILIES:
        base = make_tiny_checkpoint(fam, root / fam / "base", seed=0, num_layers=2, hidden=32)
        models = {"base": base}
        for i in (1, 2, 3):
            models[f"ft{i}"] = make_tiny_checkpoint(fam, root / fam / f"ft{i}", seed=i, like=base, delta_std=0.2)
        out[fam] = models
    return out


def pytest_collection_modifyitems(config, items):
    """The real-checkpoint modules (the longest) first, the rest in their order: with one worker per core
    (``pytest -n``, ``--dist loadfile`` hands out whole modules in this order) no worker is left alone with a
    long module at the end."""
    items.sort(key=lambda item: item.get_closest_marker("real") is None)  # stable: each group keeps its order
