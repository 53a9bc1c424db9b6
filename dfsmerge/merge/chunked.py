"""Merging one tensor in row chunks, bit-identical to the whole-tensor merge (bounded memory).

A method declares in the registry (``MergeMethod.chunking``) how it can be chunked, as a factory
``chunking(method, base_index, per_model, params, numel) -> ChunkedMerge | None`` called with the resolved
parameters and the tensor's number of entries
(None: these parameters need the whole tensor, e.g. DARE's random draws or an L1 rescale). A method without a
factory always merges whole tensors.

The executor (``dfsmerge.recipe``) drives a :class:`ChunkedMerge` over the row chunks of a tensor in order:
``passes`` streaming passes of :meth:`~ChunkedMerge.gather` (each followed by :meth:`~ChunkedMerge.end_pass`)
collect the whole-tensor statistics, then :meth:`~ChunkedMerge.apply` merges each chunk. Every chunk holds
whole rows (dim 0) of the inputs, already aligned to the work dtype.

- :class:`Elementwise`: the method's function applied to each chunk (linear, task arithmetic, nearswap, ...).
- :class:`Rowwise`: the same for methods whose statistics are per row (model_stock ``filter_wise``); chunks
  keep at least as many rows as torch has threads, so each row is reduced the same way as in the whole tensor.
- :class:`MagnitudeChunks`: TIES magnitude pruning. Two streaming passes find each task vector's exact
  k-th largest magnitude by radix selection over the float32 bit patterns (a 2^15-bin histogram of the high
  bits, then a 2^16-bin one of the low bits inside the chosen bin); the apply pass keeps the entries above
  it and, among entries equal to it, the first ones in flat order, the tie rule of
  :func:`~dfsmerge.merge.sparsify.top_k_mask`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from dfsmerge.merge.registry import MergeMethod

__all__ = ["ChunkedMerge", "Elementwise", "MagnitudeChunks", "Rowwise", "elementwise", "rowwise"]


class ChunkedMerge:
    """Merge of one tensor chunk by chunk (see the module docstring). The base class needs no statistics.

    Attributes:
        passes: streaming passes over the chunks before :meth:`apply`.
        min_rows: fewest rows per chunk.
    """

    passes = 0
    min_rows = 1

    def __init__(self, method: MergeMethod, base_index: int | None, per_model: Mapping[str, tuple[Any, ...]],
                 params: Mapping[str, Any]):
        self.method = method
        self.base_index = base_index
        self.per_model = per_model
        self.params = params

    def gather(self, pass_index: int, chunk: Sequence[torch.Tensor]) -> None:
        """Collect statistics from one chunk (inputs in model order, rows of dim 0)."""

    def end_pass(self, pass_index: int) -> None:
        """Finish a streaming pass."""

    def apply(self, chunk: Sequence[torch.Tensor]) -> torch.Tensor:
        """The merged rows of one chunk (chunks arrive in order)."""
        return self.method.fn(list(chunk), base_index=self.base_index, per_model=self.per_model,
                              params=self.params, generator=None)


class Elementwise(ChunkedMerge):
    """Every output entry depends only on the same entry of the inputs."""


class Rowwise(ChunkedMerge):
    """Every output row depends only on the same row of the inputs."""

    @property
    def min_rows(self) -> int:  # type: ignore[override]
        # a reduction over fewer rows than threads splits each row across threads (another summation order)
        return max(1, torch.get_num_threads())


def elementwise(method: MergeMethod, base_index: int | None, per_model, params, numel: int) -> ChunkedMerge:
    """Chunking factory of elementwise methods."""
    return Elementwise(method, base_index, per_model, params)


def rowwise(method: MergeMethod, base_index: int | None, per_model, params, numel: int) -> ChunkedMerge:
    """Chunking factory of per-row methods."""
    return Rowwise(method, base_index, per_model, params)


_HIGH_BINS = 1 << 15  # non-negative float32: the sign bit is clear, so bits >> 16 < 2^15
_LOW_BINS = 1 << 16


class _RadixSelect:
    """Exact value of the ``k``-th largest of a stream of non-negative float32 values, in two passes."""

    def __init__(self, n: int, k: int):
        self.rank = n - k  # 0-based ascending rank of the wanted value
        self.high = torch.zeros(_HIGH_BINS, dtype=torch.int64)
        self.low = torch.zeros(_LOW_BINS, dtype=torch.int64)
        self.bin = -1
        self.below_bin = 0  # entries in bins below self.bin
        self.value = float("nan")
        self.greater = 0  # entries strictly above the value

    def gather(self, pass_index: int, w: torch.Tensor) -> None:
        bits = w.reshape(-1).view(torch.int32)
        if pass_index == 0:
            self.high += torch.bincount(bits >> 16, minlength=_HIGH_BINS).cpu()
        else:
            inside = bits[(bits >> 16) == self.bin] & 0xFFFF
            self.low += torch.bincount(inside, minlength=_LOW_BINS).cpu()

    def end_pass(self, pass_index: int, n: int) -> None:
        if pass_index == 0:
            cum = torch.cumsum(self.high, 0)
            self.bin = int(torch.searchsorted(cum, self.rank, right=True))
            self.below_bin = int(cum[self.bin - 1]) if self.bin else 0
        else:
            cum = torch.cumsum(self.low, 0) + self.below_bin
            low = int(torch.searchsorted(cum, self.rank, right=True))
            self.value = torch.tensor([(self.bin << 16) | low], dtype=torch.int32).view(torch.float32).item()
            self.greater = n - int(cum[low])


class MagnitudeChunks(ChunkedMerge):
    """TIES-style magnitude pruning of each task vector, then the method's merge without sparsification.

    Needs ``rescale: false`` (the L1 rescale sums the whole tensor in one order) and a magnitude-sparsifying
    GTA method; ``n_entries`` is the tensor's number of entries.
    """

    passes = 2

    def __init__(self, method: MergeMethod, base_index: int | None, per_model, params, *, n_entries: int,
                 merge_fn):
        super().__init__(method, base_index, per_model, params)
        self.n = n_entries
        self.merge_fn = merge_fn  # the GTA merge of (chunk) tensors without sparsification
        self.others = [i for i in range(len(per_model["density"])) if i != base_index]
        self.select: dict[int, _RadixSelect] = {}
        for i in self.others:
            density = per_model["density"][i]
            if 0 < density < 1 and n_entries:
                self.select[i] = _RadixSelect(n_entries, max(1, int(density * n_entries)))
        self.tied_left: dict[int, int] = {}

    def _magnitudes(self, chunk: Sequence[torch.Tensor], i: int) -> torch.Tensor:
        return (chunk[i] - chunk[self.base_index]).abs().reshape(-1)  # as sparsify's _sort_key: |delta| in fp32

    def gather(self, pass_index: int, chunk: Sequence[torch.Tensor]) -> None:
        for i, sel in self.select.items():
            sel.gather(pass_index, self._magnitudes(chunk, i).float())

    def end_pass(self, pass_index: int) -> None:
        for i, sel in self.select.items():
            sel.end_pass(pass_index, self.n)
            if pass_index == 1:
                k = max(1, int(self.per_model["density"][i] * self.n))
                self.tied_left[i] = k - sel.greater

    def apply(self, chunk: Sequence[torch.Tensor]) -> torch.Tensor:
        base = chunk[self.base_index]
        pruned = list(chunk)
        for i in self.others:
            density = self.per_model["density"][i]
            if density >= 1:
                continue
            if density <= 0 or i not in self.select:
                pruned[i] = base
                continue
            w = self._magnitudes(chunk, i).float()
            threshold = self.select[i].value
            keep = w > threshold
            if self.tied_left[i] > 0:
                tied = torch.nonzero(w == threshold).reshape(-1)[: self.tied_left[i]]  # lowest flat index first
                keep[tied] = True
                self.tied_left[i] -= tied.numel()
            # a dropped entry takes the base value, so its task vector entry is exactly 0
            pruned[i] = torch.where(keep.reshape(base.shape), chunk[i], base)
        return self.merge_fn(pruned)
