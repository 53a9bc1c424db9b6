"""Genomes: the parameter-space (PS) part, the data-flow-space (DFS) part and :class:`GenomeSpace` joining them.

PS genome (as mergekit-evolve's ``ModelGenome``, extended): genes per (layer group, model, filter set, parameter),
``weight`` plus ``density`` for sparsifying methods, or one ``t`` per (layer group, filter set) for slerp. It
decodes to a :class:`PSRecipe`, which is also a valid mergekit YAML (``slices`` per layer group, or ``models`` with
per-layer gradients when ``smooth``). DFS genome: :class:`dfsmerge.dfs.genome.DFSGenome` (Sakana AI, arXiv
2403.13187, sec. 3.2). Combined genome vector: ``x = [PS genes | I | W genes | embedding genes]``.

Modes: ``ps`` (PS only), ``dfs`` (DFS only), ``joint`` (one vector, both parts; the PS-merged model is model A of
the DFS pool) and ``staged`` (stage 1 searches PS; stage 2 searches DFS with the stage-1 recipe fixed as model A,
as the paper).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from dfsmerge.dfs.genome import DFSGenome, Infeasible
from dfsmerge.dfs.plan import FrozenDict, PathPlan
from dfsmerge.errors import ConfigError

Mode = Literal["ps", "dfs", "staged", "joint"]
MODES: tuple[str, ...] = ("ps", "dfs", "staged", "joint")
MERGED = "merged"
"""Pool name of the PS-merged model when it is model A of the DFS pool (joint/staged modes)."""

# Genes per merge method (mergekit-evolve's METHOD_PARAM_MAPS, extended to the other sparsifying methods).
METHOD_GENES: dict[str, tuple[str, ...]] = {
    "linear": ("weight",),
    "task_arithmetic": ("weight",),
    "ties": ("weight", "density"),
    "dare_ties": ("weight", "density"),
    "dare_linear": ("weight", "density"),
    "breadcrumbs": ("weight", "density"),
    "breadcrumbs_ties": ("weight", "density"),
    "della": ("weight", "density"),
    "della_linear": ("weight", "density"),
    "slerp": ("t",),
}
_BASE_REQUIRED = {"task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
                  "della_linear", "slerp"}
_ROUND = 9


# ====================================================================== PS
@dataclass(frozen=True)
class PSGenome:
    """Definition of the PS genome (fields as mergekit-evolve's ``ModelGenomeDefinition``).

    Args:
        models: model name -> path/hub id of the models whose parameters get genes.
        merge_method: a key of :data:`METHOD_GENES`.
        num_layers: decoder layers of the (common) architecture.
        base_model: name of the base model (a key of ``models`` or of ``extra_models``); required by
            task-arithmetic-style methods and slerp (whose ``t`` moves away from it).
        extra_models: name -> path of models used without genes (a base model outside ``models``).
        layer_granularity: layers per group (0: one group for the whole model); must divide ``num_layers``.
        filters: tensor-name substrings (``self_attn``, ``mlp``) with their own genes, plus one set for the rest.
        normalize: normalize weights (default as mergekit-evolve: True for linear, ties, dare_ties).
        allow_negative_weights: keep the sign of weight/t genes (else their absolute value).
        smooth: interpolate parameters across layers (mergekit gradients) instead of constant per group.
        dtype: the recipe's ``dtype``.
        initial_weight: where every weight gene starts (None: mergekit-evolve's 1 / number of models; 1.0 starts
            task arithmetic at unit weights).
    """

    models: Mapping[str, str]
    merge_method: str
    num_layers: int
    base_model: str | None = None
    extra_models: Mapping[str, str] = field(default_factory=dict)
    layer_granularity: int = 0
    filters: Sequence[str] = ()
    normalize: bool | None = None
    allow_negative_weights: bool = False
    smooth: bool = False
    dtype: str = "float32"
    initial_weight: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", FrozenDict(self.models))
        object.__setattr__(self, "extra_models", FrozenDict(self.extra_models))
        object.__setattr__(self, "filters", tuple(self.filters))
        m = self.merge_method
        if m not in METHOD_GENES:
            raise ConfigError(f"genome.merge_method={m!r} has no genome; use one of {', '.join(METHOD_GENES)}")
        if not self.models:
            raise ConfigError("genome.models is empty; list the models to merge")
        if self.layer_granularity < 0 or (self.layer_granularity > 0 and self.num_layers % self.layer_granularity):
            divisors = [d for d in range(1, self.num_layers + 1) if self.num_layers % d == 0]
            raise ConfigError(f"genome.layer_granularity={self.layer_granularity} does not divide num_hidden_layers="
                              f"{self.num_layers}; use 0 (one group) or one of {divisors}")
        known = set(self.models) | set(self.extra_models)
        if self.base_model is not None and self.base_model not in known:
            raise ConfigError(f"genome.base_model={self.base_model!r} is not a model; use one of {sorted(known)} "
                              "or add it to extra_models")
        if m in _BASE_REQUIRED and self.base_model is None:
            raise ConfigError(f"genome.merge_method={m!r} needs base_model; set it to one of {sorted(known)}")
        if self.initial_weight is not None:
            lo = -1.0 if self.allow_negative_weights else 0.0
            if "weight" not in METHOD_GENES[m]:
                raise ConfigError(f"genome.initial_weight is set but merge_method={m!r} has no weight genes; remove it")
            if not lo <= self.initial_weight <= 1.0:
                raise ConfigError(f"genome.initial_weight={self.initial_weight} lies outside the weight genes' bounds "
                                  f"[{lo}, 1.0]; choose a value inside them")
        if m == "slerp":
            if self.smooth or self.filters:
                raise ConfigError("genome: smooth and filters are not supported with merge_method=slerp "
                                  "(as mergekit-evolve); use linear or task_arithmetic for them")
            if len(self.inputs) != 2:
                raise ConfigError(f"genome: slerp merges exactly 2 models; got {list(self.inputs)}")

    @property
    def inputs(self) -> tuple[str, ...]:
        """Input models in merge order: the gene models, then a base model without genes."""
        extra = (self.base_model,) if self.base_model is not None and self.base_model not in self.models else ()
        return tuple(self.models) + extra

    @property
    def n_groups(self) -> int:
        return self.num_layers // self.layer_granularity if self.layer_granularity > 0 else 1

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(layer groups, models, filter sets, parameters); slerp has one 'model' axis entry (t per group)."""
        n_models = 1 if self.merge_method == "slerp" else len(self.models)
        return self.n_groups, n_models, len(self.filters) + 1, len(METHOD_GENES[self.merge_method])

    @property
    def dim(self) -> int:
        return int(np.prod(self.shape))

    @property
    def genes(self) -> tuple[str, ...]:
        return METHOD_GENES[self.merge_method]

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lo = np.zeros(self.shape)
        hi = np.ones(self.shape)
        if self.allow_negative_weights:
            for k, g in enumerate(self.genes):
                if g in ("weight", "t"):
                    lo[..., k] = -1.0
        return lo.reshape(-1), hi.reshape(-1)

    def initial(self) -> np.ndarray:
        """mergekit-evolve's start: weight 1/n_models (or ``initial_weight``), density 1, t 0.5."""
        x = np.ones(self.shape)
        for k, g in enumerate(self.genes):
            if g == "weight":
                x[..., k] = 1.0 / len(self.models) if self.initial_weight is None else self.initial_weight
            elif g == "t":
                x[..., k] = 0.5
        return x.reshape(-1)

    def decode(self, x: Sequence[float] | np.ndarray) -> PSRecipe:
        """Genome vector -> :class:`PSRecipe` (density clamped to [0, 1]; weights/t made non-negative unless allowed).

        Raises:
            ConfigError: wrong vector length.
        """
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.shape[0] != self.dim:
            raise ConfigError(f"PS genome vector has length {x.shape[0]}; this genome needs dim={self.dim}")
        v = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0).reshape(self.shape).copy()
        for k, g in enumerate(self.genes):
            if g == "density":
                v[..., k] = np.clip(np.abs(v[..., k]), 0.0, 1.0)
            elif g == "t":
                v[..., k] = np.clip(v[..., k] if self.allow_negative_weights else np.abs(v[..., k]), -1.0, 1.0)
            elif not self.allow_negative_weights:
                v[..., k] = np.abs(v[..., k])
        return PSRecipe(self, tuple(round(float(a), _ROUND) + 0.0 for a in v.reshape(-1)))

    def encode(self, recipe: PSRecipe) -> np.ndarray:
        """The genome vector of a recipe decoded from this genome.

        Raises:
            ConfigError: the recipe belongs to a different PS genome.
        """
        if recipe.genome != self:
            raise ConfigError("PS recipe was decoded from a different genome definition; encode it with that one")
        return np.asarray(recipe.values, dtype=np.float64)


