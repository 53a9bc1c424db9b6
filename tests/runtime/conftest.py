"""Tiny random checkpoints shared by the runtime tests (written once per session)."""

from __future__ import annotations

import pytest

from dfsmerge.zoo.tiny import FAMILIES, make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_family_ckpts(tmp_path_factory):
    """family -> (model A, a fine-tune-like model B of it), 3 layers each."""
    root = tmp_path_factory.mktemp("runtime_ckpts")
    out = {}
    for fam in FAMILIES:
        a = make_tiny_checkpoint(fam, root / f"{fam}_a", seed=1, num_layers=3, hidden=32)
        b = make_tiny_checkpoint(fam, root / f"{fam}_b", seed=2, like=a, delta_std=0.3)
        out[fam] = (a, b)
    return out


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory):
    """Two unrelated tiny llama models of 4 layers (A tied head, B untied) and a fine-tune of A."""
    root = tmp_path_factory.mktemp("llama_pair")
    a = make_tiny_checkpoint("llama", root / "a", seed=3, num_layers=4, hidden=32, tie=True)
    b = make_tiny_checkpoint("llama", root / "b", seed=4, num_layers=4, hidden=32)
    c = make_tiny_checkpoint("llama", root / "c", seed=5, like=a, delta_std=0.2)
    return {"A": a, "B": b, "C": c}
