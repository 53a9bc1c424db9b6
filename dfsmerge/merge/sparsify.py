"""Sparsification of task vectors (deltas from a base model), the first step of the GTA family.

Each sparsifier returns ``delta * mask`` and, when ``rescale`` is set, multiplies the kept entries so the
L1 norm of the result equals the L1 norm of the input (mergekit 0.1.5's ``RescaleNorm.l1``; DARE's paper
rescales by ``1/density`` instead, which matches the L1 norm only in expectation).

- ``magnitude``: keep the ``density`` fraction of largest-magnitude entries (TIES, Yadav et al. 2023,
  arXiv 2306.01708, step 1 "trim").
- ``random``: keep each entry with probability ``density`` (DARE, Yu et al. 2023, arXiv 2311.03099, Eq. (1)).
- ``magnitude_outliers``: drop the ``gamma`` fraction of largest entries, then the smallest, keeping
  ``density`` (Model Breadcrumbs, Davari & Belilovsky 2023, arXiv 2312.06795).
- ``della_magprune``: keep each entry with a probability that grows linearly with its magnitude rank within
  its row, from ``density - epsilon`` to ``density + epsilon`` (DELLA, Deep et al. 2024, arXiv 2406.11617,
  Eq. (2)).

The mask functions are the references of the fused Triton kernels: keep their tie-breaking (that of
PyTorch's default sort on float32 magnitudes, as mergekit; ``magnitude`` and ``magnitude_outliers`` select
with ``kthvalue`` in O(n) and sort only when the threshold value is tied) and their RNG draw order (one
``torch.bernoulli`` over the whole tensor per call).
"""

from __future__ import annotations

import math
from enum import Enum

import torch

from dfsmerge.errors import MergeError

__all__ = [
    "Sparsification",
    "apply_mask",
    "breadcrumbs_mask",
    "della_mask",
    "della_probabilities",
    "magnitude_mask",
    "random_mask",
    "sparsify",
]

# Norms below this count as zero: no rescale (mergekit's RescaleNorm eps).
_RESCALE_EPS = 1e-7


class Sparsification(str, Enum):  # noqa: UP042 (StrEnum needs Python 3.11)
    """How a task vector is pruned before merging (names as mergekit's ``SparsificationMethod``)."""

    magnitude = "magnitude"
    random = "random"
    magnitude_outliers = "magnitude_outliers"
    della_magprune = "della_magprune"


def apply_mask(delta: torch.Tensor, mask: torch.Tensor, *, rescale: bool) -> torch.Tensor:
    """Zero the entries of ``delta`` where ``mask`` is 0, optionally restoring the L1 norm.

    Args:
        delta: task vector, any shape.
        mask: 0/1 tensor broadcastable to ``delta`` (same dtype or bool).
        rescale: multiply the result by ``|delta|_1 / |delta * mask|_1`` (skipped when either norm is
            below 1e-7, so an all-dropped tensor stays zero).

    Returns:
        The masked (and rescaled) tensor, dtype of ``delta``.
    """
    masked = delta * mask
    if not rescale:
        return masked
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return masked
    return masked * (before / after)


