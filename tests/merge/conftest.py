"""Shared helpers for the merge-method tests: a valid call for every registered method."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from dfsmerge.merge import get_method


@dataclass
class Call:
    """Arguments of one valid ``merge_tensor`` call."""

    method: str
    tensors: list[torch.Tensor]
    base_index: int | None
    params: list[dict[str, Any]]
    global_params: dict[str, Any] = field(default_factory=dict)

    def kwargs(self) -> dict[str, Any]:
        return {"base_index": self.base_index, "params": self.params, "global_params": self.global_params}


def random_tensors(n: int, shape: tuple[int, ...], *, seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(n)]


def _valid_call(method: str, shape: tuple[int, ...] = (8, 6), dtype=torch.float32, seed: int = 0) -> Call:
    """A minimal valid call of ``method``: base first when the method takes one, density < 1 when it has one."""
    m = get_method(method)
    if m.max_inputs == 1:
        n = 1
    elif m.max_inputs is not None:
        n = m.max_inputs
    else:
        n = max(3, m.min_inputs, m.min_non_base + (m.base != "none"))
    base_index = 0 if m.base != "none" else None
    tensors = random_tensors(n, shape, seed=seed, dtype=dtype)
    params: list[dict[str, Any]] = []
    for i in range(n):
        p: dict[str, Any] = {}
        for spec in m.per_model_params():
            if spec.non_base and i == base_index:
                continue
            if spec.name == "weight":
                p["weight"] = 0.3 + 0.2 * i
            elif spec.name == "density":
                p["density"] = 0.5
            elif spec.name == "scale":
                p["scale"] = 2.0
        params.append(p)
    global_params = {"t": 0.3} if any(s.name == "t" for s in m.params) else {}
    return Call(method, tensors, base_index, params, global_params)


@pytest.fixture
def valid_call():
    """``valid_call(method, shape=(8, 6), dtype=float32, seed=0) -> Call``."""
    return _valid_call


@pytest.fixture
def make_tensors():
    """``make_tensors(n, shape, *, seed=0, dtype=float32) -> list[Tensor]`` (standard normal)."""
    return random_tensors
