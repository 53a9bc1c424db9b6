"""Pareto fronts of evaluated objective values (all to minimise).

Fast non-dominated sorting from K. Deb, A. Pratap, S. Agarwal and T. Meyarivan, "A Fast and Elitist
Multiobjective Genetic Algorithm: NSGA-II", IEEE TEVC 6(2), 2002, section III-A. Memory is O(n * n_obj) per row
of the dominance scan plus the domination lists, so a few thousand evaluations sort in well under a second.
Rows with a NaN are treated as +inf in every objective (failed candidates are dominated by every success).
"""

from __future__ import annotations

import numpy as np


def _prep(F: np.ndarray) -> np.ndarray:  # noqa: N803
    F = np.asarray(F, dtype=np.float64)
    if F.ndim == 1:
        F = F[:, None]  # (n,) -> (n, 1)
    if F.ndim != 2:
        raise ValueError(f"F must have shape (n, n_obj), got {F.shape}")
    bad = np.isnan(F).any(axis=1)  # (n,)
    if bad.any():
        F = F.copy()
        F[bad] = np.inf
    return F


def _dominated_by(F: np.ndarray, i: int) -> np.ndarray:  # noqa: N803
    """Bool (n,): rows that row i dominates (<= everywhere and < somewhere)."""
    return (F[i] <= F).all(axis=1) & (F[i] < F).any(axis=1)


def pareto_mask(F: np.ndarray) -> np.ndarray:  # noqa: N803
    """Mark the non-dominated rows of F.

    Args:
        F: (n, n_obj) objective values to minimise ((n,) is one objective). NaN rows count as +inf.

    Returns:
        (n,) bool, True for rows no other row dominates (duplicates of a non-dominated row are all kept).
    """
    F = _prep(F)
    n = F.shape[0]
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        if keep[i]:
            keep &= ~_dominated_by(F, i)
    return keep


def non_dominated_sort(F: np.ndarray) -> list[np.ndarray]:  # noqa: N803
    """Split the rows of F into Pareto fronts (Deb et al. 2002, fast non-dominated sort).

    Args:
        F: (n, n_obj) objective values to minimise ((n,) is one objective). NaN rows count as +inf.

    Returns:
        Fronts in order: a list of int arrays of row indices (ascending); front 0 is the Pareto set. Every row
        appears in exactly one front.
    """
    F = _prep(F)
    n = F.shape[0]
    dominates: list[np.ndarray] = []  # S_p: rows p dominates
    count = np.zeros(n, dtype=np.int64)  # n_p: how many rows dominate p
    for i in range(n):
        d = _dominated_by(F, i)  # (n,)
        dominates.append(np.flatnonzero(d))
        count += d
    fronts: list[np.ndarray] = []
    current = np.flatnonzero(count == 0)
    while current.size:
        fronts.append(current)
        for p in current:
            count[dominates[p]] -= 1
        nxt = np.concatenate([dominates[p] for p in current]) if current.size else np.empty(0, np.int64)
        current = np.unique(nxt[count[nxt] == 0])
    return fronts