def _sort_key(delta: torch.Tensor) -> torch.Tensor:
    # Sort float32 magnitudes on CPU (as mergekit) so ties break the same way.
    w = delta.abs().reshape(-1)
    return w.float() if w.device.type == "cpu" else w


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Mask keeping the ``max(1, int(density * numel))`` largest-magnitude entries (TIES "trim").

    Found by selection in O(n) (one ``kthvalue``), not a sort. Among entries tied in magnitude at the
    threshold, the ones with the lowest flat index are kept: a fixed rule, the same on every device. (mergekit
    keeps whichever copies its unstable ``argsort`` puts first, which depends on the sort implementation; with
    distinct magnitudes, as in float32 checkpoints, both keep the same entries.)

    Args:
        delta: task vector, any shape.
        density: fraction kept; ``>= 1`` keeps all, ``<= 0`` keeps none.

    Returns:
        Mask of ``delta``'s shape and dtype.
    """
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta)
    if density <= 0 or n == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * n))
    w = _sort_key(delta)  # (n,)
    return top_k_mask(w, k).to(delta.dtype).reshape(delta.shape)


def kth_largest(w: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest entry of the 1-D ``w`` (exact), as a 0-d tensor.

    Large inputs are bracketed first: quantiles of a strided sample give bounds ``lo <= x_k <= hi`` with a wide
    margin, the bounds are verified by counting, and the exact selection runs only over the entries inside the
    band (about 1% of them). Should the check fail (an unlucky sample), it falls back to a full ``kthvalue``.
    """
    n = w.numel()
    if n >= 1 << 17:
        sample = w[:: n // 65536]  # (m,) strided view, deterministic
        m = sample.numel()
        p = k / n
        margin = 6.0 * math.sqrt(m * p * (1 - p)) + 16  # ranks; the sample rank's std is sqrt(m p (1-p))
        top = min(m, max(1, int(p * m - margin)))  # rank from the top of the upper bound
        bottom = min(m, max(1, int(math.ceil(p * m + margin))))  # ... and of the lower bound
        hi = torch.kthvalue(sample, m - top + 1).values
        lo = torch.kthvalue(sample, m - bottom + 1).values
        above = int(torch.count_nonzero(w > hi))
        band = w[(w >= lo) & (w <= hi)]  # (b,)
        if above < k <= above + band.numel():
            return torch.kthvalue(band, band.numel() - (k - above) + 1).values
    return torch.kthvalue(w, n - k + 1).values


def top_k_mask(w: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of the 1-D ``w``; ties at the threshold go to the lowest index."""
    threshold = kth_largest(w, k)
    keep = w > threshold
    need = k - int(torch.count_nonzero(keep))
    if need > 0:
        tied = torch.nonzero(w == threshold).reshape(-1)  # ascending flat indices of the tied entries
        keep[tied[:need]] = True
    return keep


def _keep_rank_range(w: torch.Tensor, lo: int, hi: int) -> torch.Tensor | None:
    """Entries whose ascending rank lies in [lo, hi), found by selection (O(n)) rather than a sort.

    ``low <= w <= high`` (the values at ranks lo and hi - 1) holds for every wanted entry; it selects exactly
    them unless a boundary value is tied with an entry outside the range (or is NaN). Then None: only a sort
    fixes which copies are kept.
    """
    n = w.numel()
    if lo >= hi:
        return torch.zeros(n, dtype=torch.bool, device=w.device)
    keep = w >= torch.kthvalue(w, lo + 1).values  # value at rank lo
    if hi < n:
        keep &= w <= torch.kthvalue(w, hi).values  # value at rank hi - 1
    return keep if int(torch.count_nonzero(keep)) == hi - lo else None


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Mask dropping the ``int(gamma * n)`` largest entries and enough small ones to keep ``int(density * n)``.

    When ``density + gamma > 1`` fewer outliers are dropped so that exactly ``int(density * n)`` are kept.

    Args:
        delta: task vector, any shape.
        density: fraction kept (``>= 1`` keeps all).
        gamma: fraction of largest-magnitude entries removed as outliers.

    Returns:
        Mask of ``delta``'s shape and dtype.
    """
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta)
    n_keep = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - n_keep - n_top)
    w = _sort_key(delta)  # (n,)
    keep = _keep_rank_range(w, n_bottom, n_bottom + n_keep) if n else torch.zeros(0, dtype=torch.bool)
    if keep is None:  # ties at a boundary: break them as a full ascending sort does
        keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
        keep[torch.sort(w, descending=False).indices[n_bottom : n_bottom + n_keep]] = True
    return keep.to(delta.dtype).reshape(delta.shape)


