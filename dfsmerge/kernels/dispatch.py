"""Dispatch of a fused merge: :func:`fused_merge` runs the Triton kernel on CUDA tensors and the eager PyTorch
reference elsewhere; the kernel modules are imported on first use."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from dfsmerge.errors import MergeError
from dfsmerge.kernels._common import SUPPORTED_DTYPES, resolve_params
from dfsmerge.merge import get_method

BACKENDS = ("auto", "triton", "reference")
KERNELS = ("gta", "linear", "slerp")
"""The fused kernels, by the name a :class:`~dfsmerge.merge.MergeMethod` declares in ``kernel``."""


def triton_available() -> bool:
    """True when triton can be imported (it is not imported by this check if already absent)."""
    if "triton" in sys.modules:
        return sys.modules["triton"] is not None
    return importlib.util.find_spec("triton") is not None


def triton_supports(tensors: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> bool:
    """True when ``backend='auto'`` would pick Triton: triton installed, every tensor (and ``out``) on one
    CUDA device, contiguous, of one shape, stored fp32/fp16/bf16."""
    every = [*tensors, *([out] if out is not None else [])]
    if not every or not triton_available():
        return False
    first = every[0]
    return all(
        t.device == first.device and t.device.type == "cuda" and t.is_contiguous() and t.dtype in SUPPORTED_DTYPES
        and t.shape == first.shape
        for t in every
    )


def fused_merge(
    method_name: str,
    tensors: Sequence[torch.Tensor],
    *,
    base_index: int | None = None,
    params: Any = None,
    global_params: Mapping[str, Any] | None = None,
    seed: int = 0,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Merge one tensor with a fused kernel (mergekit 0.1.5 semantics, fp32 compute).

    Args:
        method_name: a name in :data:`METHOD_NAMES` (task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs,
            breadcrumbs_ties, della, della_linear, linear, slerp).
        tensors: the inputs, base included, all of one shape.
        base_index: position of the base in ``tensors`` (required except for ``linear``).
        params: per-input parameters (``weight``, ``density``, ``gamma``, ``epsilon``): a mapping of name to a
            scalar or a sequence aligned with ``tensors`` (GTA also accepts one value per non-base input), or a
            sequence of mappings aligned with ``tensors``. The base's values are ignored by GTA methods.
        global_params: shared parameters: ``normalize``, ``rescale``, ``lambda``, ``t`` (slerp); per-input
            names given here broadcast to every input.
        seed: RNG seed of DARE / DELLA masks. The Triton path uses a counter-based Philox keyed by element index
            (reproducible, independent of block size); the reference path uses torch's RNG: the two paths draw
            different masks for the same seed.
        out: where to write the result (e.g. a resident parameter's storage); allocated in the promoted dtype
            of the inputs when None. May alias an input.
        backend: ``auto`` (Triton when ``triton_supports`` the tensors, else the reference), ``triton``
            (CUDA, or CPU with ``TRITON_INTERPRET=1``; errors otherwise) or ``reference``.

    Returns:
        The merged tensor (``out`` when given).

    Raises:
        MergeError: unknown method, backend or parameter; a value outside its range; bad base index; inputs the
            forced backend cannot take.
    """
    if backend not in BACKENDS:
        raise MergeError(f"backend={backend!r} is unknown; use one of {list(BACKENDS)}")
    tensors = list(tensors)
    if not tensors:
        raise MergeError(f"{method_name}: no input tensors; pass the base and at least one other tensor")
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if t.shape != shape:
            raise MergeError(
                f"{method_name}: tensors[{i}] has shape {tuple(t.shape)} but tensors[0] has {tuple(shape)}; "
                f"every input of one merged tensor must have the same shape"
            )
    if out is not None and out.shape != shape:
        raise MergeError(f"{method_name}: out has shape {tuple(out.shape)}, expected {tuple(shape)}")
    rp = resolve_params(method_name, len(tensors), base_index, params, global_params)
    use_triton = backend == "triton" or (backend == "auto" and triton_supports(tensors, out))
    kernel = get_method(method_name).kernel
    result = _run(kernel, method_name, tensors, base_index, rp, seed, triton=use_triton, out=out)
    if use_triton or out is None:
        return result
    out.copy_(result)
    return out


# The kernel modules are imported here, not at the top: ``triton.jit`` reads TRITON_INTERPRET when it decorates.
def _run(kernel, method, tensors, base_index, rp, seed, *, triton, out):
    """``kernel``'s Triton function (writing into ``out``) or its PyTorch reference (in ``out``'s dtype)."""
    where = {"out": out} if triton else {"out_dtype": None if out is None else out.dtype}
    if kernel == "linear":
        from .linear import linear_reference, linear_triton

        fn = linear_triton if triton else linear_reference
        return fn(tensors, weights=rp.weights, normalize=rp.normalize, **where)
    if kernel == "slerp":
        from .slerp import slerp_reference, slerp_triton

        fn = slerp_triton if triton else slerp_reference
        return fn(rp.t, tensors[base_index], tensors[1 - base_index], **where)
    from .gta import gta_reference, gta_triton

    fn = gta_triton if triton else gta_reference
    sources = [t for i, t in enumerate(tensors) if i != base_index]
    return fn(method, tensors[base_index], sources, weights=rp.weights, densities=rp.densities, gammas=rp.gammas,
              epsilons=rp.epsilons, normalize=rp.normalize, rescale=rp.rescale, lam=rp.lam, seed=seed, **where)
