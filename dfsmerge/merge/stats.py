"""Whole-tensor statistics computed so that a row-chunked pass gives them bit for bit.

A statistic over a whole tensor (a norm, an inner product, a count) summed in one reduction depends on how torch
splits that reduction, so a sum over row chunks would differ from it in the last bits. These helpers fix the
order instead: each row is reduced on its own (float64 accumulation), the per-row values are laid end to end and
summed once. The whole-tensor merge and the chunked one (:mod:`dfsmerge.merge.chunked`) both call them, so both
see the same statistic, and the merge that uses it is bit-identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["gram", "row_gram", "rows_of"]


def rows_of(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a (R, C) matrix of its dim-0 rows (a 0-d or 1-d tensor is one row)."""
    return t.reshape(t.shape[0] if t.dim() > 1 else 1, -1)


def row_gram(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(R, K, K) float64 inner products of the K tensors' rows: ``out[r, i, j] = <vectors[i][r], vectors[j][r]>``.

    Each row is reduced separately (a chunk of rows gives the same values as the whole tensor, given at least as
    many rows as torch has threads: see :class:`~dfsmerge.merge.chunked.Rowwise`).
    """
    flat = [rows_of(v) for v in vectors]  # K x (R, C)
    k = len(flat)
    out = torch.empty((flat[0].shape[0], k, k), dtype=torch.float64, device=flat[0].device)
    for i in range(k):
        for j in range(i, k):
            s = (flat[i] * flat[j]).sum(dim=1, dtype=torch.float64)  # (R,)
            out[:, i, j] = s
            out[:, j, i] = s
    return out


def gram(vectors: Sequence[torch.Tensor] | None = None, *, rows: torch.Tensor | None = None) -> torch.Tensor:
    """(K, K) float64 Gram matrix of the K tensors as flat vectors: :func:`row_gram` summed over rows in one
    reduction (pass ``rows``, the per-row values of every chunk concatenated, to get the same from chunks)."""
    if rows is None:
        rows = row_gram(vectors)
    return rows.sum(dim=0)
