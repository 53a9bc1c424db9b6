"""Spherical linear interpolation (Shoemake 1985, "Animating rotation with quaternion curves").

``slerp`` treats the whole tensor as one vector (mergekit's ``slerp``); ``nuslerp`` treats rows, columns or
the whole tensor as vectors, weights its two models, and can interpolate task vectors around a base
(mergekit's ``nuslerp``).
"""

from __future__ import annotations

import torch

__all__ = ["nuslerp", "slerp"]


def slerp(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Interpolate from ``v0`` (t=0) to ``v1`` (t=1) along the great circle through their directions.

    The tensors are flattened into single vectors. The angle comes from the normalised vectors (a norm
    ``<= eps`` counts as 1); when ``|cos| > dot_threshold`` (nearly colinear or antipodal) it falls back to
    linear interpolation. The unnormalised inputs are combined:
    ``sin((1-t) theta)/sin(theta) * v0 + sin(t theta)/sin(theta) * v1``.
    Works in float32 (float64 for float64 inputs).

    Args:
        t: interpolation factor (not clipped).
        v0: base tensor.
        v1: other tensor, same shape.
        dot_threshold: colinearity threshold on the cosine.
        eps: smallest norm treated as nonzero.

    Returns:
        Tensor of ``v0``'s shape, in the working dtype (float32 or float64).
    """
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(-1).to(dtype)  # (N,)
    b = v1.reshape(-1).to(dtype)
    t_ = torch.tensor(t, dtype=dtype, device=a.device)
    if a.numel() == 0:
        return ((1 - t_) * a + t_ * b).reshape(v0.shape)
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > eps, norm_a, torch.ones_like(norm_a))
    norm_b = torch.where(norm_b > eps, norm_b, torch.ones_like(norm_b))
    cos = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)
    if cos.abs() > dot_threshold:
        coef_a, coef_b = 1 - t_, t_
    else:
        theta = torch.acos(cos)
        sin_theta = torch.sin(theta)
        coef_a = torch.sin((1 - t_) * theta) / sin_theta
        coef_b = torch.sin(t_ * theta) / sin_theta
    return (coef_a * a + coef_b * b).reshape(v0.shape)


def nuslerp(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    row_wise: bool = False,
    flatten: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Slerp over vectors of a tensor: the whole tensor (``flatten``), else along dim 0 (``row_wise``) or -1.

    Vectors are normalised with norms clamped to 1e-7; a vector pair with ``1 - cos^2 <= eps^2`` (colinear
    or antipodal) is interpolated linearly.

    Args:
        t: weight of ``v1`` (t=0 gives ``v0``).
        v0, v1: tensors of one shape.
        row_wise: vectors run along dim 0 (ignored when ``flatten``).
        flatten: one vector per tensor (mergekit's default ``nuslerp_flatten: true``).
        eps: colinearity tolerance.

    Returns:
        Tensor of ``v0``'s shape and dtype.
    """
    shape = v0.shape
    dim = 0 if row_wise else -1
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)  # (N,)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)  # vectors on the last axis
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)  # (..., 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin_theta = torch.sin(theta)
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(shape)
