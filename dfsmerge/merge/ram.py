"""RAM, Reinforced Agent Merging, and RAM+ tensor-local (arXiv 2601.13572), as mergekit 0.1.5's ``ram`` and
``ramplus_tl``.

An entry of task vector ``tau_i = theta_i - theta_base`` contributes when ``|tau_i| > epsilon``. Entries where
one model contributes keep that model's value; entries where several do take their mean:

    c      = sum_i [|tau_i| > eps]                                       contributors per entry
    theta  = theta_base + sum_i tau_i [|tau_i| > eps] ([c == 1] lambda_i + [c > 1] / c)

``ram``: lambda_i = 1. ``ramplus_tl`` rescales each model's unique entries by its overlap ratio within the
tensor: rho_i = shared_i / max(unique_i, eps), lambda_i = 1 + r * clamp(rho_i, 0, alpha).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["ram", "ram_overlap_counts"]


def ram_overlap_counts(base: torch.Tensor, tensors: Sequence[torch.Tensor], epsilon: float) -> torch.Tensor:
    """(2, K) int64: per model, its contributing entries that another model also contributes to (row 0) and that
    only it contributes to (row 1). Exact integer counts, so sums over row chunks equal the whole tensor's."""
    tau = torch.stack([t - base for t in tensors], dim=0).reshape(len(tensors), -1)  # (K, N)
    contributes = tau.abs() > epsilon  # (K, N)
    counts = contributes.sum(dim=0, keepdim=True)  # (1, N)
    return _overlap(contributes, counts > 1, counts == 1)


def _overlap(contributes: torch.Tensor, shared: torch.Tensor, unique: torch.Tensor) -> torch.Tensor:
    return torch.stack([(contributes & shared).sum(dim=1), (contributes & unique).sum(dim=1)])  # (2, K)


def ram(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    epsilon: float = 1e-5,
    plus: bool = False,
    r: float = 0.1,
    alpha: float = 0.2,
    overlap: torch.Tensor | None = None,
) -> torch.Tensor:
    """Merge fine-tunes of ``base`` with RAM (or RAM+ tensor-local with ``plus``); see the module docstring.

    Args:
        base: (*S) base tensor.
        tensors: K fine-tuned tensors (*S); with K = 0 the base is returned.
        epsilon: magnitude above which a task-vector entry contributes (>= 0).
        plus: ``ramplus_tl``: rescale unique entries by ``1 + r * clamp(rho, 0, alpha)``.
        r, alpha: RAM+ rescale strength and cap.
        overlap: with ``plus``, the whole tensors' :func:`ram_overlap_counts` when ``base`` and ``tensors`` are row
            chunks of larger tensors (default: counted from them).

    Returns:
        (*S) merged tensor.

    Limitations: the K task vectors and their masks are stacked in memory.
    """
    if not tensors:
        return base
    tau = torch.stack([t - base for t in tensors], dim=0).reshape(len(tensors), -1)  # (K, N)
    contributes = tau.abs() > epsilon  # (K, N)
    counts = contributes.sum(dim=0, keepdim=True)  # (1, N)
    shared = counts > 1
    unique = counts == 1
    tau_kept = tau * contributes
    unique_part = tau_kept * unique  # (K, N)
    if plus:
        if overlap is None:
            overlap = _overlap(contributes, shared, unique)
        rho = overlap[0].to(tau.device) / overlap[1].to(tau.device).clamp(min=epsilon)  # (K,)
        unique_part = unique_part * (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)  # (K, N) * (K, 1)
    merged = (unique_part + tau_kept * shared / counts.clamp(min=1)).sum(dim=0, keepdim=True)  # (1, N)
    return base + merged.reshape_as(base)