def random_mask(delta: torch.Tensor, density: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bernoulli(``density``) keep-mask, one draw per entry (DARE, Eq. (1)).

    Args:
        delta: task vector (only its shape, dtype and device are used).
        density: keep probability; ``>= 1`` keeps all without drawing.
        generator: RNG (default: torch's global RNG).

    Returns:
        Mask of ``delta``'s shape and dtype.
    """
    if density >= 1:
        return torch.ones_like(delta)
    if generator is not None:
        # Seeded (dfsmerge's reproducible stream): one uniform draw per entry, kept iff u < density. Same
        # distribution as Bernoulli(density), twice as fast as torch.bernoulli on CPU.
        u = torch.rand(delta.shape, generator=generator, device=delta.device)
        return (u < max(float(density), 0.0)).to(delta.dtype)
    # Unseeded: torch's global RNG drawn exactly as mergekit 0.1.5 draws it.
    probs = torch.full_like(delta, max(float(density), 0.0), dtype=_draw_dtype(delta))
    return torch.bernoulli(probs, generator=generator).to(delta.dtype)


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probabilities of MagPrune: rank-linear in magnitude along dim 1 (DELLA, Eq. (2)).

    ``p = density - epsilon + 2 * epsilon * r / (n - 1)`` where ``r`` is the 0-based ascending magnitude rank
    of the entry among the ``n`` entries of its row (dim 1; a 1-D tensor is one row). A row of a single entry
    gets ``p = density`` (mergekit 0.1.5 divides 0 by 0 there and fails).

    Args:
        delta: task vector, at least 1-D.
        density: mean keep probability.
        epsilon: half-width of the probability range; needs ``0 < density - epsilon`` and
            ``density + epsilon < 1``.

    Returns:
        Probabilities, shaped like ``delta`` viewed as 2-D for 1-D input (float32 on CPU).

    Raises:
        MergeError: epsilon out of range for this density.
    """
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise MergeError(
            f"della: epsilon={epsilon} with density={density} gives keep probabilities outside (0, 1); "
            f"choose epsilon < min(density, 1 - density) = {min(density, 1 - density):.6g}"
        )
    mags = delta.abs() if delta.dim() >= 2 else delta.abs().unsqueeze(0)  # (R, n, ...)
    work = _draw_dtype(delta)
    n = mags.shape[1]
    order = torch.sort(mags, dim=1, descending=False).indices  # ascending along each row
    ranks = torch.empty_like(order)
    positions = torch.arange(n, device=delta.device).reshape((1, n) + (1,) * (mags.dim() - 2))
    ranks.scatter_(1, order, positions.expand_as(order))  # inverse permutation: 0-based rank
    # A single-entry row has no rank spread: give it the mean probability.
    rank_norm = ranks.to(work) / (n - 1) if n > 1 else torch.full_like(ranks, 0, dtype=work) + 0.5
    return (density - epsilon) + rank_norm * (2 * epsilon)


def della_mask(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MagPrune keep-mask: Bernoulli of :func:`della_probabilities` (one draw per entry).

    Args:
        delta: task vector, at least 1-D.
        density: mean keep probability (``>= 1`` keeps all, ``<= 0`` none; no draw in either case).
        epsilon: see :func:`della_probabilities`.
        generator: RNG (default: torch's global RNG).

    Returns:
        Mask of ``delta``'s shape and dtype.

    Raises:
        MergeError: epsilon out of range for this density.
    """
    if density >= 1:
        return torch.ones_like(delta)
    if density <= 0:
        return torch.zeros_like(delta)
    probs = della_probabilities(delta, density, epsilon)
    return torch.bernoulli(probs, generator=generator).reshape(delta.shape).to(delta.dtype)


def _draw_dtype(delta: torch.Tensor) -> torch.dtype:
    # torch.bernoulli lacks float16 on CPU; mergekit draws in float32 there (bfloat16 stays).
    if delta.device.type != "cpu" or delta.dtype == torch.bfloat16:
        return delta.dtype
    return torch.float32


def sparsify(
    delta: torch.Tensor,
    method: Sparsification | str,
    density: float,
    *,
    rescale: bool = False,
    gamma: float = 0.0,
    epsilon: float = 0.0,
    generator: torch.Generator | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Prune a task vector with one of the four methods, optionally restoring its L1 norm.

    ``density >= 1`` returns ``delta`` unchanged (no rescale, no RNG draw) for every method, as mergekit.
    ``magnitude`` and ``della_magprune`` with ``density <= 0`` return zeros.

    Args:
        delta: task vector, any shape.
        method: a :class:`Sparsification` or its name.
        density: fraction (or probability) kept.
        rescale: L1-norm matching after masking (see :func:`apply_mask`).
        gamma: outlier fraction for ``magnitude_outliers``.
        epsilon: probability half-width for ``della_magprune``.
        generator: RNG of the random methods.
        inplace: magnitude pruning without rescale may overwrite ``delta`` (saves one full-size copy).

    Returns:
        The pruned tensor, same shape and dtype as ``delta``.

    Raises:
        MergeError: unknown method, or epsilon out of range for ``della_magprune``.
    """
    try:
        method = Sparsification(method)
    except ValueError:
        known = ", ".join(m.value for m in Sparsification)
        raise MergeError(f"sparsification method {method!r} is unknown; use one of: {known}") from None
    if density >= 1:
        return delta
    if method is Sparsification.magnitude:
        if density <= 0 or delta.numel() == 0:
            return torch.zeros_like(delta)
        if not rescale:  # one pass with a boolean mask (same values as delta * magnitude_mask(...))
            keep = top_k_mask(_sort_key(delta), max(1, int(density * delta.numel())))
            drop = ~keep.reshape(delta.shape)
            return delta.masked_fill_(drop, 0) if inplace else delta.masked_fill(drop, 0)
        mask = magnitude_mask(delta, density)
    elif method is Sparsification.random:
        mask = random_mask(delta, density, generator=generator)
    elif method is Sparsification.magnitude_outliers:
        mask = breadcrumbs_mask(delta, density, gamma)
    else:
        if density <= 0:
            return torch.zeros_like(delta)
        mask = della_mask(delta, density, epsilon, generator=generator)
    return apply_mask(delta, mask, rescale=rescale)
