"""Generalized task arithmetic (GTA): the shared core of task_arithmetic, TIES, DARE, Breadcrumbs and DELLA.

    delta_i = sparsify(theta_i - theta_base)                         # per model, see sparsify.py
    mixed   = sum_i w_i * delta_i * m_i  /  (normalize ? sum_i w_i * m_i : 1)
    theta   = theta_base + lambda * mixed

with ``m_i`` the sign-consensus mask of TIES (Yadav et al. 2023, arXiv 2306.01708, steps 2 "elect" and
3 "disjoint merge") or all ones without consensus (task arithmetic, Ilharco et al. 2022, arXiv 2212.04089).
Semantics follow mergekit 0.1.5's ``GeneralizedTaskArithmeticMerge``: the sign is elected from the
*weighted* deltas, a zero divisor becomes 1 with consensus, and without consensus a divisor with
``|sum w| < 1e-8`` becomes 1 (so weights summing to zero are not normalised).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum

import torch

from dfsmerge.errors import MergeError
from dfsmerge.merge.sparsify import Sparsification, sparsify

__all__ = ["Consensus", "disjoint_merge", "generalized_task_arithmetic", "sign_consensus"]

# Without consensus a weight sum this small is treated as zero: no normalisation.
_ZERO_WEIGHT_SUM = 1e-8


class Consensus(str, Enum):  # noqa: UP042 (StrEnum needs Python 3.11)
    """How the sign of each parameter is elected (TIES uses ``sum``)."""

    sum = "sum"
    count = "count"


def sign_consensus(
    weighted_deltas: torch.Tensor, method: Consensus | str = Consensus.sum, *, int8_mask: bool = False
) -> torch.Tensor:
    """TIES sign election: which entries agree with the elected sign.

    Args:
        weighted_deltas: (K, *S) task vectors already multiplied by their weights.
        method: ``sum`` elects the sign of the sum of weighted deltas (TIES, "elect"); ``count`` the sign held
            by most models. Ties (a zero sum) elect ``+``.
        int8_mask: compute signs in int8 to save memory (same result).

    Returns:
        (K, *S) bool mask; ``True`` where the delta is nonzero and has the elected sign.
    """
    dtype = torch.int8 if int8_mask else weighted_deltas.dtype
    sign = weighted_deltas.sign().to(dtype)  # (K, *S)
    method = Consensus(method)
    score = weighted_deltas.sum(dim=0) if method is Consensus.sum else sign.sum(dim=0)  # (*S)
    elected = (score >= 0).to(dtype) * 2 - 1  # (*S) in {-1, +1}
    return sign == elected


def disjoint_merge(
    weighted_deltas: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    normalize: bool,
) -> torch.Tensor:
    """Sum weighted task vectors, keeping only masked entries, optionally dividing by the kept weight.

    Args:
        weighted_deltas: (K, *S) ``w_i * delta_i``.
        weights: (K,) the ``w_i``.
        mask: (K, *S) bool consensus mask, or None for plain task arithmetic.
        normalize: divide by ``sum_i w_i m_i`` per entry (with a mask; 0 -> 1) or by ``sum_i w_i`` (without;
            ``|sum| < 1e-8`` -> 1).

    Returns:
        (*S) merged task vector.
    """
    w = weights.reshape((-1,) + (1,) * (weighted_deltas.dim() - 1))  # (K, 1, ..., 1)
    if mask is not None:
        mixed = (weighted_deltas * mask).sum(dim=0)  # (*S)
        if not normalize:
            return mixed
        divisor = (w * mask).sum(dim=0)  # (*S)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = weighted_deltas.sum(dim=0)
        if not normalize:
            return mixed
        divisor = w.sum(dim=0)  # (1, ..., 1)
        divisor = torch.where(divisor.abs() < _ZERO_WEIGHT_SUM, torch.ones_like(divisor), divisor)
    return mixed / divisor


def _ordered_sum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    out = tensors[0].clone()
    for t in tensors[1:]:
        out += t
    return out


def _per_model(value: float | Sequence[float], k: int, what: str) -> list[float]:
    if isinstance(value, int | float):
        return [float(value)] * k
    values = [float(v) for v in value]
    if len(values) != k:
        raise MergeError(f"{what} has {len(values)} values for {k} models; give one per non-base model")
    return values


def generalized_task_arithmetic(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: float | Sequence[float] = 1.0,
    *,
    sparsification: Sparsification | str | None = None,
    consensus: Consensus | str | None = None,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    epsilon: float | Sequence[float] = 0.15,
    gamma: float | Sequence[float] = 0.01,
    generator: torch.Generator | None = None,
    prune: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Merge fine-tunes of ``base`` through their task vectors (see the module docstring for the formula).

    Args:
        base: (*S) base model tensor.
        tensors: K tensors (*S) of the other models (not including the base).
        weights: K weights ``w_i``.
        densities: K densities (or one for all); ignored without ``sparsification``.
        sparsification: pruning of each task vector (:class:`~dfsmerge.merge.sparsify.Sparsification`) or None.
        consensus: TIES sign election (:class:`Consensus`) or None.
        normalize: divide by the (kept) weight sum.
        rescale: L1-norm matching after pruning (DARE/DELLA default).
        lambda_: scale of the merged task vector.
        int8_mask: int8 sign computation (memory only).
        epsilon: DELLA probability half-width, per model or one value.
        gamma: Breadcrumbs outlier fraction, per model or one value.
        generator: RNG of random sparsification; draws happen model by model in order.
        prune: ``(i, delta_i) -> pruned delta_i`` (may work in place) instead of ``sparsification``: how a row
            chunk is pruned with thresholds found over the whole tensor (:mod:`dfsmerge.merge.chunked`).

    Returns:
        (*S) merged tensor in ``base``'s dtype. With K = 0, ``base`` itself.

    Raises:
        MergeError: per-model lists of the wrong length, or DELLA epsilon out of range.
    """
    k = len(tensors)
    if k == 0:
        return base
    weights = _per_model(weights, k, "weight")
    densities = _per_model(densities, k, "density")
    epsilons = _per_model(epsilon, k, "epsilon")
    gammas = _per_model(gamma, k, "gamma")
    # Memory: the K weighted deltas plus a few full-size temporaries, never (K, *S) stacks of signs, masks and
    # products as in the stacked building blocks above (tests/merge checks both against mergekit).
    w = torch.tensor(weights, dtype=base.dtype, device=base.device)  # (K,)
    deltas = []
    for i, tensor in enumerate(tensors):
        delta = tensor - base  # (*S)
        if prune is not None:
            delta = prune(i, delta)
        elif sparsification is not None:
            delta = sparsify(delta, sparsification, densities[i], rescale=rescale, gamma=gammas[i],
                             epsilon=epsilons[i], generator=generator, inplace=True)
        deltas.append(delta.mul_(w[i]))  # w_i * delta_i (delta is our own temporary)
    if consensus is None:
        mixed = _ordered_sum(deltas)
        if normalize:
            divisor = w.sum()
            if divisor.abs() >= _ZERO_WEIGHT_SUM:
                mixed = mixed / divisor
    else:
        if Consensus(consensus) is Consensus.sum:
            elected_positive = _ordered_sum(deltas) >= 0  # (*S) sign of the summed weighted deltas
        else:
            votes = torch.zeros(base.shape, dtype=torch.int8 if int8_mask else base.dtype, device=base.device)
            for d in deltas:
                votes += d.sign().to(votes.dtype)
            elected_positive = votes >= 0
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base) if normalize else None
        for i, d in enumerate(deltas):
            agree = torch.where(elected_positive, d > 0, d < 0)  # sign(d) == elected sign (zeros never agree)
            mixed += d.masked_fill_(~agree, 0)  # d is not needed after this
            if divisor is not None:
                divisor.add_(agree, alpha=float(w[i]))
        if divisor is not None:
            divisor[divisor == 0] = 1
            mixed /= divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return (base + mixed).to(base.dtype)
