"""SCE: select, calculate, erase (Wan et al. 2024, FuseChat, arXiv 2408.07990, sec. 3.3), as mergekit 0.1.5's ``sce``.

    tau_i  = theta_i - theta_base                                  task vectors (K, *S)
    select: keep the ``select_topk`` fraction of entries with the largest variance across the K task vectors
    calc:   w_i = mean(tau_i^2) / sum_j mean(tau_j^2)              (uniform when the sum is < 1e-6)
    erase:  drop entries whose sign disagrees with sign(sum_i tau_i) (TIES "elect")
    theta  = theta_base + sum_i w_i m_i tau_i / max(sum_i w_i m_i, 1e-6)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dfsmerge.merge.gta import sign_consensus
from dfsmerge.merge.stats import rows_of

__all__ = ["sce", "sce_energy_rows", "sce_select_count", "sce_select_mask", "sce_variance", "sce_weights"]


def sce_select_mask(task_vectors: torch.Tensor, select_topk: float) -> torch.Tensor:
    """(*S) 0/1 mask of the ``int(nonzero * select_topk)`` entries with the largest variance across models.

    ``nonzero`` counts entries whose variance (biased, over dim 0) is nonzero; ``select_topk <= 0`` keeps none,
    ``>= 1`` keeps all. Selected with ``torch.topk`` as mergekit does, so entries tied at the threshold are
    chosen as its implementation chooses them.

    Args:
        task_vectors: (K, *S) stacked task vectors.
        select_topk: fraction kept.
    """
    if select_topk <= 0:
        return torch.zeros_like(task_vectors[0])
    if select_topk >= 1:
        return torch.ones_like(task_vectors[0])
    var = sce_variance(task_vectors)  # (*S)
    k = sce_select_count(int(torch.count_nonzero(var)), select_topk)
    if k == 0:
        return torch.zeros_like(var)
    mask = torch.zeros_like(var)
    mask.view(-1)[torch.topk(var.abs().reshape(-1), k=k, largest=True).indices] = 1
    return mask


def sce_variance(task_vectors: torch.Tensor) -> torch.Tensor:
    """(*S) biased variance of the K task vectors, entry by entry."""
    return torch.var(task_vectors, dim=0, unbiased=False)


def sce_select_count(nonzero: int, select_topk: float) -> int:
    """Entries the selection keeps: ``int(nonzero * select_topk)`` as a float32 product, as mergekit's (its
    rounding decides k)."""
    return int(torch.tensor(nonzero, dtype=torch.int64) * select_topk)


def sce_energy_rows(task_vectors: torch.Tensor) -> torch.Tensor:
    """(R, K) float64 sums of squares of each task vector's rows (dim 1 of the (K, *S) stack); summed over R (and
    divided by the entry count) they give the mean squares of :func:`sce_weights`, the same from row chunks."""
    return torch.stack([(rows_of(t) * rows_of(t)).sum(dim=1, dtype=torch.float64) for t in task_vectors], dim=1)


def sce_weights(task_vectors: torch.Tensor, energy: torch.Tensor | None = None, numel: int | None = None
                ) -> torch.Tensor:
    """(K,) weights proportional to each task vector's mean square (uniform when they sum to < 1e-6).

    Args:
        task_vectors: (K, *S) stacked task vectors.
        energy: (K,) float64 sums of squares of the whole task vectors, and ``numel`` their entry count, when
            ``task_vectors`` are row chunks (default: from ``task_vectors``, :func:`sce_energy_rows`).
    """
    k = task_vectors.shape[0]
    if energy is None:
        energy, numel = sce_energy_rows(task_vectors).sum(dim=0), task_vectors[0].numel()
    mean_sq = energy / max(1, numel)  # (K,)
    total = float(mean_sq.sum())
    if abs(total) < 1e-6:
        return torch.full((k,), 1.0 / k, dtype=task_vectors.dtype, device=task_vectors.device)
    return (mean_sq / total).to(task_vectors.dtype).to(task_vectors.device)


def sce(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *, select_topk: float = 1.0, int8_mask: bool = False,
    mask: torch.Tensor | None = None, energy: torch.Tensor | None = None, numel: int | None = None,
) -> torch.Tensor:
    """Merge fine-tunes of ``base`` with SCE (see the module docstring).

    Args:
        base: (*S) base tensor.
        tensors: K fine-tuned tensors (*S); with K = 0 the base is returned.
        select_topk: fraction of entries kept by the variance selection, in [0, 1].
        int8_mask: compute the sign mask in int8 (memory only, same result).
        mask, energy, numel: when ``base`` and ``tensors`` are row chunks of larger tensors, the chunk's rows of
            the whole tensor's :func:`sce_select_mask` and the whole task vectors' sums of squares and entry count
            (see :func:`sce_weights`); default: computed from the inputs.

    Returns:
        (*S) merged tensor.

    Limitations: the K task vectors are stacked (K + a few full-size temporaries in memory).
    """
    if not tensors:
        return base
    task_vectors = torch.stack([t - base for t in tensors], dim=0)  # (K, *S)
    if select_topk < 1:
        if mask is None:
            mask = sce_select_mask(task_vectors, select_topk)
        task_vectors = task_vectors * mask.unsqueeze(0)
    keep = sign_consensus(task_vectors, "sum", int8_mask=int8_mask)  # (K, *S) bool
    w = sce_weights(task_vectors, energy, numel).reshape((-1,) + (1,) * (task_vectors.dim() - 1))  # (K, 1, ..., 1)
    kept_w = w * keep  # (K, *S)
    merged = (task_vectors * kept_w).sum(dim=0) / kept_w.sum(dim=0).clamp(min=1e-6)  # (*S)
    return base + merged