@dataclass(frozen=True)
class PSRecipe:
    """A decoded PS candidate: the genome definition and its (post-processed) gene values.

    :meth:`to_mergekit` gives the equivalent mergekit YAML dict; :meth:`tensor_params` resolves the parameters
    of one tensor exactly as mergekit 0.1.5 reads that dict (pre-layer tensors use the first slice at t=0,
    post-layer tensors the last slice at t=0; in a slice, parameter gradients are interpolated at
    ``t = i / (n - 1)``; the first filter contained in the tensor name wins, the unfiltered set otherwise).
    """

    genome: PSGenome
    values: tuple[float, ...]

    def array(self) -> np.ndarray:
        return np.asarray(self.values).reshape(self.genome.shape)

    @property
    def normalize(self) -> bool:
        g = self.genome
        return g.normalize if g.normalize is not None else g.merge_method in ("ties", "dare_ties", "linear")

    def _setting(self, arr: np.ndarray, group: int | slice, model: int, k: int) -> Any:
        """A parameter setting for (group(s), model, gene k): scalar / gradient list, with filters if any."""
        g = self.genome
        sets = []
        for s, f in enumerate((*g.filters, None)):
            vals = arr[group, model, s, k]
            value = [float(a) for a in vals] if isinstance(group, slice) else float(vals)
            if isinstance(value, list) and len(value) == 1:
                value = value[0]
            sets.append({"filter": f, "value": value})
        return sets if g.filters else sets[0]["value"]

    def to_mergekit(self) -> dict[str, Any]:
        """The recipe as a mergekit YAML dict (loadable by ``mergekit.config.MergeConfiguration``)."""
        g = self.genome
        arr = self.array()
        paths = {**g.extra_models, **g.models}
        base = {"base_model": paths[g.base_model]} if g.base_model is not None else {}
        params: dict[str, Any] = {}
        if self.genome.merge_method != "slerp" and _declares(g.merge_method, "normalize"):
            params["normalize"] = self.normalize
        out: dict[str, Any] = {"merge_method": g.merge_method, **base}
        step = g.layer_granularity or g.num_layers
        if g.merge_method == "slerp":
            slices = []
            for grp in range(g.n_groups):
                slices.append({"sources": [{"model": paths[m], "layer_range": [grp * step, (grp + 1) * step]}
                                           for m in g.inputs],
                               "parameters": {"t": self._setting(arr, grp, 0, 0)}})
            out["slices"] = slices
        elif g.smooth:
            models = []
            for i, m in enumerate(g.models):
                # no layer_range here: mergekit ignores it in `models` (mergekit-evolve writes it) and dfsmerge's
                # config rejects it as unknown
                models.append({"model": paths[m], "parameters": {p: self._setting(arr, slice(None), i, k)
                                                                 for k, p in enumerate(g.genes)}})
            if g.base_model is not None and g.base_model not in g.models:
                models.append({"model": paths[g.base_model]})
            out["models"] = models
        else:
            slices = []
            for grp in range(g.n_groups):
                sources = []
                for i, m in enumerate(g.models):
                    sources.append({"model": paths[m], "layer_range": [grp * step, (grp + 1) * step],
                                    "parameters": {p: self._setting(arr, grp, i, k) for k, p in
                                                   enumerate(g.genes)}})
                if g.base_model is not None and g.base_model not in g.models:
                    sources.append({"model": paths[g.base_model], "layer_range": [grp * step, (grp + 1) * step]})
                slices.append({"sources": sources})
            out["slices"] = slices
        if params:
            out["parameters"] = params
        out["dtype"] = g.dtype
        return out

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_mergekit(), sort_keys=False)

    def tensor_params(self, tensor_name: str, layer: int | None, *, post: bool = False
                      ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per-input and global merge parameters of one tensor (inputs in :attr:`PSGenome.inputs` order).

        Args:
            tensor_name: the tensor's name (filters match substrings of it).
            layer: its decoder layer, or None for pre/post-layer tensors (``post`` tells which).
        """
        g = self.genome
        arr = self.array()
        step = g.layer_granularity or g.num_layers
        if layer is None:
            group, t = (g.n_groups - 1 if post and not g.smooth else 0), 0.0
        elif g.smooth:
            group, t = 0, (layer / (g.num_layers - 1) if g.num_layers > 1 else 1.0)
        else:
            group = layer // step
            t = (layer - group * step) / (step - 1) if step > 1 else 1.0
        fset = next((i for i, f in enumerate(g.filters) if f in tensor_name), len(g.filters))
        glob: dict[str, Any] = {}
        if g.merge_method != "slerp" and _declares(g.merge_method, "normalize"):
            glob["normalize"] = self.normalize
        if g.merge_method == "slerp":
            glob["t"] = float(arr[group, 0, fset, 0])
            return [{} for _ in g.inputs], glob
        per_input: list[dict[str, Any]] = []
        for i in range(len(g.models)):
            p = {}
            for k, name in enumerate(g.genes):
                if g.smooth:
                    p[name] = _interp([float(a) for a in arr[:, i, fset, k]], t)
                else:
                    p[name] = float(arr[group, i, fset, k])
            per_input.append(p)
        if len(g.inputs) > len(g.models):
            per_input.append({})
        return per_input, glob


def _interp(values: list[float], t: float) -> float:
    """mergekit's gradient: linear interpolation over evenly spaced anchors at ``t`` in [0, 1]."""
    if len(values) == 1:
        return values[0]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def _declares(method: str, param: str) -> bool:
    from dfsmerge.merge import get_method

    return any(p.name == param for p in get_method(method).params)


# ====================================================================== Candidate
@dataclass(frozen=True)
class Candidate:
    """A decoded genome: the PS recipe (or None) and the layer path (or None, or :class:`Infeasible`)."""

    ps: PSRecipe | None = None
    path: PathPlan | Infeasible | None = None

    @property
    def feasible(self) -> bool:
        return not isinstance(self.path, Infeasible)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.ps is not None:
            out["ps"] = self.ps.to_mergekit()
        if isinstance(self.path, Infeasible):
            out["infeasible"] = self.path.reason
        elif self.path is not None:
            out["path"] = self.path.to_dict()
        return out

    def key(self) -> str:
        """A stable hash of the candidate (same recipe and path -> same key, across processes)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:32]


# ====================================================================== GenomeSpace
@dataclass(frozen=True)
class GenomeSpace:
    """The search space of one run: PS genes, DFS genes or both.

    Args:
        mode: ``ps``, ``dfs``, ``joint`` or ``staged``.
        ps: the PS genome (modes ps, joint, staged).
        dfs: the DFS genome (modes dfs, joint, staged); in joint/staged mode its first pool model must be
            :data:`MERGED` (the PS-merged model is model A).
        stage: staged mode only: 1 searches the PS part, 2 the DFS part with ``fixed_ps`` as model A.
        fixed_ps: the stage-1 result used in stage 2.
    """

    mode: Mode
    ps: PSGenome | None = None
    dfs: DFSGenome | None = None
    stage: int = 1
    fixed_ps: PSRecipe | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} is not known; use one of {', '.join(MODES)}")
        need_ps = self.mode in ("ps", "joint", "staged")
        need_dfs = self.mode in ("dfs", "joint", "staged")
        if need_ps and self.ps is None:
            raise ConfigError(f"mode={self.mode!r} needs a PS genome (genome.ps)")
        if need_dfs and self.dfs is None:
            raise ConfigError(f"mode={self.mode!r} needs a DFS genome (genome.dfs)")
        if self.mode in ("joint", "staged") and self.dfs.model_a != MERGED:
            raise ConfigError(f"mode={self.mode!r}: the DFS pool's model A must be the PS-merged model named "
                              f"{MERGED!r}; got {self.dfs.model_a!r}")
        if self.mode == "staged":
            if self.stage not in (1, 2):
                raise ConfigError(f"stage={self.stage} must be 1 (PS) or 2 (DFS)")
            if self.stage == 2 and self.fixed_ps is None:
                raise ConfigError("staged mode, stage 2 needs fixed_ps (the best recipe of stage 1)")

    def with_stage(self, stage: int, fixed_ps: PSRecipe | None = None) -> GenomeSpace:
        """The staged space at ``stage`` (2 needs the stage-1 best recipe)."""
        return replace(self, stage=stage, fixed_ps=fixed_ps)

    @property
    def parts(self) -> tuple[PSGenome | None, DFSGenome | None]:
        """The (PS, DFS) genomes this space's vector holds, in vector order (None where absent)."""
        return self._parts

    @property
    def _parts(self) -> tuple[PSGenome | None, DFSGenome | None]:
        if self.mode == "ps" or (self.mode == "staged" and self.stage == 1):
            return self.ps, None
        if self.mode == "dfs" or (self.mode == "staged" and self.stage == 2):
            return None, self.dfs
        return self.ps, self.dfs

    @property
    def dim(self) -> int:
        ps, dfs = self._parts
        return (ps.dim if ps else 0) + (dfs.dim if dfs else 0)

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        ps, dfs = self._parts
        los, his = [], []
        for part in (ps, dfs):
            if part is not None:
                lo, hi = part.bounds
                los.append(lo)
                his.append(hi)
        return np.concatenate(los), np.concatenate(his)

    def initial(self) -> np.ndarray:
        ps, dfs = self._parts
        return np.concatenate([p.initial() for p in (ps, dfs) if p is not None])

    def decode(self, x: Sequence[float] | np.ndarray) -> Candidate:
        """Genome vector -> :class:`Candidate` (an infeasible path is returned as :class:`Infeasible`).

        Raises:
            ConfigError: wrong vector length.
        """
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.shape[0] != self.dim:
            raise ConfigError(f"genome vector has length {x.shape[0]}; this {self.mode} space needs dim={self.dim}")
        ps, dfs = self._parts
        n = ps.dim if ps else 0
        recipe = ps.decode(x[:n]) if ps else self.fixed_ps
        path = dfs.decode(x[n:]) if dfs else None
        return Candidate(recipe, path)

    def encode(self, candidate: Candidate) -> np.ndarray:
        """Candidate -> genome vector with ``decode(encode(c)) == c``.

        Raises:
            ConfigError: the candidate does not belong to this space (missing part, infeasible path, a path the
                DFS genome cannot express, or a PS recipe other than the fixed one in stage 2).
        """
        ps, dfs = self._parts
        parts = []
        if ps is not None:
            if candidate.ps is None:
                raise ConfigError(f"candidate has no PS recipe; the {self.mode} space needs one")
            parts.append(ps.encode(candidate.ps))
        elif self.fixed_ps is not None and candidate.ps != self.fixed_ps:
            raise ConfigError("candidate's PS recipe differs from the stage-1 recipe fixed in this space")
        if dfs is not None:
            if candidate.path is None or isinstance(candidate.path, Infeasible):
                raise ConfigError(f"candidate has no feasible path ({candidate.path}); cannot encode it")
            parts.append(dfs.encode(candidate.path))
        return np.concatenate(parts) if parts else np.zeros(0)
