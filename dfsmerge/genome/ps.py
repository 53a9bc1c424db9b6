"""The parameter-space (PS) genome (as mergekit-evolve's ``ModelGenome``, extended) and its decoded
:class:`PSRecipe`.

Genes per (layer group, model, filter set, parameter), as the merge method's registry entry declares them
(``MergeMethod.genes``): ``weight`` plus ``density`` for sparsifying methods, or global genes (one per layer group and
filter set: slerp's ``t``, sce's ``select_topk``). A :class:`PSRecipe` is also a valid mergekit YAML (``slices`` per
layer group, or ``models`` with per-layer gradients when ``smooth``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml

from dfsmerge.errors import ConfigError
from dfsmerge.genome.plan import GENE_DECIMALS, FrozenDict


@functools.cache
def _method_genes() -> dict[str, tuple[str, ...]]:
    from dfsmerge.merge import get_method, registered_methods

    return {n: tuple(g.name for g in get_method(n).genes) for n in registered_methods() if get_method(n).genes}


def __getattr__(name: str) -> Any:
    # METHOD_GENES is read from the merge registry on first use (importing it needs torch)
    if name == "METHOD_GENES":
        return _method_genes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _merge_method(name: str) -> Any:
    from dfsmerge.merge import get_method  # the merge registry imports torch; the genome needs it only here

    return get_method(name)


def genome_method_error(name: str, field: str = "genome.merge_method") -> str | None:
    """Why ``name`` cannot be a PS genome's merge method (unknown, or no searchable parameters), or None."""
    genes = _method_genes()
    if name in genes:
        return None
    from dfsmerge.merge import registered_methods

    if name in registered_methods():
        return (f"{field}={name!r} has no searchable parameters (genes), so it has no genome; use one of "
                f"{', '.join(genes)}")
    return f"{field}={name!r} has no genome; use one of {', '.join(genes)}"


