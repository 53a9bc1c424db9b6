"""Registry of merge methods and the validated entry point :func:`merge_tensor`.

A :class:`MergeMethod` declares its parameters (:class:`ParamSpec`), whether it takes a base model, how
many inputs it accepts and whether it is random; its ``fn`` is a pure function over already validated,
dtype-aligned tensors. Parameter names, defaults and input contracts follow mergekit 0.1.5 so mergekit
YAML recipes mean the same thing here.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from dfsmerge.errors import MergeError

__all__ = [
    "REQUIRED",
    "Gene",
    "MergeMethod",
    "ParamSpec",
    "get_method",
    "make_generator",
    "merge_tensor",
    "register",
    "registered_methods",
    "resolve_params",
    "tensor_seed",
]


class _Required:
    __slots__ = ()

    def __repr__(self) -> str:
        return "REQUIRED"

    def __reduce__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Default of a parameter that has none: the user must give it."""


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """A declared merge parameter.

    Attributes:
        name: the mergekit name (``weight``, ``density``, ``t``, ``lambda``, ...).
        default: value used when not given, or :data:`REQUIRED`. A default of None means None is allowed.
        per_model: one value per input model (``weight``) rather than one per tensor (``normalize``).
        kind: ``float``, ``int`` or ``bool``; values are coerced to it.
        non_base: a per-model parameter that the base model does not take (GTA's ``weight``/``density``).
        doc: one line for ``dfsmerge`` help texts and errors.
        ge, gt, le, lt: bounds of the valid range (None: unbounded on that side); a value outside is an error.
    """

    name: str
    default: Any
    per_model: bool
    kind: type
    non_base: bool = False
    doc: str = ""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def range_text(self) -> str:
        """The valid range in words (``in [0, 1]``, ``>= 0``, ``> 0``), or ``""`` when unbounded."""
        lo, lo_open = (self.gt, True) if self.gt is not None else (self.ge, False)
        hi, hi_open = (self.lt, True) if self.lt is not None else (self.le, False)
        if lo is not None and hi is not None:
            return f"in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
        if lo is not None:
            return f"{'>' if lo_open else '>='} {_num(lo)}"
        if hi is not None:
            return f"{'<' if hi_open else '<='} {_num(hi)}"
        return ""

    def in_range(self, value: float) -> bool:
        """True when ``value`` lies in the declared range."""
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )

    def coerce(self, value: Any, *, method: str, where: str = "") -> Any:
        """``value`` converted to :attr:`kind` and checked against the range.

        Args:
            value: a YAML / Python scalar.
            method: method name, for the message.
            where: where the value came from (`` for model #1 of tensor 'x'``), for the message.

        Raises:
            MergeError: not convertible, not finite or out of range; the message names the value and the fix.
        """
        if value is None and self.default is None:
            return None
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, int | float) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                return value.strip().lower() in _TRUE
            raise MergeError(f"{method}: {self.name}={value!r}{where} is not a boolean; use true or false")
        if self.kind not in (float, int):
            return value
        if isinstance(value, bool):
            raise MergeError(f"{method}: {self.name}={value!r}{where} is a boolean; give a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise MergeError(f"{method}: {self.name}={value!r}{where} is not a number; give a number") from None
        if not math.isfinite(number):
            raise MergeError(f"{method}: {self.name}={value!r}{where} is not finite; give a finite number")
        if self.kind is int:
            if not number.is_integer():
                raise MergeError(f"{method}: {self.name}={value!r}{where} is not an integer; give a whole number")
            number = int(number)
        if not self.in_range(number):
            rng = self.range_text()
            raise MergeError(
                f"{method}: {self.name}={value!r}{where} is outside the valid range ({rng.removeprefix('in ')}); "
                f"use a value {rng}" + (f" ({self.doc})" if self.doc else "")
            )
        return number


@dataclass(frozen=True, slots=True)
class Gene:
    """A parameter a PS genome searches (docs/design.md section 3): its bounds and start in the genome vector.

    Attributes:
        name: a declared parameter of the method. Per-model parameters get one gene per (layer group, model,
            filter set); global ones one per (layer group, filter set).
        low, high: the gene's bounds.
        initial: start value; None means ``1 / number of models`` (mergekit-evolve's weights).
        signed: with ``allow_negative_weights`` the lower bound becomes ``-high`` and the sign is kept (else
            decoding takes the absolute value).
        clip: decoding clips the value into the bounds (weights are only made non-negative, as mergekit-evolve).
    """

    name: str
    low: float
    high: float
    initial: float | None
    signed: bool = False
    clip: bool = True


# The kernel signature: fn(tensors, *, base_index, per_model, params, generator) -> Tensor, where
# tensors share shape, device and a float32/float64 dtype; per_model[name] is a tuple aligned with tensors
# (None for the base of a non_base parameter); params holds the global parameters.
KernelFn = Callable[..., torch.Tensor]


@dataclass(frozen=True, slots=True)
class MergeMethod:
    """A merge method: declared parameters, input contract and a pure tensor function.

    Attributes:
        name: registry name (``merge_method:`` in YAML).
        params: declared parameters.
        base: ``required``, ``optional`` or ``none`` (a given base is ignored, as mergekit's linear).
        random: draws random numbers (takes a seed).
        fn: kernel, see ``KernelFn`` above; call :func:`merge_tensor` rather than this directly.
        min_inputs, max_inputs: bounds on the number of inputs, base included (None = unbounded).
        min_non_base, max_non_base: bounds on the inputs other than the base.
        reference: paper or URL.
        genes: what a PS genome searches (:class:`Gene`); empty: the method is not a genome method.
        kernel: name of the fused kernel that implements the method (a key of ``dfsmerge.kernels.KERNELS``),
            or None. The kernel takes the parameters :func:`resolve_params` resolved.
        chunking: how a large tensor is merged in row chunks, bit-identical to the whole-tensor merge: a factory
            ``(method, base_index, per_model, params, numel) -> ChunkedMerge | None`` (see
            :mod:`dfsmerge.merge.chunked`; None from it: these parameters need the whole tensor), or None: the
            method always merges whole tensors.
    """

    name: str
    params: tuple[ParamSpec, ...]
    base: Literal["required", "optional", "none"]
    random: bool
    fn: KernelFn
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int = 0
    max_non_base: int | None = None
    reference: str = ""
    genes: tuple[Gene, ...] = ()
    kernel: str | None = None
    chunking: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        declared = {p.name: p for p in self.params}
        for gene in self.genes:
            if gene.name not in declared:
                raise ValueError(f"merge method {self.name}: gene {gene.name!r} is not a declared parameter")
        if len({declared[g.name].per_model for g in self.genes}) > 1:
            raise ValueError(f"merge method {self.name}: genes mix per-model and global parameters")

    @property
    def global_genes(self) -> bool:
        """True when the method's genes are global parameters (one per layer group and filter set, no model axis)."""
        return bool(self.genes) and not self.param(self.genes[0].name).per_model

    def count_problem(self, n: int, *, has_base: bool) -> str | None:
        """What is wrong with merging ``n`` inputs (base included when ``has_base``), e.g. ``"slerp needs exactly
        2 model(s) (base included)"``, or None when the count is valid."""
        for what, count, lo, hi in (
            ("model(s)" + (" (base included)" if has_base else ""), n, self.min_inputs, self.max_inputs),
            ("model(s) besides the base", n - has_base, self.min_non_base, self.max_non_base),
        ):
            if count >= lo and (hi is None or count <= hi):
                continue
            if hi is None:
                need = f"at least {lo}"
            elif lo == hi:
                need = f"exactly {lo}"
            elif lo <= 1:
                need = f"at most {hi}"
            else:
                need = f"{lo} to {hi}"
            return f"{self.name} needs {need} {what}"
        return None

    def per_model_params(self) -> tuple[ParamSpec, ...]:
        """Parameters given once per input model."""
        return tuple(p for p in self.params if p.per_model)

    def global_params(self) -> tuple[ParamSpec, ...]:
        """Parameters given once per tensor."""
        return tuple(p for p in self.params if not p.per_model)

    def param(self, name: str) -> ParamSpec:
        """The declared parameter ``name``.

        Raises:
            MergeError: no such parameter.
        """
        for p in self.params:
            if p.name == name:
                return p
        raise MergeError(
            f"merge_method {self.name} has no parameter {name!r}; its parameters are: "
            f"{', '.join(p.name for p in self.params) or '(none)'}"
        )


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add a method to the registry (a duplicate name is a programming error)."""
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def registered_methods() -> tuple[str, ...]:
    """Names of the registered merge methods, sorted."""
    return tuple(sorted(_REGISTRY))


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``.

    Raises:
        MergeError: unknown name (the message lists the registered ones).
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise MergeError(f"merge_method={name!r} is unknown; use one of: {', '.join(registered_methods())}") from None


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one tensor from the run seed and the tensor name (BLAKE2b; stable across runs,
    processes and tensor order, unlike Python's salted ``hash``)."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def make_generator(seed: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`tensor_seed` ``(seed, name)``."""
    return torch.Generator(device=device).manual_seed(tensor_seed(seed, name))


def _resolve(
    m: MergeMethod,
    n: int,
    base_index: int | None,
    params: Sequence[Mapping[str, Any]],
    global_params: Mapping[str, Any],
    label: str,
) -> tuple[dict[str, tuple[Any, ...]], dict[str, Any]]:
    per_names = {p.name for p in m.per_model_params()}
    global_names = {p.name for p in m.global_params()}
    for key in global_params:
        if key not in per_names | global_names:
            raise MergeError(
                f"{m.name}: unknown parameter {key!r} for {label}; {m.name} takes: "
                f"{', '.join(p.name for p in m.params) or '(no parameters)'}"
            )
    for i, mapping in enumerate(params):
        for key in mapping:
            if key in global_names:
                raise MergeError(
                    f"{m.name}: {key!r} is a global parameter but was given for model #{i} of {label}; "
                    "set it under the top-level parameters"
                )
            if key not in per_names:
                raise MergeError(
                    f"{m.name}: unknown parameter {key!r} for model #{i} of {label}; per-model parameters "
                    f"of {m.name} are: {', '.join(sorted(per_names)) or '(none)'}"
                )
    resolved_global: dict[str, Any] = {}
    # As mergekit's resolver, a value of None means "not set here" (unless None is the default).
    for spec in m.global_params():
        if global_params.get(spec.name) is not None:
            resolved_global[spec.name] = spec.coerce(global_params[spec.name], method=m.name, where=f" for {label}")
        elif spec.required:
            raise MergeError(
                f"{m.name}: missing required parameter {spec.name!r} for {label}; set parameters: "
                f"{{{spec.name}: ...}}" + (f" ({spec.doc})" if spec.doc else "")
            )
        else:
            resolved_global[spec.name] = spec.default
    resolved_per: dict[str, tuple[Any, ...]] = {}
    for spec in m.per_model_params():
        values = []
        for i in range(n):
            if spec.non_base and i == base_index:
                values.append(None)
                continue
            where = f" for model #{i} of {label}"
            if params[i].get(spec.name) is not None:
                values.append(spec.coerce(params[i][spec.name], method=m.name, where=where))
            elif global_params.get(spec.name) is not None:
                values.append(spec.coerce(global_params[spec.name], method=m.name, where=where))
            elif spec.required:
                raise MergeError(
                    f"{m.name}: missing required parameter {spec.name!r}{where}; give it in that model's "
                    f"parameters (e.g. {spec.name}: 1.0)"
                )
            else:
                values.append(spec.default)
        resolved_per[spec.name] = tuple(values)
    return resolved_per, resolved_global


def _check_counts(m: MergeMethod, n: int, base_index: int | None, label: str) -> None:
    problem = m.count_problem(n, has_base=base_index is not None)
    if problem:
        need = problem.removeprefix(f"{m.name} ")
        hint = " (stack models with slices of one model each)" if m.max_inputs == 1 else ""
        raise MergeError(f"{problem} but got {n} input(s) for {label}; give {need.removeprefix('needs ')}{hint}")


def resolve_params(
    method: str | MergeMethod,
    n: int,
    *,
    base_index: int | None,
    params: Sequence[Mapping[str, Any] | None],
    global_params: Mapping[str, Any] | None,
    name: str = "",
) -> tuple[int | None, dict[str, tuple[Any, ...]], dict[str, Any]]:
    """Check the input contract and resolve every parameter of one merge (the one resolver of the package: the
    merge library and the fused kernels both call it).

    Args:
        method: registry name or method.
        n: number of inputs, base included.
        base_index: index of the base among the inputs, or None (ignored by methods with ``base="none"``).
        params: one mapping (or None) per input with its per-model parameters.
        global_params: global parameters; a per-model parameter given here applies to every model without it.
        name: tensor name, for messages.

    Returns:
        ``(base_index, per_model, global)``: the effective base index (None for ``base="none"``), per-model
        values as tuples aligned with the inputs (None for the base of a ``non_base`` parameter) and global
        values, each coerced to its kind, range-checked and defaulted.

    Raises:
        MergeError: unknown or misplaced parameter, missing required one, bad or out-of-range value, wrong
            number of inputs, missing or out-of-range base.
    """
    m = get_method(method) if isinstance(method, str) else method
    label = f"tensor {name!r}" if name else "this tensor"
    if m.base == "none":
        base_index = None
    elif base_index is not None and not 0 <= base_index < n:
        raise MergeError(f"{m.name}: base_index={base_index} is out of range for {n} inputs of {label}")
    if m.base == "required" and base_index is None:
        raise MergeError(
            f"{m.name} requires a base model but none was given for {label}; set base_model: to one of the models"
        )
    _check_counts(m, n, base_index, label)
    if len(params) != n:
        raise MergeError(
            f"{m.name}: got {len(params)} per-model parameter sets for {n} inputs of {label}; give one per input"
        )
    params = [p or {} for p in params]  # None for a model without parameters
    per_model, glob = _resolve(m, n, base_index, params, global_params or {}, label)
    return base_index, per_model, glob


def merge_tensor(
    method: str | MergeMethod,
    tensors: Sequence[torch.Tensor],
    *,
    base_index: int | None,
    params: Sequence[Mapping[str, Any]],
    global_params: Mapping[str, Any],
    seed: int | None = None,
    name: str = "",
) -> torch.Tensor:
    """Validate inputs and parameters, then merge one tensor.

    Inputs are promoted to a common dtype (``torch.promote_types``), computed in float32 (float64 for
    float64 inputs) and returned in the promoted dtype, as mergekit 0.1.5. Non-floating inputs (buffers)
    are returned unchanged when all inputs agree. A per-model parameter given in ``global_params``
    applies to every model that does not set it.

    Args:
        method: registry name or method.
        tensors: the inputs in model order (same shape and device).
        base_index: index of the base model in ``tensors``, or None. Ignored by methods with ``base="none"``.
        params: one mapping per input with its per-model parameters (the base's non-base ones are ignored).
        global_params: global parameters (and per-model defaults).
        seed: seed of random methods; the generator is derived from ``(seed, name)``. None uses torch's
            global RNG (not reproducible).
        name: tensor name, for errors and the random stream.

    Returns:
        The merged tensor (shape of the inputs, promoted dtype).

    Raises:
        MergeError: unknown method or parameter, missing required parameter, bad value, wrong number of
            inputs, missing or out-of-range base, mismatched shapes/devices, differing non-float buffers,
            or a method-specific failure; the message names the value and the fix.
    """
    m = get_method(method) if isinstance(method, str) else method
    label = f"tensor {name!r}" if name else "this tensor"
    tensors = list(tensors)
    n = len(tensors)
    if n == 0:
        raise MergeError(f"{m.name}: no input tensors for {label}; give at least one model")
    for i, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            raise MergeError(f"{m.name}: input #{i} for {label} is {type(tensor).__name__}, not a torch.Tensor")
    base_index, per_model, glob = resolve_params(m, n, base_index=base_index, params=params,
                                                 global_params=global_params, name=name)

    shapes = [tuple(t.shape) for t in tensors]
    if any(s != shapes[0] for s in shapes):
        raise MergeError(
            f"{m.name}: shapes differ for {label}: {shapes}; merge only models of one architecture and size "
            "(for vocabulary-indexed tensors such as embeddings, align vocabularies first, e.g. "
            "tokenizer_source, or dfsmerge.merge.truncate_vocabulary)"
        )
    if any(t.device != tensors[0].device for t in tensors):
        raise MergeError(
            f"{m.name}: inputs of {label} are on devices {[str(t.device) for t in tensors]}; move them to one"
        )
    if not all(t.is_floating_point() for t in tensors):
        first = tensors[0]
        if any(t.dtype != first.dtype or not torch.equal(t, first) for t in tensors[1:]):
            raise MergeError(
                f"{m.name}: non-floating {label} ({[str(t.dtype) for t in tensors]}) differs between "
                "models and cannot be merged; make the models agree on it"
            )
        return first.clone()

    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    work = torch.float64 if dtype == torch.float64 else torch.float32
    aligned = [t.to(work) for t in tensors]
    generator = None
    if m.random and seed is not None:
        generator = make_generator(seed, name, aligned[0].device)
    try:
        result = m.fn(aligned, base_index=base_index, per_model=per_model, params=glob, generator=generator)
    except MergeError as err:
        raise MergeError(f"{err} (tensor {name!r})" if name else str(err)) from None
    if result.shape != aligned[0].shape:  # a kernel bug, not user input
        raise RuntimeError(f"merge method {m.name} returned shape {tuple(result.shape)} for {shapes[0]}")
    return result.to(dtype)
