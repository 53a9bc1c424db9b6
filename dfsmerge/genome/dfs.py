"""The data-flow-space genome of Sakana AI's evolutionary model merge (Akiba et al., arXiv 2403.13187, sec. 3.2).

The pool holds the M decoder layers of the DFS models in pool order (all of A, then all of B, ...). The path is
drawn from T = M·r slots, slot t standing for pool layer ``t mod M`` in repetition ``t // M``. An indicator
``I ∈ R^T`` switches slot t on iff ``I_t > 0``; the path is the "on" slots in order. A scaling matrix
``W ∈ R^{M×M}`` multiplies the hidden state entering layer j when it comes from layer i (paper's W_ij).

Genome vector layout: ``[I (T) | scale genes | embedding genes]``. Scales are ``exp(s)`` with ``s`` clipped to
``[-scale_bound, scale_bound]`` so they stay positive (the folded export needs every cumulative scale > 0) and
``s = 0`` is scale 1: the initial genome is exactly model A (toy-zoo findings, round 4). Off slots start at
``init_off`` (-0.5 by default; the paper's 0 makes a sampler switch on about half the slots, giving random long
paths). Scale parameterisations:

- ``full``: M×M genes ``W[i, j]`` (the paper); the first step (coming from the embedding) has scale 1.
- ``per_layer``: M genes, one per destination layer.
- ``per_step``: T genes, one per slot; only the genes of "on" slots matter.
- ``none``: no genes, every scale is 1.

Optional embedding genes (one per model in ``embed_choices``; the largest wins) let the search choose which pool
model supplies the input embedding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Literal

import numpy as np

from dfsmerge.errors import ConfigError
from dfsmerge.genome.plan import GENE_DECIMALS, FrozenDict, LayerRef, PathPlan, Step

ScaleMode = Literal["full", "per_layer", "per_step", "none"]
SCALE_MODES: tuple[str, ...] = ("full", "per_layer", "per_step", "none")


_FLIPS = 0.5  # expected indicator flips per first-generation candidate (DFSGenome.initial_stds)


@dataclass(frozen=True, slots=True)
class Infeasible:
    """A genome that decodes to no acceptable path (repair off or impossible); score it as the worst fitness."""

    reason: str

    def key(self) -> str:
        return f"infeasible:{self.reason}"


@dataclass(frozen=True)
class DFSGenome:
    """Decoder of DFS genome vectors into :class:`PathPlan` s.

    Args:
        layers: pool model name -> number of decoder layers, in pool order; the first is model A.
        models: model name -> checkpoint path or hub id (copied into the plans); defaults to the names.
        base: the model supplying tokenizer, final norm and head (default: the first).
        repetitions: r, the number of times the pool is repeated in the slot sequence.
        scales: scale parameterisation, one of :data:`SCALE_MODES`.
        scale_bound: scales are ``exp(s)`` with ``s`` clipped to ``[-scale_bound, scale_bound]``.
        scale_step: round ``s`` to multiples of this (None: continuous). Candidates whose scales round alike share
            their path prefixes exactly, which the evaluation's prefix reuse turns into skipped computation.
        min_length / max_length: path length bounds (max defaults to T).
        max_repeats: most times one pool layer may appear in the path (default r, i.e. unconstrained).
        force_first / force_last: the path must start with A's first layer / end with A's last layer.
        repair: repair a violating genome (drop the weakest slots, switch on the strongest off slots, insert forced
            layers); when False a violating genome decodes to :class:`Infeasible`.
        init_on / init_off: initial indicator values of model A's first-repetition slots and of the others.
        embed_choices: models that may supply the input embedding (one gene each, the largest wins); a single
            model fixes the embedding source without a gene; empty: model A's.
    """

    layers: Mapping[str, int]
    models: Mapping[str, str] = field(default_factory=dict)
    base: str | None = None
    repetitions: int = 2
    scales: ScaleMode = "per_step"
    scale_bound: float = 1.5
    scale_step: float | None = None
    min_length: int = 1
    max_length: int | None = None
    max_repeats: int | None = None
    force_first: bool = False
    force_last: bool = False
    repair: bool = True
    init_on: float = 0.5
    init_off: float = -0.5
    embed_choices: Sequence[str] = ()

    def __post_init__(self) -> None:
        errors = []
        if not self.layers:
            errors.append("layers is empty; give at least one pool model, e.g. {A: 32}")
        for name, n in self.layers.items():
            if not isinstance(n, int) or n < 1:
                errors.append(f"layers[{name!r}]={n!r} must be a positive integer")
        if self.base is not None and self.layers and self.base != next(iter(self.layers)):
            errors.append(f"base={self.base!r} must be the first pool model (pool order puts model A first); "
                          f"reorder layers so it starts with {self.base!r}")
        if not isinstance(self.repetitions, int) or self.repetitions < 1:
            errors.append(f"repetitions={self.repetitions!r} must be an integer >= 1 (the paper uses 3)")
        if self.scales not in SCALE_MODES:
            errors.append(f"scales={self.scales!r} is not known; use one of {', '.join(SCALE_MODES)}")
        if not self.scale_bound > 0:
            errors.append(f"scale_bound={self.scale_bound!r} must be > 0")
        if self.scale_step is not None and not 0 < self.scale_step <= self.scale_bound:
            errors.append(f"scale_step={self.scale_step!r} must be in (0, scale_bound={self.scale_bound}]; e.g. 0.02, "
                          "or null for continuous scales")
        if self.init_off > 0 or self.init_on <= 0:
            errors.append(f"init_on={self.init_on}, init_off={self.init_off}: need init_on > 0 >= init_off")
        if errors:
            raise ConfigError("invalid DFS genome: " + "; ".join(errors))
        T = self.num_slots
        max_len = T if self.max_length is None else self.max_length
        if not 1 <= self.min_length <= max_len <= T:
            raise ConfigError(f"DFS genome: need 1 <= min_length={self.min_length} <= max_length={max_len} <= "
                              f"T={T} slots (pool of {self.M} layers x {self.repetitions} repetitions)")
        if self.max_repeats is not None and self.max_repeats < 1:
            raise ConfigError(f"DFS genome: max_repeats={self.max_repeats} must be >= 1 or null")
        for m in self.embed_choices:
            if m not in self.layers:
                raise ConfigError(f"DFS genome: embed_choices has {m!r}, not a pool model; use {list(self.layers)}")
        object.__setattr__(self, "layers", FrozenDict(self.layers))
        object.__setattr__(self, "models", FrozenDict(self.models or {m: m for m in self.layers}))
        object.__setattr__(self, "embed_choices", tuple(self.embed_choices))
        refs = tuple(LayerRef(m, i) for m, n in self.layers.items() for i in range(n))
        object.__setattr__(self, "_refs", refs)
        object.__setattr__(self, "_pos", {r: p for p, r in enumerate(refs)})

    @classmethod
    def for_pool(cls, pool, names: Sequence[str] | None = None, **kwargs) -> DFSGenome:
        """A genome over ``pool``'s models ``names`` (default all, model A first), paths taken from the pool.

        Args:
            pool: a :class:`dfsmerge.runtime.pool.LayerPool` (duck-typed: ``names``, ``base``, ``num_layers``,
                ``model_paths``).
            kwargs: the other fields (``repetitions``, ``scales``, constraints, ...).
        """
        names = list(names or pool.names)
        if pool.base in names:
            names.remove(pool.base)
            names.insert(0, pool.base)
        paths = pool.model_paths()
        return cls({n: pool.num_layers(n) for n in names}, models={n: paths[n] for n in names}, **kwargs)

    # ------------------------------------------------------------ sizes
    @property
    def model_a(self) -> str:
        return self.base or next(iter(self.layers))

    @property
    def M(self) -> int:  # noqa: N802 - the paper's symbol
        return sum(self.layers.values())

    @property
    def num_slots(self) -> int:
        return self.M * self.repetitions

    @property
    def pool_layers(self) -> tuple[LayerRef, ...]:
        """The pool layers in pool order (index p is slot ``t`` with ``t mod M == p``)."""
        return self._refs  # type: ignore[attr-defined]

    @property
    def num_scale_genes(self) -> int:
        return {"full": self.M * self.M, "per_layer": self.M, "per_step": self.num_slots, "none": 0}[self.scales]

    @property
    def num_embed_genes(self) -> int:
        return len(self.embed_choices) if len(self.embed_choices) > 1 else 0

    @property
    def dim(self) -> int:
        return self.num_slots + self.num_scale_genes + self.num_embed_genes

    @property
    def max_len(self) -> int:
        return self.num_slots if self.max_length is None else self.max_length

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds per gene (indicator genes in [-1, 1], scale genes in ±scale_bound)."""
        lo = np.full(self.dim, -1.0)
        hi = np.full(self.dim, 1.0)
        T, S = self.num_slots, self.num_scale_genes
        lo[T:T + S] = -self.scale_bound
        hi[T:T + S] = self.scale_bound
        return lo, hi

    def _first_a(self) -> LayerRef:
        return LayerRef(self.model_a, 0)

    def _last_a(self) -> LayerRef:
        return LayerRef(self.model_a, self.layers[self.model_a] - 1)

    def _slot_of(self, ref: LayerRef, rep: int) -> int:
        return rep * self.M + self._pos[ref]  # type: ignore[attr-defined]

    # ------------------------------------------------------------ init
    def initial(self) -> np.ndarray:
        """The paper's start: model A's layers on in the first repetition, everything else off, scales 1."""
        x = np.zeros(self.dim)
        T = self.num_slots
        x[:T] = self.init_off
        for i in range(self.layers[self.model_a]):
            x[self._slot_of(LayerRef(self.model_a, i), 0)] = self.init_on
        if self.num_embed_genes:
            e = T + self.num_scale_genes
            x[e:] = self.init_off
            x[e + (self.embed_choices.index(self.model_a) if self.model_a in self.embed_choices else 0)] = self.init_on
        return x

    def initial_stds(self, sigma0: float) -> np.ndarray:
        """Start step sizes (gene units) that keep a first generation near :meth:`initial`, however deep the pool.

        ``sigma0 * range`` everywhere (as CMA-ES without this), capped so that (1) an indicator gene flips with
        probability ``FLIPS / T``: on average half a slot of the T flips per candidate, where ``sigma0 = 0.25``
        would flip ~10 of a 30-layer model's 60 slots (and repeating or dropping any one layer of a real model
        already costs it much of a skill); (2) the step scales' log-drift summed over model A's path is ~5%
        (``0.05 / sqrt(L)`` per scale gene for a path of L layers): on SmolLM2-135M independent 5% scales on all 30
        steps cost half its arithmetic (configs/real, measured).
        """
        lo, hi = self.bounds
        std = sigma0 * (hi - lo)
        T, S = self.num_slots, self.num_scale_genes
        margin = min(abs(self.init_on), abs(self.init_off)) or 0.5

        def cap(sl: slice, n: int) -> None:
            z = NormalDist().inv_cdf(1.0 - min(0.5, _FLIPS / n))
            std[sl] = np.minimum(std[sl], margin / z)

        cap(slice(0, T), T)
        std[T:T + S] = np.minimum(std[T:T + S], 0.05 / math.sqrt(self.layers[self.model_a]))
        if self.num_embed_genes:
            cap(slice(T + S, None), self.num_embed_genes)
        return std

    # ------------------------------------------------------------ decode
    def decode(self, x: Sequence[float] | np.ndarray) -> PathPlan | Infeasible:
        """Decode a genome vector into a plan (repaired if needed) or :class:`Infeasible`; never raises on values.

        Raises:
            ConfigError: only when ``x`` has the wrong length.
        """
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.shape[0] != self.dim:
            raise ConfigError(f"DFS genome vector has length {x.shape[0]}; this genome needs dim={self.dim}")
        x = np.nan_to_num(x, nan=-1.0, posinf=1.0, neginf=-1.0)  # NaN gene: slot off / scale 1 after clipping
        T, M = self.num_slots, self.M
        ind = x[:T]
        genes = np.clip(x[T:T + self.num_scale_genes], -self.scale_bound, self.scale_bound)
        if self.scale_step is not None:
            genes = np.clip(np.round(genes / self.scale_step) * self.scale_step, -self.scale_bound, self.scale_bound)
        on = [t for t in range(T) if ind[t] > 0]  # Eq.: slot t on iff I_t > 0
        slots, problem = self._constrain(on, ind)
        if problem is not None:
            return Infeasible(problem)
        steps = []
        prev: int | None = None
        for t in slots:
            p = t % M
            if self.scales == "none":
                s = 0.0
            elif self.scales == "per_step":
                s = genes[t]
            elif self.scales == "per_layer":
                s = genes[p]
            else:  # full: W_ij on the input to layer j from layer i
                s = 0.0 if prev is None else genes[prev * M + p]
            steps.append(Step(self.pool_layers[p], round(math.exp(float(s)), GENE_DECIMALS)))
            prev = p
        embed = None
        if self.num_embed_genes:
            e = x[T + self.num_scale_genes:]
            embed = self.embed_choices[int(np.argmax(e))]
        elif self.embed_choices:
            embed = self.embed_choices[0]  # one choice: a fixed embedding source, no gene
        if embed == self.model_a:
            embed = None
        return PathPlan(tuple(steps), models=self.models, base=self.model_a, embed=embed)

    def _constrain(self, on: list[int], ind: np.ndarray) -> tuple[list[int], str | None]:
        """Apply the constraints to the "on" slots: repaired slot list, or a reason for infeasibility."""
        M, T = self.M, self.num_slots
        max_rep = self.max_repeats or self.repetitions
        first, last = self._first_a(), self._last_a()
        first_slot = self._slot_of(first, 0)
        last_slot = self._slot_of(last, self.repetitions - 1)
        violations = self._violations(on)
        if not violations:
            return on, None
        if not self.repair:
            return [], "; ".join(violations)
        on = list(on)
        forced = set()
        if self.force_first:
            forced.add(first_slot)
            on = sorted(set(on) | {first_slot})  # slot 0 precedes every other slot
        if self.force_last:
            forced.add(last_slot)
            on = sorted({t for t in on if t <= last_slot} | {last_slot})
        # max_repeats: keep the strongest occurrences of each layer.
        by_layer: dict[int, list[int]] = {}
        for t in on:
            by_layer.setdefault(t % M, []).append(t)
        keep = set()
        for ts in by_layer.values():
            ranked = sorted(ts, key=lambda t: (t not in forced, -ind[t], t))
            keep.update(ranked[:max_rep])
        on = sorted(keep)
        # max_length: drop the weakest non-forced slots.
        if len(on) > self.max_len:
            ranked = sorted(on, key=lambda t: (t not in forced, -ind[t], t))
            on = sorted(ranked[:self.max_len])
        # min_length: switch on the strongest off slots that keep the other constraints.
        if len(on) < self.min_length:
            counts: dict[int, int] = {}
            for t in on:
                counts[t % M] = counts.get(t % M, 0) + 1
            limit = last_slot if self.force_last else T - 1
            candidates = sorted((t for t in range(T) if t not in on and t <= limit), key=lambda t: (-ind[t], t))
            for t in candidates:
                if len(on) >= self.min_length:
                    break
                if counts.get(t % M, 0) < max_rep:
                    counts[t % M] = counts.get(t % M, 0) + 1
                    on.append(t)
            on.sort()
        rest = self._violations(on)
        if rest:
            return [], "cannot repair: " + "; ".join(rest)
        return on, None

    def _violations(self, on: list[int]) -> list[str]:
        M = self.M
        out = []
        if len(on) < self.min_length:
            out.append(f"path length {len(on)} < min_length {self.min_length}")
        if len(on) > self.max_len:
            out.append(f"path length {len(on)} > max_length {self.max_len}")
        max_rep = self.max_repeats or self.repetitions
        counts: dict[int, int] = {}
        for t in on:
            counts[t % M] = counts.get(t % M, 0) + 1
        over = [str(self.pool_layers[p]) for p, c in counts.items() if c > max_rep]
        if over:
            out.append(f"layers {', '.join(over)} repeat more than max_repeats {max_rep}")
        if self.force_first and (not on or self.pool_layers[on[0] % M] != self._first_a()):
            out.append(f"path must start with {self._first_a()}")
        if self.force_last and (not on or self.pool_layers[on[-1] % M] != self._last_a()):
            out.append(f"path must end with {self._last_a()}")
        return out

    # ------------------------------------------------------------ encode
    def encode(self, plan: PathPlan) -> np.ndarray:
        """A genome vector that decodes to ``plan`` (slots assigned greedily, earliest repetition first).

        Raises:
            ConfigError: the plan cannot be expressed by this genome (a layer outside the pool, too many repeats
                for r, a scale outside ``exp(±scale_bound)``, scales this parameterisation cannot represent, or a
                constraint it violates); the message names the step and the reason.
        """
        T, M = self.num_slots, self.M
        x = np.zeros(self.dim)
        x[:T] = self.init_off if self.init_off < 0 else -0.5
        genes = np.zeros(self.num_scale_genes)
        assigned: dict[int, float] = {}
        t_prev = -1
        prev_p: int | None = None
        for k, step in enumerate(plan.steps):
            p = self._pos.get(step.layer)  # type: ignore[attr-defined]
            if p is None:
                raise ConfigError(f"path[{k}] uses {step.layer}, which is not in the pool {list(self.layers)}")
            t = (t_prev // M) * M + p  # the first slot of layer p after the previous step's slot
            if t <= t_prev:
                t += M
            if t >= T:
                raise ConfigError(f"path[{k}]={step.layer} needs more than repetitions={self.repetitions} passes "
                                  "over the pool; raise repetitions")
            if step.scale <= 0:
                raise ConfigError(f"path[{k}].scale={step.scale} must be > 0")
            s = math.log(step.scale)
            if abs(s) > self.scale_bound + 1e-6:  # tolerance: decoded scales are rounded to 9 decimals
                raise ConfigError(f"path[{k}].scale={step.scale} is outside exp(±{self.scale_bound}); raise "
                                  "scale_bound")
            s = min(max(s, -self.scale_bound), self.scale_bound)
            if self.scales == "none":
                idx = None
                if abs(s) > 1e-9:
                    raise ConfigError(f"path[{k}].scale={step.scale}: scales='none' can only express scale 1")
            elif self.scales == "per_step":
                idx = t
            elif self.scales == "per_layer":
                idx = p
            else:
                idx = None if prev_p is None else prev_p * M + p
                if idx is None and abs(s) > 1e-9:
                    raise ConfigError(f"path[0].scale={step.scale}: scales='full' gives the first step scale 1")
            if idx is not None:
                if idx in assigned and abs(assigned[idx] - s) > 1e-9:
                    raise ConfigError(f"path[{k}].scale={step.scale} conflicts with an earlier step sharing its "
                                      f"scale gene under scales={self.scales!r}; use scales='per_step'")
                assigned[idx] = s
                genes[idx] = s
            x[t] = self.init_on
            t_prev, prev_p = t, p
        x[T:T + self.num_scale_genes] = genes
        if self.num_embed_genes:
            e = T + self.num_scale_genes
            x[e:] = -0.5
            if plan.embed_model not in self.embed_choices:
                raise ConfigError(f"plan.embed={plan.embed_model!r} is not in embed_choices {self.embed_choices}")
            x[e + self.embed_choices.index(plan.embed_model)] = 0.5
        elif plan.embed_model != (self.embed_choices[0] if self.embed_choices else self.model_a):
            raise ConfigError(f"plan.embed={plan.embed_model!r}: this genome fixes the embedding to "
                              f"{(self.embed_choices or (self.model_a,))[0]!r}; list both in embed_choices")
        on = [t for t in range(T) if x[t] > 0]
        bad = self._violations(on)
        if bad:
            raise ConfigError("plan violates the genome's constraints: " + "; ".join(bad))
        return x
