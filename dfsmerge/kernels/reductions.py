"""Whole-tensor reductions the fused GTA pass needs before it can run, done as a few torch ops.

Choice by measurement (CPU, 1 thread, 4096x4096 fp32 |delta|): ``torch.kthvalue`` 0.62 s, ``torch.topk(k=n/2)``
1.34 s, stable ``torch.sort`` 3.13 s. kthvalue is a selection (CUDA: radix select, O(n)), so the magnitude
thresholds use it plus two O(n) passes to break ties by index; DELLA's per-row ranks need a real sort (one
``argsort`` per source plus a scatter). A Triton radix-select was not written: without a GPU this session there
was nothing to measure it against, and these reductions depend only on |delta| and the density, so a search
that keeps them across candidates pays them once (see kernels/NOTES.md).

Tie semantics. mergekit ranks magnitudes with an unstable ``argsort``, so which of several equal magnitudes
survives is unspecified there. Here the order is the stable ascending order of ``(|delta|, flat index)``: a
band of sorted positions ``[p0, p1]`` keeps exactly ``p1 - p0 + 1`` elements, the same set the reference
obtains with ``torch.sort(..., stable=True)``.
"""

from __future__ import annotations

import math

import torch

# A (value, flat index) pair that compares below / above every |delta| (|delta| >= 0 and finite).
KEEP_ALL_LO = (-1.0, 0)
KEEP_ALL_HI = (math.inf, 2**62)
KEEP_NONE_LO = (math.inf, 2**62)
KEEP_NONE_HI = (-1.0, 0)


def sorted_position_pair(a: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(value, flat index)`` pair at position ``pos`` of the stable ascending order of ``a``.

    Args:
        a: flat fp32 tensor of magnitudes, shape (n,).
        pos: 0 <= pos < n.

    Returns:
        ``(value, index)`` as 0-d tensors on ``a``'s device (fp32, int64).
    """
    value = torch.kthvalue(a, pos + 1).values  # () fp32
    n_less = (a < value).sum()  # () int64
    equal_idx = torch.nonzero(a == value).flatten()  # (n_equal,) ascending flat indices
    return value, equal_idx[pos - n_less]


def band_positions(method: str, n: int, density: float, gamma: float) -> tuple[int, int] | str:
    """Sorted-position band ``[p0, p1]`` (inclusive) of the magnitudes a source keeps, or 'all' / 'none'.

    ``magnitude`` (TIES): the ``max(1, int(density*n))`` largest. ``magnitude_outliers`` (breadcrumbs): drop the
    ``int(gamma*n)`` largest, then keep ``int(density*n)`` from the top of what is left. Both keep everything when
    density >= 1 (mergekit returns the delta untouched).
    """
    if density >= 1:
        return "all"
    if method == "magnitude":
        if density <= 0 or n == 0:
            return "none"
        k = max(1, int(density * n))
        return (n - k, n - 1)
    target_n = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target_n - n_top)
    if target_n <= 0:
        return "none"
    return (n_bot, n_bot + target_n - 1)


def della_ranks(a: torch.Tensor) -> tuple[torch.Tensor, int]:
    """0-based ascending ranks of ``a`` along dim 1 (dim 0 of a 1-D tensor), as DELLA's MAGPRUNE uses.

    Args:
        a: magnitudes, any shape with ndim >= 1.

    Returns:
        ``(ranks, n_cols)``: int32 ranks with ``a``'s shape and layout (contiguous), and the length of the
        ranked dimension.
    """
    a2 = a.unsqueeze(0) if a.dim() == 1 else a  # (rows, cols, ...)
    n_cols = a2.shape[1]
    order = torch.argsort(a2, dim=1, stable=True)  # (rows, cols, ...) indices
    src = torch.arange(n_cols, dtype=torch.int32, device=a.device).view(1, n_cols, *([1] * (a2.dim() - 2)))
    ranks = torch.empty(a2.shape, dtype=torch.int32, device=a.device).scatter_(1, order, src.expand(a2.shape))
    return ranks.reshape(a.shape).contiguous(), n_cols