# ====================================================================== PS
@dataclass(frozen=True)
class PSGenome:
    """Definition of the PS genome (fields as mergekit-evolve's ``ModelGenomeDefinition``).

    Args:
        models: model name -> path/hub id of the models whose parameters get genes.
        merge_method: a merge method that declares genes (a key of ``METHOD_GENES``, from the merge registry).
        num_layers: decoder layers of the (common) architecture.
        base_model: name of the base model (a key of ``models`` or of ``extra_models``); required by the methods
            whose registry entry says so (task-arithmetic-style methods, slerp, sce, nearswap, ramplus_tl).
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
        problem = genome_method_error(m)
        if problem:
            raise ConfigError(problem)
        method = _merge_method(m)
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
        if method.base == "required" and self.base_model is None:
            raise ConfigError(f"genome.merge_method={m!r} needs base_model; set it to one of {sorted(known)}")
        if self.initial_weight is not None:
            lo = -1.0 if self.allow_negative_weights else 0.0
            if "weight" not in self.genes:
                raise ConfigError(f"genome.initial_weight is set but merge_method={m!r} has no weight genes; remove it")
            if not lo <= self.initial_weight <= 1.0:
                raise ConfigError(f"genome.initial_weight={self.initial_weight} lies outside the weight genes' bounds "
                                  f"[{lo}, 1.0]; choose a value inside them")
        if method.global_genes and (self.smooth or self.filters):
            raise ConfigError(f"genome: smooth and filters are not supported with merge_method={m} (its genes are "
                              "global, as slerp's in mergekit-evolve); use linear or task_arithmetic for them")
        base_in = self.base_model is not None and method.base != "none"
        problem = method.count_problem(len(self.inputs), has_base=base_in)
        if problem:
            raise ConfigError(f"genome: {m} {problem} but got {list(self.inputs)}; change genome.models")

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
        """(layer groups, models, filter sets, parameters); global genes (slerp's t) have one 'model' axis entry."""
        n_models = 1 if _merge_method(self.merge_method).global_genes else len(self.models)
        return self.n_groups, n_models, len(self.filters) + 1, len(self.genes)

    @property
    def dim(self) -> int:
        return int(np.prod(self.shape))

    @property
    def genes(self) -> tuple[str, ...]:
        return tuple(g.name for g in self._gene_specs())

    def _gene_specs(self) -> tuple[Any, ...]:
        return _merge_method(self.merge_method).genes

    def _gene_bounds(self, gene: Any) -> tuple[float, float]:
        low = -gene.high if gene.signed and self.allow_negative_weights else gene.low
        return low, gene.high

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Each gene's bounds, from the registry's :class:`~dfsmerge.merge.Gene` (signed genes reach ``-high``
        with ``allow_negative_weights``)."""
        lo = np.zeros(self.shape)
        hi = np.ones(self.shape)
        for k, gene in enumerate(self._gene_specs()):
            lo[..., k], hi[..., k] = self._gene_bounds(gene)
        return lo.reshape(-1), hi.reshape(-1)

    def initial(self) -> np.ndarray:
        """mergekit-evolve's start: weight 1/n_models (or ``initial_weight``), density 1, t 0.5; other genes at
        the registry's ``Gene.initial``."""
        x = np.ones(self.shape)
        for k, gene in enumerate(self._gene_specs()):
            if gene.name == "weight" and self.initial_weight is not None:
                x[..., k] = self.initial_weight
            else:
                x[..., k] = 1.0 / len(self.models) if gene.initial is None else gene.initial
        return x.reshape(-1)

    def decode(self, x: Sequence[float] | np.ndarray) -> PSRecipe:
        """Genome vector -> :class:`PSRecipe`: each gene made non-negative unless signed and allowed, then clipped to
        its bounds (weights are not clipped: as mergekit-evolve, only their sign is).

        Raises:
            ConfigError: wrong vector length.
        """
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.shape[0] != self.dim:
            raise ConfigError(f"PS genome vector has length {x.shape[0]}; this genome needs dim={self.dim}")
        v = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0).reshape(self.shape).copy()
        for k, gene in enumerate(self._gene_specs()):
            if not (gene.signed and self.allow_negative_weights):
                v[..., k] = np.abs(v[..., k])
            if gene.clip:
                v[..., k] = np.clip(v[..., k], *self._gene_bounds(gene))
        return PSRecipe(self, tuple(round(float(a), GENE_DECIMALS) + 0.0 for a in v.reshape(-1)))

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
    of one tensor from that dict with ``dfsmerge merge``'s own resolver, as mergekit 0.1.5 reads it (pre-layer
    tensors use the first slice at t=0, post-layer tensors the last slice at t=0; in a slice, parameter gradients
    are interpolated at ``t = i / (n - 1)``; the first filter contained in the tensor name wins, the unfiltered set
    otherwise).
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
        if _declares(g.merge_method, "normalize"):
            params["normalize"] = self.normalize
        out: dict[str, Any] = {"merge_method": g.merge_method, **base}
        step = g.layer_granularity or g.num_layers
        if _merge_method(g.merge_method).global_genes:
            slices = []
            for grp in range(g.n_groups):
                slices.append({"sources": [{"model": paths[m], "layer_range": [grp * step, (grp + 1) * step]}
                                           for m in g.inputs],
                               "parameters": {p: self._setting(arr, grp, 0, k) for k, p in enumerate(g.genes)}})
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
        return yaml.safe_dump(self.to_mergekit(), sort_keys=False)

    def tensor_params(self, tensor_name: str, layer: int | None, *, post: bool = False
                      ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per-input and global merge parameters of one tensor (inputs in :attr:`PSGenome.inputs` order), read from
        :meth:`to_mergekit`'s dict by the resolver ``dfsmerge merge`` plans with
        (:func:`dfsmerge.recipe.config.tensor_parameters`), so the search scores the model its recipe merges to.

        Args:
            tensor_name: the tensor's name (filters match substrings of it).
            layer: its decoder layer, or None for pre/post-layer tensors (``post`` tells which).

        Raises:
            ConfigError: ``layer`` lies outside the genome's layers.
        """
        from dfsmerge.recipe.config import tensor_parameters

        g = self.genome
        config, slices = _mergekit_config(self)
        if layer is None:  # mergekit: the first slice's parameters before the layers, the last's after, at t=0
            sl, t = (slices[-1] if post else slices[0]), 0.0
        else:
            sl, start, n = _slice_of(slices, layer)
            t = (layer - start) / (n - 1) if n > 1 else 1.0
        paths = {**g.extra_models, **g.models}
        base_index = g.inputs.index(g.base_model) if g.base_model is not None else None
        return tensor_parameters(_merge_method(g.merge_method), config, sl, [(paths[m], tensor_name) for m in g.inputs],
                                 out_name=tensor_name, t=t, base_index=base_index)


@functools.lru_cache(maxsize=8)
def _mergekit_config(recipe: PSRecipe) -> tuple[Any, list[Any]]:
    # parsed once per recipe: PS buffers ask for every tensor's parameters in turn
    from dfsmerge.recipe.config import load_merge_config

    config = load_merge_config(recipe.to_mergekit())
    return config, config.normalized_slices(lambda _: recipe.genome.num_layers)


def _slice_of(slices: Sequence[Any], layer: int) -> tuple[Any, int, int]:
    """The output slice holding decoder ``layer``, its first layer and its length."""
    start = 0
    for sl in slices:
        n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        if layer < start + n:
            return sl, start, n
        start += n
    raise ConfigError(f"layer {layer} is outside the PS recipe's {start} layers; use 0 to {start - 1}")


def _declares(method: str, param: str) -> bool:
    return any(p.name == param for p in _merge_method(method).params)
