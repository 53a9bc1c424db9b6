"""A cache of evaluation results keyed by the decoded candidate, so that a genome decoding to an already scored
candidate (frequent: many genomes share a path or round to the same recipe) costs no forward pass."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")


def candidate_key(candidate: Any) -> str:
    """A stable string key of a decoded candidate.

    A :class:`dfsmerge.genome.Candidate` (anything with a ``key()`` method) gives its own key, the one the search
    stores; a pydantic model, a dataclass or a plain container is keyed by its canonical JSON
    (:func:`dfsmerge.genome.stable_key`; floats kept to full precision: two candidates are duplicates only if they
    decode equal).
    """
    from dfsmerge.genome import stable_key

    key = getattr(candidate, "key", None)
    if callable(key):
        return str(key())
    if hasattr(candidate, "model_dump"):
        obj = candidate.model_dump(mode="json")
    elif dataclasses.is_dataclass(candidate) and not isinstance(candidate, type):
        obj = dataclasses.asdict(candidate)
    else:
        obj = candidate
    return stable_key(obj)


class ResultCache:
    """In-memory map from candidate key to its result, with hit/miss counts.

    Args:
        max_entries: evict the oldest entries beyond this count (None: unbounded).
    """

    def __init__(self, max_entries: int | None = None) -> None:
        self._data: dict[Hashable, Any] = {}
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: Hashable, default=None):
        return self._data.get(key, default)

    def put(self, key: Hashable, value: Any) -> None:
        self._data[key] = value
        if self.max_entries is not None:
            while len(self._data) > self.max_entries:
                self._data.pop(next(iter(self._data)))

    def get_or_compute(self, key: Hashable, compute: Callable[[], T]) -> T:
        """The cached value for ``key``, computing and storing it on a miss."""
        if key in self._data:
            self.hits += 1
            return self._data[key]
        self.misses += 1
        value = compute()
        self.put(key, value)
        return value
