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
from dfsmerge.merge import GTA_VARIANTS, get_method, registered_methods
from dfsmerge.merge import resolve_params as registry_resolve

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
METHOD_NAMES: tuple[str, ...] = tuple(n for n in registered_methods() if get_method(n).kernel is not None)
"""Registered methods with a fused kernel (the merge registry's ``MergeMethod.kernel``)."""


@dataclass(frozen=True, slots=True)
class GTAMethod:
    """One member of the generalized task arithmetic family (mergekit's ``GeneralizedTaskArithmeticMerge``), as
    the kernels read it: a plain-string view of :data:`dfsmerge.merge.GTA_VARIANTS`.

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


def _gta_methods() -> dict[str, GTAMethod]:
    return {
        v.name: GTAMethod(
            v.name,
            None if v.sparsification is None else v.sparsification.value,
            None if v.consensus is None else v.consensus.value,
            v.default_normalize,
            v.default_rescale,
        )
        for v in GTA_VARIANTS.values()
    }


GTA_METHODS: dict[str, GTAMethod] = _gta_methods()


@dataclass(frozen=True, slots=True)
class ResolvedParams:
    """Parameters of one merge call, resolved to plain Python values by the merge registry.

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


def _per_input_mappings(
    method: str, params: Any, n_inputs: int, base_index: int | None, global_names: set[str]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The kernels' accepted parameter shapes as the registry's: one mapping per input, plus the global
    parameters that were given among them. ``params`` is a mapping ``name -> scalar | sequence`` (a sequence
    aligned with the inputs, or with the non-base inputs when ``base_index`` is given) or a sequence of mappings
    aligned with the inputs."""
    if params is None:
        params = {}
    moved: dict[str, Any] = {}
    if isinstance(params, Mapping):
        out: list[dict[str, Any]] = [{} for _ in range(n_inputs)]
        for name, value in params.items():
            if name in global_names:
                moved[name] = value
                continue
            if isinstance(value, Sequence) and not isinstance(value, str):
                if base_index is not None and len(value) == n_inputs - 1:
                    value = [*value[:base_index], None, *value[base_index:]]
                if len(value) != n_inputs:
                    raise MergeError(
                        f"{method}: params[{name!r}] has {len(value)} values but there are {n_inputs} input tensors; "
                        f"give one value per input tensor (the base's value is ignored) or a single scalar"
                    )
                values = list(value)
            else:
                values = [value] * n_inputs
            for entry, v in zip(out, values, strict=True):
                if v is not None:
                    entry[name] = v
        return out, moved
    if isinstance(params, Sequence) and not isinstance(params, str):
        if len(params) != n_inputs:
            raise MergeError(
                f"{method}: params has {len(params)} entries but there are {n_inputs} input tensors; "
                f"give one mapping per input tensor"
            )
        out = []
        for entry in params:
            entry = dict(entry or {})
            moved.update({k: entry.pop(k) for k in list(entry) if k in global_names})
            out.append(entry)
        return out, moved
    raise MergeError(
        f"{method}: params={params!r} is neither a mapping nor a sequence of mappings; "
        f"use {{'weight': [...], 'density': [...]}} or [{{'weight': 1.0}}, ...]"
    )


def resolve_params(
    method: str,
    n_inputs: int,
    base_index: int | None,
    params: Any,
    global_params: Mapping[str, Any] | None,
) -> ResolvedParams:
    """Resolve per-input and shared parameters with the merge registry (:func:`dfsmerge.merge.resolve_params`:
    the same names, defaults, ranges and input contract as the merge library) into the kernels' plain values.

    Args:
        method: a registered method whose ``kernel`` is declared (``METHOD_NAMES``).
        n_inputs: number of input tensors, base included.
        base_index: index of the base among the inputs (required except for ``linear``).
        params: per-input parameters: a mapping ``name -> scalar | sequence aligned with the inputs`` or a
            sequence (aligned with the inputs) of mappings. Per-input values may also be given in
            ``global_params``, broadcast to every input.
        global_params: shared parameters (``normalize``, ``rescale``, ``lambda``, ``t``, ``int8_mask``).

    Returns:
        The resolved values.

    Raises:
        MergeError: unknown method or parameter, missing or out-of-range value, wrong number of values or
            inputs, bad base index.
    """
    m = get_method(method)
    if m.kernel is None:
        raise MergeError(f"merge_method={method!r} has no fused kernel; use one of {list(METHOD_NAMES)}")
    if m.base != "none" and (base_index is None or not 0 <= base_index < n_inputs):
        raise MergeError(
            f"{method}: base_index={base_index!r} is not an index into the {n_inputs} input tensors; "
            f"pass the position of the base model's tensor"
        )
    per_input, moved = _per_input_mappings(method, params, n_inputs, base_index, {p.name for p in m.global_params()})
    # One parameter set may serve every kernel method (as before the registry resolved them): names that only
    # other kernel methods declare are dropped; names no kernel method declares stay, and the registry rejects them.
    declared = {p.name for p in m.params}
    others = {p.name for n in METHOD_NAMES for p in get_method(n).params} - declared
    per_input = [{k: v for k, v in entry.items() if k not in others} for entry in per_input]
    shared = {k: v for k, v in {**moved, **(global_params or {})}.items() if k not in others}
    base_index, per, g = registry_resolve(m, n_inputs, base_index=base_index, params=per_input,
                                          global_params=shared, name="")
    if m.kernel == "slerp":
        return ResolvedParams((), (), (), (), False, False, 1.0, float(g["t"]))
    if m.kernel == "linear":
        weights = per["weight"]
        if g["normalize"] and sum(weights) == 0:
            raise MergeError(
                f"linear: weights {list(weights)} sum to 0 with normalize=true (division by zero); "
                f"change the weights or set normalize: false"
            )
        return ResolvedParams(tuple(weights), (), (), (), g["normalize"], False, 1.0, None)
    keep = [i for i in range(n_inputs) if i != base_index]

    def values(name: str, default: float) -> tuple[float, ...]:  # gamma / epsilon only where declared
        return tuple(per[name][i] for i in keep) if name in per else (default,) * len(keep)

    return ResolvedParams(
        weights=values("weight", 1.0),
        densities=values("density", 1.0),
        gammas=values("gamma", 0.01),
        epsilons=values("epsilon", 0.15),
        normalize=g["normalize"],
        rescale=g["rescale"],
        lam=g["lambda"],
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
