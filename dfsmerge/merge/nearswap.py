"""NearSwap (alchemonaut, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001), as mergekit 0.1.5's
``nearswap``: take the other model's value where it is close to the base's, interpolate towards the base where
the two differ more.

    w     = clamp(t / max(|a - b|, 1e-6), 0, 1)      per entry
    theta = w * b + (1 - w) * a                      a: base, b: the other model
"""

from __future__ import annotations

import torch

__all__ = ["nearswap"]


def nearswap(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Entries within ``t`` of the base take ``other``'s value; farther ones move ``t / |a - b|`` of the way.

    Args:
        t: similarity threshold (>= 0; 0 returns the base).
        base: (*S) base tensor ``a``.
        other: (*S) other tensor ``b``.

    Returns:
        (*S) merged tensor.
    """
    w = (t / (base - other).abs().clamp(min=1e-6)).clamp(min=0, max=1)  # (*S)
    return w * other + (1 - w) * base
