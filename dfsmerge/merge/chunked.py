"""Merging one tensor in row chunks, bit-identical to the whole-tensor merge (bounded memory).

A method declares in the registry (``MergeMethod.chunking``) how it can be chunked, as a factory
``chunking(method, base_index, per_model, params, numel) -> ChunkedMerge | None`` called with the resolved
parameters and the tensor's number of entries
(None: these parameters need the whole tensor, e.g. DARE's random draws or an L1 rescale). A method without a
factory always merges whole tensors.

The executor (``dfsmerge.recipe.executor``) drives a :class:`ChunkedMerge` over the row chunks of a tensor in order:
``passes`` streaming passes of :meth:`~ChunkedMerge.gather` (each followed by :meth:`~ChunkedMerge.end_pass`;
``passes`` is read again after each, so a chunker may ask for another)
collect the whole-tensor statistics, then :meth:`~ChunkedMerge.apply` merges each chunk. Every chunk holds
whole rows (dim 0) of the inputs, already aligned to the work dtype.

- :class:`Elementwise`: the method's function applied to each chunk (linear, task arithmetic, nearswap, ...).
- :class:`Rowwise`: the same for methods whose statistics are per row (model_stock ``filter_wise``); chunks
  keep at least as many rows as torch has threads, so each row is reduced the same way as in the whole tensor.
- :class:`MagnitudeChunks`: TIES magnitude pruning. A sample pass (reading a strided sample only) and one full
  pass find each task vector's exact k-th largest magnitude (:class:`_SampledSelect`; radix selection over the
  float32 bit patterns, :class:`_RadixSelect`, should the sample's bracket miss); the apply pass keeps the
  entries above it and, among entries equal to it, the first ones in flat order, the tie rule of
  :func:`~dfsmerge.merge.sparsify.top_k_mask`.
- :class:`RankWindowChunks`: Model Breadcrumbs' rank window (two radix passes per end of the window); a window
  end tied across its boundary raises :class:`WholeTensorNeeded` (the tensor is then merged whole).
- :class:`GramChunks`: slerp, nuslerp, multislerp, karcher: the inner products of the whole (task) vectors,
  per row and summed once (:mod:`dfsmerge.merge.stats`), in one pass.
- :class:`CountChunks`: ``ramplus_tl``'s exact overlap counts, one pass.
- :class:`VarianceTopKChunks`: SCE's variance top-k and mean squares, three passes.
- :class:`QuantileChunks`: Arcee Fusion's importance quantiles (signed radix selection), two passes.

Random methods (DARE, DELLA) and the L1 rescale stay whole-tensor: their draws and norms are not chunked.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from dfsmerge.merge.registry import MergeMethod

from dfsmerge.merge.stats import gram, row_gram

__all__ = ["ChunkedMerge", "CountChunks", "Elementwise", "GramChunks", "MagnitudeChunks", "QuantileChunks",
           "RankWindowChunks", "Rowwise", "VarianceTopKChunks", "WholeTensorNeeded", "elementwise", "rowwise"]


class ChunkedMerge:
    """Merge of one tensor chunk by chunk (see the module docstring). The base class needs no statistics.

    Attributes:
        passes: streaming passes over the chunks before :meth:`apply`.
        min_rows: fewest rows per chunk.
        may_need_whole: its statistics may raise :class:`WholeTensorNeeded` (the memory estimate counts both).
    """

    passes = 0
    min_rows = 1
    may_need_whole = False

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


class GramChunks(Rowwise):
    """Methods that need the inner products of whole (task) vectors: slerp, nuslerp (flattened), multislerp,
    karcher. One streaming pass collects the per-row inner products (:func:`~dfsmerge.merge.stats.row_gram`),
    summed once as the whole-tensor merge sums them; each chunk is then merged with that Gram matrix.

    Args:
        vectors: ``chunk -> list of tensors`` whose Gram matrix the merge needs (the method computes the same
            list from the whole tensor).
        merge: ``(chunk, gram) -> merged chunk``.
    """

    passes = 1

    def __init__(self, method: MergeMethod, base_index: int | None, per_model, params, *, vectors, merge):
        super().__init__(method, base_index, per_model, params)
        self.vectors, self.merge = vectors, merge
        self._rows: list[torch.Tensor] = []
        self.gram: torch.Tensor | None = None

    def gather(self, pass_index: int, chunk: Sequence[torch.Tensor]) -> None:
        self._rows.append(row_gram(self.vectors(chunk)))

    def end_pass(self, pass_index: int) -> None:
        self.gram = gram(rows=torch.cat(self._rows))
        self._rows = []

    def apply(self, chunk: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.merge(chunk, self.gram)


class CountChunks(ChunkedMerge):
    """Methods that need exact integer counts over the whole tensor (``ramplus_tl``'s overlap counts): summed
    over the chunks in one streaming pass (integer sums do not depend on the order).

    Args:
        count: ``chunk -> int64 tensor`` of counts.
        merge: ``(chunk, counts) -> merged chunk``.
    """

    passes = 1

    def __init__(self, method: MergeMethod, base_index: int | None, per_model, params, *, count, merge):
        super().__init__(method, base_index, per_model, params)
        self.count, self.merge = count, merge
        self.counts: torch.Tensor | None = None

    def gather(self, pass_index: int, chunk: Sequence[torch.Tensor]) -> None:
        c = self.count(chunk)
        self.counts = c if self.counts is None else self.counts + c

    def apply(self, chunk: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.merge(chunk, self.counts)


_HIGH_BINS = 1 << 15  # non-negative float32: the sign bit is clear, so bits >> 16 < 2^15
_LOW_BINS = 1 << 16


class _RadixSelect:
    """Exact value of the ``k``-th largest of a stream of float32 values, in two passes (non-negative values, or
    any finite ones with ``signed``: their bit patterns are mapped to integers of the same order first)."""

    def __init__(self, n: int, k: int, *, signed: bool = False):
        self.rank = n - k  # 0-based ascending rank of the wanted value (may be set until the first end_pass)
        self.rank_total = n
        self.signed = signed
        self.offset = _HIGH_BINS if signed else 0  # signed high halves run from -2^15 to 2^15 - 1
        self.high = torch.zeros(_HIGH_BINS + self.offset, dtype=torch.int64)
        self.low = torch.zeros(_LOW_BINS, dtype=torch.int64)
        self.bin = -1
        self.below_bin = 0  # entries in bins below self.bin
        self.value = float("nan")
        self.greater = 0  # entries strictly above the value
        self.equal = 0  # entries equal to the value

    def _keys(self, w: torch.Tensor) -> torch.Tensor:
        if not self.signed:
            return w.reshape(-1).view(torch.int32)
        bits = (w.reshape(-1) + 0.0).view(torch.int32)  # -0.0 + 0.0 = +0.0: one key for both zeros
        return bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negatives: flipped, so integer order is float order

    def gather(self, pass_index: int, w: torch.Tensor) -> None:
        keys = self._keys(w)
        if pass_index == 0:
            self.high += torch.bincount((keys >> 16) + self.offset, minlength=self.high.numel()).cpu()
        else:
            inside = keys[(keys >> 16) + self.offset == self.bin] & 0xFFFF
            self.low += torch.bincount(inside, minlength=_LOW_BINS).cpu()

    def end_pass(self, pass_index: int, n: int) -> None:
        if pass_index == 0:
            cum = torch.cumsum(self.high, 0)
            self.bin = int(torch.searchsorted(cum, self.rank, right=True))
            self.below_bin = int(cum[self.bin - 1]) if self.bin else 0
        else:
            cum = torch.cumsum(self.low, 0) + self.below_bin
            low = int(torch.searchsorted(cum, self.rank, right=True))
            key = torch.tensor([((self.bin - self.offset) << 16) | low], dtype=torch.int64).to(torch.int32)
            bits = key ^ ((key >> 31) & 0x7FFFFFFF) if self.signed else key
            self.value = bits.view(torch.float32).item()
            self.greater = n - int(cum[low])
            self.equal = int(self.low[low])

    @property
    def below(self) -> int:
        """Entries strictly below the value (after the second pass)."""
        return self.rank_total - self.greater - self.equal


_BAND_LIMIT = 1 << 22  # entries a band pass may keep (16 MB of float32); a wider band selects by radix


class _SampledSelect:
    """Exact ``k``-th largest of a stream of non-negative float32 values, as
    :func:`~dfsmerge.merge.sparsify.kth_largest` finds it: a strided sample (pass 0, which reads only the sampled
    entries) brackets the value, one full pass counts the entries above the bracket and keeps those inside it
    (about 1%), and the value is selected among them. Should the bracket miss (an unlucky sample), two radix
    passes (:class:`_RadixSelect`) follow; when the sample shows the band would hold more than ``_BAND_LIMIT``
    entries (heavily tied values), the radix passes replace the band pass, so memory stays bounded. With fewer
    than 2^17 entries the sample is every entry: one pass.

    ``passes`` is the number of passes needed, known after each :meth:`end_pass`.
    """

    def __init__(self, n: int, k: int):
        self.n, self.k = n, k
        self.stride = n // 65536 if n >= 1 << 17 else 1
        self.passes = 2
        self.pos = 0  # flat index of the next chunk's first entry (pass 0)
        self.sample: torch.Tensor | None = None
        self.filled = 0  # entries written to the sample or band buffer
        self.bounds = (0.0, 0.0)
        self.above = 0
        self.band = torch.empty(0)
        self.radix: _RadixSelect | None = None
        self.radix_start = 2  # first radix pass
        self.value = float("nan")
        self.greater = 0  # entries strictly above the value

    def gather(self, pass_index: int, numel: int, values) -> None:
        """``values(start, step)``: the chunk's values at flat positions ``start::step`` (float32, 1-D).

        Samples and band entries go into buffers allocated once: small long-lived tensors allocated between the
        chunks' large temporaries would keep the allocator from returning those to the system."""
        if pass_index == 0:
            if self.sample is None:
                self.sample = torch.empty(-(-self.n // self.stride), dtype=torch.float32)
            v = values((-self.pos) % self.stride, self.stride)
            self.sample[self.filled:self.filled + v.numel()] = v
            self.filled += v.numel()
            self.pos += numel
        elif pass_index < self.radix_start:
            w = values(0, 1)
            lo, hi = self.bounds
            self.above += int(torch.count_nonzero(w > hi))
            inside = w[(w >= lo) & (w <= hi)]
            if self.filled + inside.numel() <= self.band.numel():
                self.band[self.filled:self.filled + inside.numel()] = inside
            self.filled += inside.numel()  # beyond the buffer: the radix fallback follows
        else:
            self.radix.gather(pass_index - self.radix_start, values(0, 1))

    def end_pass(self, pass_index: int) -> None:
        if pass_index == 0:
            sample = self.sample[: self.filled]  # (m,)
            self.filled = 0
            if self.stride == 1:  # the sample is every entry
                self._found(sample, 0, self.k)
                self.passes = 1
                self.sample = None
                return
            m, p = sample.numel(), self.k / self.n
            margin = 6.0 * math.sqrt(m * p * (1 - p)) + 16  # as kth_largest: ranks of the sample's quantiles
            top = min(m, max(1, int(p * m - margin)))
            bottom = min(m, max(1, int(math.ceil(p * m + margin))))
            self.bounds = (float(torch.kthvalue(sample, m - bottom + 1).values),
                           float(torch.kthvalue(sample, m - top + 1).values))
            inside = int(torch.count_nonzero((sample >= self.bounds[0]) & (sample <= self.bounds[1])))
            self.sample = None
            if inside * self.stride > _BAND_LIMIT:  # a wide band (heavy ties, as in bf16 deltas): radix instead
                self.radix, self.radix_start, self.passes = _RadixSelect(self.n, self.k), 1, 3
            else:
                self.band = torch.empty(min(self.n, _BAND_LIMIT), dtype=torch.float32)
        elif pass_index < self.radix_start:
            band, n_band = self.band, self.filled
            self.band = torch.empty(0)
            if n_band <= band.numel() and self.above < self.k <= self.above + n_band:
                self._found(band[:n_band], self.above, self.k - self.above)
            else:  # the bracket missed (or overflowed its buffer): exact radix selection, two more passes
                self.radix = _RadixSelect(self.n, self.k)
                self.passes = 4
        else:
            self.radix.end_pass(pass_index - self.radix_start, self.n)
            if pass_index == self.radix_start + 1:
                self.value, self.greater = self.radix.value, self.radix.greater

    def _found(self, values: torch.Tensor, above: int, k: int) -> None:
        v = torch.kthvalue(values, values.numel() - k + 1).values
        self.value = float(v)
        self.greater = above + int(torch.count_nonzero(values > v))


class _PruneChunks(ChunkedMerge):
    """A task-vector pruning chunker: ``merge_fn(chunk, prune)`` is the GTA merge of a chunk with pruning by
    ``prune``; ``others`` are the task vectors (every input but the base); ``n`` the tensor's number of entries."""

    def __init__(self, method: MergeMethod, base_index: int | None, per_model, params, *, n_entries: int,
                 merge_fn):
        super().__init__(method, base_index, per_model, params)
        self.n = n_entries
        self.merge_fn = merge_fn
        self.others = [i for i in range(len(per_model["density"])) if i != base_index]


class MagnitudeChunks(_PruneChunks):
    """TIES-style magnitude pruning of each task vector, then the method's merge without sparsification.

    The k-th largest magnitude of each task vector is found exactly by :class:`_SampledSelect` (a sample pass
    that reads a few entries, then one full pass); the apply pass keeps the entries above it and, among those
    equal to it, the first ones in flat order, the tie rule of :func:`~dfsmerge.merge.sparsify.top_k_mask`.
    Needs ``rescale: false`` (the L1 rescale sums the whole tensor in one order) and a magnitude-sparsifying
    GTA method; ``n_entries`` is the tensor's number of entries.
    """

    def __init__(self, method: MergeMethod, base_index: int | None, per_model, params, *, n_entries: int,
                 merge_fn):
        super().__init__(method, base_index, per_model, params, n_entries=n_entries, merge_fn=merge_fn)
        self.select: dict[int, _SampledSelect] = {}
        for i in self.others:
            density = per_model["density"][i]
            if 0 < density < 1 and n_entries:
                self.select[i] = _SampledSelect(n_entries, max(1, int(density * n_entries)))
        self.tied_left: dict[int, int] = {}

    @property
    def passes(self) -> int:  # type: ignore[override]
        return max((sel.passes for sel in self.select.values()), default=0)

    def _magnitudes(self, chunk: Sequence[torch.Tensor], i: int, start: int = 0, step: int = 1) -> torch.Tensor:
        # as sparsify's _sort_key: |delta| in fp32
        a, b = chunk[i].reshape(-1), chunk[self.base_index].reshape(-1)
        if step > 1 or start:
            a, b = a[start::step], b[start::step]
        return (a - b).abs().float()

    def gather(self, pass_index: int, chunk: Sequence[torch.Tensor]) -> None:
        for i, sel in self.select.items():
            if pass_index < sel.passes:
                sel.gather(pass_index, chunk[i].numel(), functools.partial(self._magnitudes, chunk, i))

    def end_pass(self, pass_index: int) -> None:
        for i, sel in self.select.items():
            if pass_index < sel.passes:
                sel.end_pass(pass_index)
                if pass_index + 1 == sel.passes:
                    self.tied_left[i] = sel.k - sel.greater

    def _prune(self, k: int, delta: torch.Tensor) -> torch.Tensor:
        """The chunk's rows of task vector ``k`` (among the non-base models) pruned in place, as
        :func:`~dfsmerge.merge.sparsify.sparsify` prunes the whole one."""
        i = self.others[k]
        density = self.per_model["density"][i]
        if density >= 1:
            return delta
        if density <= 0 or i not in self.select:
            return torch.zeros_like(delta)
        w = delta.abs().reshape(-1).float()  # as sparsify's _sort_key
        threshold = self.select[i].value
        keep = w > threshold
        if self.tied_left[i] > 0:
            tied = torch.nonzero(w == threshold).reshape(-1)[: self.tied_left[i]]  # lowest flat index first
            keep[tied] = True
            self.tied_left[i] -= tied.numel()
        return delta.masked_fill_(~keep.reshape(delta.shape), 0)

    def apply(self, chunk: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.merge_fn(chunk, self._prune)  # the GTA merge, pruning each task vector with _prune


class WholeTensorNeeded(Exception):  # noqa: N818 - a signal, not an error
    """Raised by a chunker once its statistics show that this tensor cannot be merged chunk by chunk bit for bit;
    the executor then merges it whole (before any chunk was handed out)."""


class RankWindowChunks(_PruneChunks):
    """Model Breadcrumbs pruning (:func:`~dfsmerge.merge.sparsify.breadcrumbs_mask`): each task vector keeps the
    entries whose ascending magnitude rank lies in ``[n_bottom, n_bottom + n_keep)``, then the method's merge
    without sparsification.

    Two streaming passes find, per task vector, the exact values at both ends of the window and how many entries
    lie below and at each (:class:`_RadixSelect`). When no end value is tied across a window boundary the window
    is the value range ``[low, high]``, applied chunk by chunk. Otherwise which of the tied copies are kept follows
    the order of PyTorch's (unstable) sort over the whole tensor, as mergekit's: :class:`WholeTensorNeeded`.
    Needs ``rescale: false``.
    """

    passes = 2
    may_need_whole = True

    def __init__(self, method: MergeMethod, base_index: int | None, per_model, params, *, n_entries: int,
                 merge_fn):
        super().__init__(method, base_index, per_model, params, n_entries=n_entries, merge_fn=merge_fn)
        self.window: dict[int, tuple[int, int]] = {}
        self.ends: dict[int, list[_RadixSelect]] = {}
        for i in self.others:
            density = per_model["density"][i]
            if density >= 1:
                continue
            n_keep = int(density * n_entries)
            n_top = int(per_model["gamma"][i] * n_entries)
            lo = max(0, n_entries - n_keep - n_top)
            self.window[i] = (lo, lo + n_keep)
            if n_keep > 0:  # the values at ascending ranks lo and hi - 1: the k-th largest with k = n - rank
                self.ends[i] = [_RadixSelect(n_entries, n_entries - r) for r in (lo, lo + n_keep - 1)]

    def _magnitudes(self, chunk: Sequence[torch.Tensor], i: int) -> torch.Tensor:
        return (chunk[i] - chunk[self.base_index]).abs().reshape(-1).float()  # as sparsify's _sort_key

    def gather(self, pass_index: int, chunk: Sequence[torch.Tensor]) -> None:
        for i, sels in self.ends.items():
            w = self._magnitudes(chunk, i)
            for sel in sels:
                sel.gather(pass_index, w)

    def end_pass(self, pass_index: int) -> None:
        for i, (first, last) in self.ends.items():
            first.end_pass(pass_index, self.n)
            last.end_pass(pass_index, self.n)
            lo, hi = self.window[i]
            if pass_index == 1 and (first.below < lo or last.below + last.equal > hi):
                raise WholeTensorNeeded(f"magnitudes tied across the rank window of model #{i}")

    def _prune(self, k: int, delta: torch.Tensor) -> torch.Tensor:
        """The chunk's rows of task vector ``k`` (among the non-base models) times its keep mask, as
        :func:`~dfsmerge.merge.sparsify.sparsify` prunes the whole one."""
        i = self.others[k]
        if i not in self.window:  # density >= 1
            return delta
        if i not in self.ends:  # nothing kept
            return delta * torch.zeros_like(delta)
        w = delta.abs().reshape(-1).float()  # as sparsify's _sort_key
        first, last = self.ends[i]
        keep = (w >= first.value) & (w <= last.value)
        return delta * keep.reshape(delta.shape).to(delta.dtype)

    def apply(self, chunk: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.merge_fn(chunk, self._prune)


class QuantileChunks(Rowwise):
    """Arcee Fusion: exact quantiles of a per-entry importance (computed from whole rows), found with two
    streaming passes of :class:`_RadixSelect` (signed: the importance may be slightly negative), then the fence
    applied chunk by chunk.

    Args:
        importance: ``chunk -> (rows, ...) float32 importance``.
        ranks: 0-based ascending ranks of the quantiles wanted.
        merge: ``(chunk, values) -> merged chunk`` with the quantile values as 0-d float32 tensors.
    """

    passes = 2

    def __init__(self, method: MergeMethod, base_index: int | None, per_model, params, *, n_entries: int,
                 importance, ranks: Sequence[int], merge):
        super().__init__(method, base_index, per_model, params)
        self.n, self.importance, self.merge = n_entries, importance, merge
        self.select = [_RadixSelect(n_entries, n_entries - r, signed=True) for r in ranks]

    def gather(self, pass_index: int, chunk: Sequence[torch.Tensor]) -> None:
        w = self.importance(chunk).float()
        for sel in self.select:
            sel.gather(pass_index, w)

    def end_pass(self, pass_index: int) -> None:
        for sel in self.select:
            sel.end_pass(pass_index, self.n)

    def apply(self, chunk: Sequence[torch.Tensor]) -> torch.Tensor:
        values = [torch.tensor(sel.value, dtype=torch.float32, device=chunk[0].device) for sel in self.select]
        return self.merge(chunk, values)


class VarianceTopKChunks(Rowwise):
    """SCE: the variance top-k selection and the task vectors' mean squares over the whole tensor, gathered in
    three streaming passes (nonzero count and radix histogram; radix refinement; sums of squares of the selected
    task vectors, per row as :func:`~dfsmerge.merge.sce.sce_energy_rows`), then the merge chunk by chunk. Should
    the threshold variance be tied with some copies kept and some not (which ones follows ``torch.topk`` over
    the whole tensor, as mergekit's): :class:`WholeTensorNeeded`.

    Args:
        task_vectors: ``chunk -> (K, rows, ...)`` stacked task vectors.
        variance, energy_rows, select_count: the method's functions (:mod:`dfsmerge.merge.sce`).
        merge: ``(chunk, mask, energy) -> merged chunk``.
    """

    passes = 3
    may_need_whole = True

    def __init__(self, method: MergeMethod, base_index: int | None, per_model, params, *, n_entries: int,
                 select_topk: float, task_vectors, variance, energy_rows, select_count, merge):
        super().__init__(method, base_index, per_model, params)
        self.n, self.topk = n_entries, select_topk
        self.task_vectors, self.variance, self.energy_rows = task_vectors, variance, energy_rows
        self.select_count, self.merge = select_count, merge
        self.nonzero = 0
        self.k = 0
        self.sel = _RadixSelect(n_entries, 1) if 0 < select_topk < 1 else None
        self._rows: list[torch.Tensor] = []
        self.energy: torch.Tensor | None = None

    def _mask(self, var: torch.Tensor) -> torch.Tensor:
        """The chunk's rows of the selection mask."""
        if self.topk >= 1:
            return torch.ones_like(var)
        if self.topk <= 0 or self.k == 0:
            return torch.zeros_like(var)
        return (var >= self.sel.value).to(var.dtype)  # no tie at the threshold is split (end_pass checks)

    def gather(self, pass_index: int, chunk: Sequence[torch.Tensor]) -> None:
        tv = self.task_vectors(chunk)
        if pass_index < 2:
            if self.sel is None:
                return
            var = self.variance(tv)
            if pass_index == 0:
                self.nonzero += int(torch.count_nonzero(var))
            self.sel.gather(pass_index, var.float())
            return
        if self.topk < 1:
            tv = tv * self._mask(self.variance(tv)).unsqueeze(0)
        self._rows.append(self.energy_rows(tv))

    def end_pass(self, pass_index: int) -> None:
        if pass_index == 0 and self.sel is not None:
            self.k = self.select_count(self.nonzero, self.topk)
            self.sel.rank = self.n - max(1, self.k)
        if pass_index < 2:
            if self.sel is not None:
                self.sel.end_pass(pass_index, self.n)
                if pass_index == 1 and self.k and self.sel.greater + self.sel.equal != self.k:
                    # variances tied at the threshold, some kept: which ones follows torch.topk over the whole
                    raise WholeTensorNeeded("variances tied at the select_topk threshold")
            return
        self.energy = torch.cat(self._rows).sum(dim=0)
        self._rows = []

    def apply(self, chunk: Sequence[torch.Tensor]) -> torch.Tensor:
        mask = self._mask(self.variance(self.task_vectors(chunk))) if self.topk < 1 else None
        return self.merge(chunk, mask, self.energy)
