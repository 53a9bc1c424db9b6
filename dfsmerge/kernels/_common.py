"""Shared pieces of the fused merge kernels: method table, parameter resolution, input checks and a guarded
Triton import (the reference path works without Triton installed).

The method semantics are those of mergekit 0.1.5's generalized task arithmetic family, ``linear`` and ``slerp``
(Ilharco et al. 2023, arXiv 2212.04089; Yadav et al. 2023, TIES, arXiv 2306.01708; Yu et al. 2024, DARE,
arXiv 2311.03099; Davari & Belilovsky 2024, Model Breadcrumbs, arXiv 2312.06795; Deep et al. 2024, DELLA,
arXiv 2406.11617; Wortsman et al. 2022, model soups, arXiv 2203.05482).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dfsmerge.errors import MergeError

try:  # Triton is optional: without it every method runs on its PyTorch reference.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAVE_TRITON = False

    class _Unavailable:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __getitem__(self, grid: Any) -> Any:
            raise MergeError("triton is not installed; install dfsmerge[triton] or use backend='reference'")

    class _TritonStub:
        @staticmethod
        def jit(fn: Any = None, **kwargs: Any) -> Any:
            return _Unavailable() if fn is not None else (lambda f: _Unavailable())

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

    class _TLStub:
        constexpr = object  # only used in kernel signatures, never executed without triton

    triton = _TritonStub()  # type: ignore[assignment]
    tl = _TLStub()  # type: ignore[assignment]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Every per-source parameter the kernels read, and every shared one the methods accept.
PER_INPUT_PARAMS = ("weight", "density", "gamma", "epsilon")
SHARED_PARAMS = ("normalize", "rescale", "lambda", "int8_mask", "t")


@dataclass(frozen=True, slots=True)
class GTAMethod:
    """One member of the generalized task arithmetic family (mergekit's ``GeneralizedTaskArithmeticMerge``).

    Attributes:
        name: registry name, as in a mergekit YAML ``merge_method``.
        sparsification: ``None``, ``"magnitude"`` (TIES top-k), ``"random"`` (DARE), ``"magnitude_outliers"``
            (breadcrumbs band) or ``"della_magprune"`` (DELLA rank-based keep probabilities).
        consensus: ``None``, ``"sum"`` (TIES sign election by summed mass) or ``"count"`` (by sign count).
        default_normalize: divide by the sum of the weights that contributed.
        default_rescale: rescale each sparsified delta to its original L1 norm.
    """

    name: str
    sparsification: str | None
    consensus: str | None
    default_normalize: bool
    default_rescale: bool


GTA_METHODS: dict[str, GTAMethod] = {
    m.name: m
    for m in (
        GTAMethod("task_arithmetic", None, None, False, False),
        GTAMethod("ties", "magnitude", "sum", True, False),
        GTAMethod("dare_ties", "random", "sum", False, True),
        GTAMethod("dare_linear", "random", None, False, True),
        GTAMethod("breadcrumbs", "magnitude_outliers", None, False, False),
        GTAMethod("breadcrumbs_ties", "magnitude_outliers", "sum", False, False),
        GTAMethod("della", "della_magprune", "sum", True, True),
        GTAMethod("della_linear", "della_magprune", None, False, True),
    )
}
METHOD_NAMES: tuple[str, ...] = (*GTA_METHODS, "linear", "slerp")


@dataclass(frozen=True, slots=True)
class ResolvedParams:
    """Parameters of one merge call, resolved to plain Python values.

    Attributes:
        weights: per merged input (GTA: the non-base sources in input order; linear: every input).
        densities, gammas, epsilons: per non-base source (GTA only).
        normalize, rescale: resolved against the method's defaults.
        lam: mergekit's ``lambda`` (scales the mixed delta).
        t: slerp's interpolation factor.
    """

    weights: tuple[float, ...]
    densities: tuple[float, ...]
    gammas: tuple[float, ...]
    epsilons: tuple[float, ...]
    normalize: bool
    rescale: bool
    lam: float
    t: float | None


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _per_input(
    name: str, params: Any, n_inputs: int, default: float | None, method: str, base_index: int | None = None
) -> list[float | None]:
    """Values of one per-input parameter for every input (index-aligned with ``tensors``); a sequence with one
    value per non-base input (mergekit's NON_BASE scope) is accepted when ``base_index`` is given."""
    if params is None:
        params = {}
    if isinstance(params, Mapping):
        value = params.get(name, default)
        if isinstance(value, Sequence) and not isinstance(value, str):
            if base_index is not None and len(value) == n_inputs - 1:
                value = [*value[:base_index], None, *value[base_index:]]
            if len(value) != n_inputs:
                raise MergeError(
                    f"{method}: params[{name!r}] has {len(value)} values but there are {n_inputs} input tensors; "
                    f"give one value per input tensor (the base's value is ignored) or a single scalar"
                )
            return [None if v is None else float(v) for v in value]
        return [None if value is None else float(value)] * n_inputs
    if isinstance(params, Sequence):
        if len(params) != n_inputs:
            raise MergeError(
                f"{method}: params has {len(params)} entries but there are {n_inputs} input tensors; "
                f"give one mapping per input tensor"
            )
        out: list[float | None] = []
        for entry in params:
            value = (entry or {}).get(name, default)
            out.append(None if value is None else float(value))
        return out
    raise MergeError(
        f"{method}: params={params!r} is neither a mapping nor a sequence of mappings; "
        f"use {{'weight': [...], 'density': [...]}} or [{{'weight': 1.0}}, ...]"
    )


def _check_names(method: str, params: Any, global_params: Mapping[str, Any] | None) -> None:
    names: set[str] = set()
    if isinstance(params, Mapping):
        names |= set(params)
    elif isinstance(params, Sequence):
        for entry in params:
            names |= set(entry or {})
    unknown = names - set(PER_INPUT_PARAMS) - {"t"}
    unknown |= set(global_params or {}) - set(SHARED_PARAMS) - set(PER_INPUT_PARAMS)
    if unknown:
        raise MergeError(
            f"{method}: unknown parameter(s) {sorted(unknown)}; "
            f"per-input parameters are {list(PER_INPUT_PARAMS)}, shared ones {list(SHARED_PARAMS)}"
        )


def resolve_params(
    method: str,
    n_inputs: int,
    base_index: int | None,
    params: Any,
    global_params: Mapping[str, Any] | None,
) -> ResolvedParams:
    """Resolve per-input and shared parameters the way mergekit binds them.

    Args:
        method: registry name (one of ``METHOD_NAMES``).
        n_inputs: number of input tensors, base included.
        base_index: index of the base among the inputs (required except for ``linear``).
        params: per-input parameters: a mapping ``name -> scalar | sequence aligned with the inputs`` or a
            sequence (aligned with the inputs) of mappings. Per-input values may also be given in
            ``global_params``, broadcast to every input.
        global_params: shared parameters (``normalize``, ``rescale``, ``lambda``, ``t``, ``int8_mask``).

    Returns:
        The resolved values.

    Raises:
        MergeError: unknown method or parameter, missing weight, wrong number of values, bad base index.
    """
    if method not in METHOD_NAMES:
        raise MergeError(f"merge_method={method!r} has no fused kernel; use one of {list(METHOD_NAMES)}")
    _check_names(method, params, global_params)
    g = dict(global_params or {})
    if params is None or (isinstance(params, Mapping) and not params):
        params = {k: v for k, v in g.items() if k in PER_INPUT_PARAMS}
    elif isinstance(params, Mapping):
        params = {**{k: v for k, v in g.items() if k in PER_INPUT_PARAMS}, **params}

    if method != "linear" and (base_index is None or not 0 <= base_index < n_inputs):
        raise MergeError(
            f"{method}: base_index={base_index!r} is not an index into the {n_inputs} input tensors; "
            f"pass the position of the base model's tensor"
        )
    if method == "slerp":
        t = g.get("t", params.get("t") if isinstance(params, Mapping) else None)
        if t is None:
            raise MergeError("slerp: parameter 't' is missing; set global_params={'t': 0.5} (0 = base, 1 = other)")
        if n_inputs != 2:
            raise MergeError(f"slerp: got {n_inputs} input tensors; slerp merges exactly a base and one other")
        return ResolvedParams((), (), (), (), False, False, 1.0, float(t))

    weights = _per_input("weight", params, n_inputs, None, method, None if method == "linear" else base_index)
    if method == "linear":
        if any(w is None for w in weights):
            raise MergeError("linear: parameter 'weight' is missing for some input; give one weight per input")
        normalize = bool(g.get("normalize", True))
        if normalize and sum(weights) == 0:
            raise MergeError(
                f"linear: weights {weights} sum to 0 with normalize=true (division by zero); "
                f"change the weights or set normalize: false"
            )
        return ResolvedParams(tuple(weights), (), (), (), normalize, False, 1.0, None)

    spec = GTA_METHODS[method]
    keep = [i for i in range(n_inputs) if i != base_index]
    densities = _per_input("density", params, n_inputs, 1.0, method, base_index)
    gammas = _per_input("gamma", params, n_inputs, 0.01, method, base_index)
    epsilons = _per_input("epsilon", params, n_inputs, 0.15, method, base_index)
    missing = [i for i in keep if weights[i] is None]
    if missing:
        raise MergeError(
            f"{method}: parameter 'weight' is missing for input(s) {missing}; give every non-base input a weight"
        )
    return ResolvedParams(
        weights=tuple(weights[i] for i in keep),
        densities=tuple(densities[i] for i in keep),
        gammas=tuple(gammas[i] for i in keep),
        epsilons=tuple(epsilons[i] for i in keep),
        normalize=bool(g.get("normalize", spec.default_normalize)),
        rescale=bool(g.get("rescale", spec.default_rescale)),
        lam=float(g.get("lambda", 1.0)),
        t=None,
    )


def check_triton_inputs(
    what: str, tensors: Sequence[torch.Tensor], out: torch.Tensor | None
) -> None:
    """Raise a MergeError naming the problem and the fix when the Triton path cannot take these tensors.

    Args:
        what: kernel name for the message.
        tensors: every input tensor (same shape, contiguous, fp32/fp16/bf16, one device).
        out: optional output tensor (same shape and device, contiguous, fp32/fp16/bf16).

    Raises:
        MergeError: Triton missing, a device that is neither CUDA nor the CPU interpreter, an unsupported dtype,
            a shape mismatch or a non-contiguous layout.
    """
    if not HAVE_TRITON:
        raise MergeError(f"{what}: triton is not installed; install dfsmerge[triton] or use backend='reference'")
    shape, device = tensors[0].shape, tensors[0].device
    every = [*tensors, *([out] if out is not None else [])]
    for i, t in enumerate(every):
        label = "out" if out is not None and i == len(every) - 1 else f"tensors[{i}]"
        if t.dtype not in SUPPORTED_DTYPES:
            raise MergeError(
                f"{what}: {label} has dtype {t.dtype}; the kernels store fp32, fp16 or bf16 - cast it "
                f"(tensor.to(torch.bfloat16)) or use backend='reference'"
            )
        if t.shape != shape:
            raise MergeError(f"{what}: {label} has shape {tuple(t.shape)} but tensors[0] has {tuple(shape)}")
        if t.device != device:
            raise MergeError(f"{what}: {label} is on {t.device} but tensors[0] is on {device}; move them together")
        if not t.is_contiguous():
            raise MergeError(
                f"{what}: {label} is not contiguous (strides {t.stride()}); pass tensor.contiguous() "
                f"or use backend='reference'"
            )
    if device.type != "cuda" and not (device.type == "cpu" and interpreter_enabled()):
        raise MergeError(
            f"{what}: tensors are on {device}; the Triton kernels run on CUDA (or on CPU with "
            f"TRITON_INTERPRET=1 set before triton is imported); use backend='reference' here"
        )


def promoted_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """mergekit promotes all inputs of a group to one dtype; the result is returned in it."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def check_kernel_mode(kernel: Any, device: torch.device, what: str) -> None:
    """Raise when CPU tensors meet a kernel compiled for the GPU: Triton picks the interpreter when the kernel
    module is imported, so ``TRITON_INTERPRET=1`` set later does not apply to it.

    Raises:
        MergeError: naming the fix.
    """
    if device.type == "cpu" and type(kernel).__name__ != "InterpretedFunction":
        raise MergeError(
            f"{what}: CPU tensors, but the kernel module was imported without TRITON_INTERPRET=1; set it before "
            f"the first Triton merge in the process (before importing dfsmerge.kernels.gta/linear/slerp) "
            f"or use backend='reference'"
        )
