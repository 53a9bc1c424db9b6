"""Fused slerp (Shoemake 1985, "Animating rotation with quaternion curves"), mergekit 0.1.5 ``slerp``:
the whole tensor is one vector.

    na, nb = ||a||, ||b|| (1 where <= 1e-8);  dot = clamp(<a/na, b/nb>, -1, 1)
    |dot| > 0.9995 (colinear or antipodal): out = (1 - t) a + t b
    else: theta = acos(dot); out = sin((1 - t) theta)/sin(theta) a + sin(t theta)/sin(theta) b

with a the base and b the other model (t = 0 returns the base). Two kernels: one reduction pass writes
per-program partial sums of a.a, b.b, a.b (summed by torch, deterministic: no atomics), a few scalar torch ops
make the two coefficients on the device (no host sync), one elementwise pass writes ``out``. Traffic: 2 reads
for the reduction + 2 reads and 1 write; the reduction depends only on the sources, so a search varying t could
keep it.
"""

from __future__ import annotations

import torch

from ._common import check_kernel_mode, check_triton_inputs, promoted_dtype, tl, triton

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp_reference(
    t: float, a: torch.Tensor, b: torch.Tensor, *, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Eager fp32 slerp of two tensors viewed as vectors.

    Args:
        t: interpolation factor (0 -> ``a``, 1 -> ``b``).
        a: base tensor.
        b: other tensor, same shape.
        out_dtype: result dtype (default: promoted dtype).

    Returns:
        The interpolated tensor.
    """
    out_dtype = out_dtype or promoted_dtype([a, b])
    x, y = a.float().flatten(), b.float().flatten()  # (n,)
    coef_a, coef_b = slerp_coefficients(t, x.dot(x), y.dot(y), x.dot(y))
    return (coef_a * x + coef_b * y).reshape(a.shape).to(out_dtype)


def slerp_coefficients(
    t: float, aa: torch.Tensor, bb: torch.Tensor, ab: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients (of a, of b) from the sums a.a, b.b, a.b (0-d fp32/fp64 tensors), lerp when colinear."""
    na, nb = aa.sqrt(), bb.sqrt()
    na = torch.where(na > NORM_EPS, na, torch.ones_like(na))
    nb = torch.where(nb > NORM_EPS, nb, torch.ones_like(nb))
    dot = (ab / (na * nb)).clamp(-1, 1)
    linear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, torch.zeros_like(dot), dot))
    sin_theta = torch.sin(theta)
    safe = torch.where(linear, torch.ones_like(sin_theta), sin_theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / safe)
    coef_b = torch.where(linear, torch.full_like(theta, t), torch.sin(t * theta) / safe)
    return coef_a.float(), coef_b.float()


@triton.jit
def _slerp_reduce_kernel(
    a_ptr,  # base tensor, n elements (fp32/fp16/bf16)
    b_ptr,  # other tensor, n elements
    partial_ptr,  # (G, 3) fp32 out: per-program [a.a, b.b, a.b]
    n,  # number of elements
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    x = tl.load(a_ptr + offs, mask=valid, other=0).to(tl.float32)
    y = tl.load(b_ptr + offs, mask=valid, other=0).to(tl.float32)
    tl.store(partial_ptr + pid * 3 + 0, tl.sum(x * x, axis=0))
    tl.store(partial_ptr + pid * 3 + 1, tl.sum(y * y, axis=0))
    tl.store(partial_ptr + pid * 3 + 2, tl.sum(x * y, axis=0))


@triton.jit
def _slerp_combine_kernel(
    a_ptr,  # base tensor, n elements
    b_ptr,  # other tensor, n elements
    coef_ptr,  # (2,) fp32: coefficient of a, coefficient of b
    out_ptr,  # output, n elements (may alias a or b)
    n,  # number of elements
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    x = tl.load(a_ptr + offs, mask=valid, other=0).to(tl.float32)
    y = tl.load(b_ptr + offs, mask=valid, other=0).to(tl.float32)
    result = tl.load(coef_ptr + 0) * x + tl.load(coef_ptr + 1) * y
    tl.store(out_ptr + offs, result.to(out_ptr.dtype.element_ty), mask=valid)


def slerp_triton(
    t: float,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    block: int = 1024,
    num_warps: int = 4,
) -> torch.Tensor:
    """Run the fused slerp with Triton (one reduction pass, one elementwise pass).

    Args:
        t: interpolation factor (0 -> ``a``).
        a: base tensor, contiguous fp32/fp16/bf16 on CUDA (or CPU under ``TRITON_INTERPRET=1``).
        b: other tensor, same shape, device and layout.
        out: output tensor; allocated in the promoted dtype when None.
        block: elements per program.
        num_warps: Triton launch option.

    Returns:
        ``out``.

    Raises:
        MergeError: unsupported dtype / device / layout / shape.
    """
    check_triton_inputs("slerp (fused kernel)", [a, b], out)
    check_kernel_mode(_slerp_reduce_kernel, a.device, "slerp (fused kernel)")
    if out is None:
        out = torch.empty_like(a, dtype=promoted_dtype([a, b]))
    n = a.numel()
    if n == 0:
        return out
    grid = (triton.cdiv(n, block),)
    partial = torch.empty((grid[0], 3), dtype=torch.float32, device=a.device)
    _slerp_reduce_kernel[grid](a, b, partial, n, BLOCK=block, num_warps=num_warps)
    aa, bb, ab = partial.double().sum(0).unbind()
    coef_a, coef_b = slerp_coefficients(float(t), aa, bb, ab)
    coefs = torch.stack([coef_a, coef_b]).to(torch.float32)  # (2,)
    _slerp_combine_kernel[grid](a, b, coefs, out, n, BLOCK=block, num_warps=num_warps)
    return out
