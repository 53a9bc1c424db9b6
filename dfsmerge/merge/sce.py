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

__all__ = ["sce", "sce_select_mask", "sce_weights"]


def sce_select_mask(task_vectors: torch.Tensor, select_topk: float) -> torch.Tensor:
    """(*S) 0/1 mask of the ``int(nonzero * select_topk)`` entries with the largest variance across models.

    ``nonzero`` counts entries whose variance (biased, over dim 0) is nonzero; ``select_topk <= 0`` keeps none,
    ``>= 1`` keeps all.

    Args:
        task_vectors: (K, *S) stacked task vectors.
        select_topk: fraction kept.
    """
    if select_topk <= 0:
        return torch.zeros_like(task_vectors[0])
    if select_topk >= 1:
        return torch.ones_like(task_vectors[0])
    var = torch.var(task_vectors, dim=0, unbiased=False)  # (*S)
    # a float32 product as mergekit's (its rounding decides k)
    k = int(torch.count_nonzero(var) * select_topk)
    mask = torch.zeros_like(var)
    if k == 0:
        return mask
    top = torch.topk(var.abs().reshape(-1), k=k, largest=True).indices  # (k,)
    mask.view(-1)[top] = 1
    return mask


def sce_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """(K,) weights proportional to each task vector's mean square (uniform when they sum to < 1e-6)."""
    energy = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)  # (K,)
    total = float(energy.sum())
    if abs(total) < 1e-6:
        return torch.full_like(energy, 1.0 / energy.shape[0])
    return energy / total


def sce(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *, select_topk: float = 1.0, int8_mask: bool = False
) -> torch.Tensor:
    """Merge fine-tunes of ``base`` with SCE (see the module docstring).

    Args:
        base: (*S) base tensor.
        tensors: K fine-tuned tensors (*S); with K = 0 the base is returned.
        select_topk: fraction of entries kept by the variance selection, in [0, 1].
        int8_mask: compute the sign mask in int8 (memory only, same result).

    Returns:
        (*S) merged tensor.

    Limitations: the K task vectors are stacked (K + a few full-size temporaries in memory).
    """
    if not tensors:
        return base
    task_vectors = torch.stack([t - base for t in tensors], dim=0)  # (K, *S)
    if select_topk < 1:
        task_vectors = task_vectors * sce_select_mask(task_vectors, select_topk).unsqueeze(0)
    keep = sign_consensus(task_vectors, "sum", int8_mask=int8_mask)  # (K, *S) bool
    w = sce_weights(task_vectors).reshape((-1,) + (1,) * (task_vectors.dim() - 1))  # (K, 1, ..., 1)
    kept_w = w * keep  # (K, *S)
    merged = (task_vectors * kept_w).sum(dim=0) / kept_w.sum(dim=0).clamp(min=1e-6)  # (*S)
    return base + merged
