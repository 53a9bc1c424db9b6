"""Fused linear merge (model soups; Wortsman et al. 2022, arXiv 2203.05482), mergekit 0.1.5 ``linear``:

    out = sum_i w_i x_i / (sum_i w_i if normalize else 1)

over every input (a base, if any, is just another weighted input). One pass: N reads, one write.
Inputs are a tuple of pointers for the reasons given in gta.py. A zero weight sum with ``normalize`` is
rejected by ``fused_merge`` (mergekit would divide by zero), as the merge library does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._common import check_kernel_mode, check_triton_inputs, promoted_dtype, tl, triton


def linear_reference(
    tensors: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    normalize: bool = True,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Eager fp32 weighted average.

    Args:
        tensors: N tensors of one shape.
        weights: N weights.
        normalize: divide by the weight sum.
        out_dtype: result dtype (default: promoted dtype of the inputs).

    Returns:
        The merged tensor.
    """
    out_dtype = out_dtype or promoted_dtype(tensors)
    acc = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    for x, w in zip(tensors, weights, strict=True):
        acc += x.float() * w
    if normalize:
        acc = acc / torch.tensor(list(weights), dtype=torch.float32).sum().item()
    return acc.to(out_dtype)


@triton.jit
def _linear_kernel(
    srcs,  # tuple of N pointers: the inputs, n elements each (fp32/fp16/bf16)
    w_ptr,  # (N + 1,) fp32: the weights, then the divisor (weight sum, or 1 without normalize)
    out_ptr,  # output, n elements (may alias an input)
    n,  # number of elements
    N: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) global indices
    valid = offs < n
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(N):
        x = tl.load(srcs[i] + offs, mask=valid, other=0).to(tl.float32)
        acc += x * tl.load(w_ptr + i)
    acc = acc / tl.load(w_ptr + N)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=valid)


def linear_triton(
    tensors: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    normalize: bool = True,
    out: torch.Tensor | None = None,
    block: int = 1024,
    num_warps: int = 4,
) -> torch.Tensor:
    """Run the fused linear merge with Triton.

    Args:
        tensors: N contiguous tensors of one shape on one device (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        weights: N weights.
        normalize: divide by the weight sum.
        out: output tensor; allocated in the promoted dtype when None.
        block: elements per program.
        num_warps: Triton launch option.

    Returns:
        ``out``.

    Raises:
        MergeError: unsupported dtype / device / layout / shape.
    """
    check_triton_inputs("linear (fused kernel)", list(tensors), out)
    check_kernel_mode(_linear_kernel, tensors[0].device, "linear (fused kernel)")
    if out is None:
        out = torch.empty_like(tensors[0], dtype=promoted_dtype(tensors))
    n = out.numel()
    if n == 0:
        return out
    w = torch.tensor(list(weights), dtype=torch.float32)
    div = w.sum() if normalize else torch.ones(())
    table = torch.cat([w, div.reshape(1)]).to(out.device)  # (N + 1,)
    _linear_kernel[(triton.cdiv(n, block),)](
        tuple(tensors), table, out, n, N=len(tensors), BLOCK=block, num_warps=num_warps
    )
    return out
