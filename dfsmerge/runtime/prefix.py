"""Prefix reuse: the hidden states of a forward call after the first k steps of a path, shared by every candidate
whose path starts with the same k steps (issue 18).

Neighbouring DFS candidates mostly agree on their first steps (CMA-ES flips a few indicator genes at a time; in
staged mode model A's recipe is fixed), and a search scores every candidate on the same batches of the same
documents. A :class:`PrefixStore` remembers, for each forward call it has seen, the output of every step; a later
call with the same inputs resumes from the longest remembered prefix of its path and runs only the rest.

What determines the state after step k, and so what the key holds:

- the call's inputs (``input_ids``, ``attention_mask``, ``position_ids``) and, for a call that continues a KV
  cache, the *lineage* of that cache: the keys of the calls that filled it and any row re-indexing since;
- what runs before the first step: the embedding module (and GPT-2's learned positions), the family's embedding
  multiplier, the rotary embedding and the config the attention masks are built from;
- each step's layer module, its input scale, attention type and window;
- the *version* of every module whose weights change in place: the PS-merged model's tensors are rewritten for
  every PS candidate (:class:`~dfsmerge.runtime.ps_buffers.PSBuffers`), so :meth:`PrefixStore.bump` gives those
  modules a new version and drops the entries that read them.

Exactness: a resumed call replays, for the skipped steps, the same ``update(key, value)`` calls on its KV cache
that the original call made (so continuations and decode steps see identical caches) and runs the remaining steps
on the identical tensor, with masks and rotary embeddings computed exactly as before. Scores are therefore
bit-identical to computing from scratch (tests/runtime/test_prefix_cache.py).

Memory: entries hold references to tensors the forward produced anyway (no copies), counted by their bytes under a
budget with least-recently-used eviction.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

DEFAULT_MEMORY_MB = 1024


def _digest(*parts: Any) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        if isinstance(p, torch.Tensor):
            t = p.detach()
            h.update(str((tuple(t.shape), t.dtype)).encode())
            h.update(t.contiguous().cpu().numpy().tobytes() if t.dtype != torch.bfloat16
                     else t.contiguous().view(torch.int16).cpu().numpy().tobytes())
        elif isinstance(p, bytes):
            h.update(p)
        else:
            h.update(repr(p).encode())
        h.update(b"\x00")
    return h.digest()


@dataclass
class PrefixStats:
    """Work counted over the forward calls of a stitched model (all in token positions, padding included).

    Attributes:
        tokens: positions that entered the model (B * T per call).
        forward_tokens: full-forward equivalents actually computed: each call adds ``B * T * run / n`` for a path of
            ``n`` steps of which ``run`` were computed (the others came from the store).
        cached_tokens: full-forward equivalents served from the store (``B * T * k / n``).
        calls, hits: forward calls, and those that resumed from a stored prefix.
    """

    tokens: int = 0
    forward_tokens: float = 0.0
    cached_tokens: float = 0.0
    calls: int = 0
    hits: int = 0

    def __add__(self, other: PrefixStats) -> PrefixStats:
        return PrefixStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def since(self, before: PrefixStats) -> dict[str, float]:
        return {"tokens": self.tokens - before.tokens,
                "forward_tokens": round(self.forward_tokens - before.forward_tokens, 3),
                "cached_tokens": round(self.cached_tokens - before.cached_tokens, 3),
                "forward_calls": self.calls - before.calls, "prefix_hits": self.hits - before.hits}


@dataclass
class _Entry:
    hidden: torch.Tensor  # (B, T, D): the output of the step
    kv: tuple | None  # the (key_states, value_states, *args) the step's attention passed to cache.update
    volatile: bool  # reads a module whose weights change in place (dropped by bump)
    nbytes: int = field(default=0)


class PrefixStore:
    """Stored step outputs of forward calls, keyed by (call, path prefix), under a byte budget (LRU).

    Args:
        memory_mb: budget for the stored tensors; 0 disables storing (lookups then always miss).
    """

    def __init__(self, memory_mb: float = DEFAULT_MEMORY_MB) -> None:
        self.budget = int(memory_mb * 2**20)
        self.entries: OrderedDict[tuple[bytes, bytes], _Entry] = OrderedDict()
        self.bytes = 0
        self.version = 0  # of the volatile modules' weights (bump)
        self._volatile: set[int] = set()  # id() of modules rewritten in place (resident: an id is never reused)

    # ---- keys ---------------------------------------------------------------------------------------------
    def mark_volatile(self, modules: Iterable[nn.Module]) -> None:
        """Modules whose weights are rewritten in place (the PS-merged model): keyed by version. Submodules
        without parameters (a rotary embedding's fixed frequencies) never change and stay shareable."""
        for m in modules:
            for sub in m.modules():
                if next(sub.parameters(), None) is not None:
                    self._volatile.add(id(sub))

    def bump(self) -> None:
        """The volatile modules' weights changed: new version, and drop every entry that read them."""
        self.version += 1
        for k in [k for k, e in self.entries.items() if e.volatile]:
            self.bytes -= self.entries.pop(k).nbytes

    def module_key(self, m: nn.Module | None) -> tuple[Any, bool]:
        if m is None:
            return None, False
        volatile = id(m) in self._volatile
        return (id(m), self.version if volatile else 0), volatile

    def call_key(self, input_ids: torch.Tensor, attention_mask, position_ids, lineage: bytes | None) -> bytes:
        return _digest(b"call", input_ids, attention_mask, position_ids, lineage or b"")

    def path_keys(self, context: Sequence[Any], hops: Sequence[Any]) -> tuple[list[bytes], list[bool]]:
        """Chained keys of every prefix of ``hops`` (key i covers steps 0..i) and whether each reads a volatile
        module. ``context``: what runs before the first step (modules and values); each hop: (layer, scale, type,
        window)."""
        vol = False
        parts = []
        for c in context:
            if isinstance(c, nn.Module) or c is None:
                k, v = self.module_key(c)
                vol |= v
                parts.append(k)
            else:
                parts.append(c)
        prev = _digest(b"ctx", *parts)
        keys, flags = [], []
        for layer, scale, kind, window in hops:
            k, v = self.module_key(layer)
            vol |= v
            prev = _digest(prev, k, float(scale), kind, window)
            keys.append(prev)
            flags.append(vol)
        return keys, flags

    # ---- lookup / store ---------------------------------------------------------------------------------
    def longest(self, call: bytes, keys: Sequence[bytes], need_kv: bool) -> int:
        """The number of leading steps whose outputs (and, with ``need_kv``, KV updates) are stored for ``call``."""
        k = 0
        for key in keys:
            e = self.entries.get((call, key))
            if e is None or (need_kv and e.kv is None):
                break
            k += 1
        return k

    def get(self, call: bytes, key: bytes) -> _Entry:
        e = self.entries[(call, key)]
        self.entries.move_to_end((call, key))
        return e

    def put(self, call: bytes, key: bytes, hidden: torch.Tensor, kv: tuple | None, volatile: bool) -> None:
        if self.budget <= 0:
            return
        nbytes = hidden.numel() * hidden.element_size()
        if kv is not None:
            nbytes += sum(t.numel() * t.element_size() for t in kv if isinstance(t, torch.Tensor))
        if nbytes > self.budget:
            return
        old = self.entries.pop((call, key), None)
        if old is not None:
            self.bytes -= old.nbytes
        self.entries[(call, key)] = _Entry(hidden, kv, volatile, nbytes)
        self.bytes += nbytes
        while self.bytes > self.budget:
            _, e = self.entries.popitem(last=False)
            self.bytes -= e.nbytes


def lineage_of(cache: Any) -> bytes | None:
    """The lineage key a stitched model gave ``cache`` (None: unknown origin, so never served from the store)."""
    return getattr(cache, "_dfs_lineage", None)


def set_lineage(cache: Any, lineage: bytes | None) -> None:
    with contextlib.suppress(AttributeError):  # a cache type with __slots__: unknown lineage, never served
        cache._dfs_lineage = lineage


def reindexed(lineage: bytes | None, index: torch.Tensor) -> bytes | None:
    """The lineage after ``cache.batch_select_indices(index)``."""
    return None if lineage is None else _digest(b"select", lineage, index.to(torch.long))
