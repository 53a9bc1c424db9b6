"""Linear merge ("model soups", Wortsman et al. 2022, arXiv 2203.05482) and passthrough with a scale."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dfsmerge.errors import MergeError

__all__ = ["linear", "passthrough"]


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True) -> torch.Tensor:
    """Weighted sum ``sum_i w_i theta_i``, divided by ``sum_i w_i`` when ``normalize``.

    Accumulates in float32 (float64 for float64 inputs) in input order, as mergekit 0.1.5.

    Args:
        tensors: K tensors of one shape.
        weights: K weights (negative allowed).
        normalize: divide by the weight sum.

    Returns:
        Tensor of the inputs' shape and the first input's dtype.

    Raises:
        MergeError: ``normalize`` with weights summing to exactly 0 (mergekit would return inf/NaN).

    Limitations: no base model; the weights are not clipped.
    """
    first = tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    w = torch.tensor([float(x) for x in weights], dtype=dtype)  # (K,)
    total = w.sum()
    if normalize and total == 0:
        raise MergeError(
            f"linear: weights {list(weights)} sum to 0 with normalize=true (division by zero); "
            "change the weights or set normalize: false"
        )
    coefficients = w.tolist()
    result = torch.mul(first, coefficients[0]) if first.dtype == dtype else first.to(dtype).mul_(coefficients[0])
    for tensor, coefficient in zip(tensors[1:], coefficients[1:], strict=True):
        result.add_(tensor, alpha=coefficient)  # promotes to the fp32 accumulator in the same pass
    if normalize:
        result = result / total.to(first.device)
    return result.to(first.dtype)


def passthrough(tensor: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Copy one tensor, optionally multiplied by ``scale`` (mergekit's passthrough ``scale`` parameter).

    Args:
        tensor: the single input.
        scale: multiplier, or None to return the input unchanged.

    Returns:
        ``tensor`` or ``tensor * scale`` (same dtype).
    """
    return tensor if scale is None else tensor * scale
