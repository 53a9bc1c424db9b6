"""Layer paths through a pool of decoder layers (data-flow-space merging, Sakana AI, arXiv 2403.13187, sec. 3.2).

A :class:`PathPlan` is the decoded DFS part of a candidate: which pool layer runs at each step and the scale applied
to the hidden state entering it. It round-trips through the plan file format::

    models: {A: path/or/hub-id, B: path/or/hub-id}
    base: A            # supplies tokenizer, embeddings, final norm, head
    path:
      - {model: A, layer: 0, scale: 1.0}
      - {model: B, layer: 5, scale: 0.85}

An optional ``embed: B`` key names a different model to supply the input embedding (the toy-zoo findings, round 4:
the embedding's source can decide everything); it is written only when it differs from ``base``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dfsmerge.errors import ConfigError

GENE_DECIMALS = 9
"""Decimals kept in decoded gene values (PS recipe values, DFS step scales), so ``decode(encode(x)) == x``
exactly."""



def cumulative_scales(scales: Iterable[float]) -> list[float]:
    """``C_k = s_1 ... s_k`` for every step (computed in float64): what the scale of step ``k`` and the ones before
    it multiply the hidden state by, and what the folded export divides step ``k``'s residual branch by."""
    out, c = [], 1.0
    for s in scales:
        c *= float(s)
        out.append(c)
    return out

@dataclass(frozen=True, slots=True, order=True)
class LayerRef:
    """Decoder layer ``index`` of pool model ``model``."""

    model: str
    index: int

    def __str__(self) -> str:
        return f"{self.model}[{self.index}]"


@dataclass(frozen=True, slots=True)
class Step:
    """One hop of a path: ``h = layer(h * scale)``."""

    layer: LayerRef
    scale: float = 1.0


@dataclass(frozen=True, slots=True)
class PathPlan:
    """A layer path: the steps, the models they come from, and the model supplying the embedding/norm/head.

    Attributes:
        steps: the hops in order.
        models: model name -> checkpoint path or hub id (what the plan file's ``models`` maps).
        base: the model supplying tokenizer, final norm and head (and the embedding unless ``embed`` is set).
        embed: the model supplying the input embedding; ``None`` means ``base``.
    """

    steps: tuple[Step, ...]
    models: Mapping[str, str] = field(default_factory=dict)
    base: str = "A"
    embed: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        object.__setattr__(self, "models", FrozenDict(self.models))

    def __hash__(self) -> int:
        return hash((self.steps, tuple(self.models.items()), self.base, self.embed))

    @property
    def embed_model(self) -> str:
        """The model whose embedding the path reads."""
        return self.embed or self.base

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def layers(self) -> tuple[LayerRef, ...]:
        return tuple(s.layer for s in self.steps)

    @property
    def scales(self) -> tuple[float, ...]:
        return tuple(s.scale for s in self.steps)

    @classmethod
    def identity(cls, model: str, num_layers: int, *, models: Mapping[str, str] | None = None) -> PathPlan:
        """All layers of ``model`` in order at scale 1 (reproduces that model)."""
        return cls(tuple(Step(LayerRef(model, i), 1.0) for i in range(num_layers)),
                   models=dict(models or {model: model}), base=model)

    def validate(self, num_layers: Mapping[str, int] | None = None) -> PathPlan:
        """Check the plan; return it unchanged.

        Args:
            num_layers: model name -> its number of decoder layers, to range-check layer indices.

        Raises:
            ConfigError: every problem found, each naming the step, field, value and fix.
        """
        errors: list[str] = []
        known = set(self.models) | set(num_layers or {})
        if not self.steps:
            errors.append("path is empty; give at least one step {model: NAME, layer: INDEX, scale: 1.0}")
        for key, name in (("base", self.base), ("embed", self.embed)):
            if name is not None and known and name not in known:
                errors.append(f"{key}={name!r} is not a model of the plan; use one of {sorted(known)}")
        for i, step in enumerate(self.steps):
            ref = step.layer
            if known and ref.model not in known:
                errors.append(f"path[{i}].model={ref.model!r} is not a model of the plan; use one of {sorted(known)}")
            elif isinstance(ref.index, bool) or not isinstance(ref.index, int) or ref.index < 0:
                errors.append(f"path[{i}].layer={ref.index!r} must be an integer >= 0")
            elif num_layers and ref.model in num_layers and ref.index >= num_layers[ref.model]:
                errors.append(f"path[{i}].layer={ref.index} is out of range for model {ref.model!r} with "
                              f"{num_layers[ref.model]} layers; use 0..{num_layers[ref.model] - 1}")
            if not isinstance(step.scale, (int, float)) or not math.isfinite(step.scale) or step.scale <= 0:
                errors.append(f"path[{i}].scale={step.scale!r} must be a finite number > 0 "
                              "(positive scales keep the folded export exact)")
        if errors:
            raise ConfigError("invalid path plan: " + "; ".join(errors))
        return self

    # ---------------------------------------------------------------- YAML
    def to_dict(self) -> dict[str, Any]:
        """The plan-file dict (``models``, ``base``, optional ``embed``, ``path``)."""
        out: dict[str, Any] = {"models": dict(self.models), "base": self.base}
        if self.embed is not None and self.embed != self.base:
            out["embed"] = self.embed
        out["path"] = [{"model": s.layer.model, "layer": s.layer.index, "scale": float(s.scale)} for s in self.steps]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PathPlan:
        """Parse a plan-file dict.

        Raises:
            ConfigError: a missing or malformed field, named with its value and the fix.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"plan must be a mapping with keys models, base, path; got {type(data).__name__}")
        unknown = set(data) - {"models", "base", "embed", "path"}
        if unknown:
            raise ConfigError(f"plan has unknown keys {sorted(unknown)}; allowed: models, base, embed, path")
        models = data.get("models")
        if not isinstance(models, Mapping) or not models:
            raise ConfigError(f"plan.models={models!r} must map model names to paths, e.g. {{A: path/to/model}}")
        models = {str(k): str(v) for k, v in models.items()}
        base = str(data.get("base", next(iter(models))))
        path = data.get("path")
        if not isinstance(path, list):
            raise ConfigError(f"plan.path={path!r} must be a list of {{model, layer, scale}} steps")
        steps = []
        for i, item in enumerate(path):
            if not isinstance(item, Mapping) or "model" not in item or "layer" not in item:
                raise ConfigError(f"path[{i}]={item!r} must be a mapping with keys model, layer and optional scale")
            extra = set(item) - {"model", "layer", "scale"}
            if extra:
                raise ConfigError(f"path[{i}] has unknown keys {sorted(extra)}; allowed: model, layer, scale")
            layer = item["layer"]
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise ConfigError(f"path[{i}].layer={layer!r} must be an integer >= 0")
            scale = item.get("scale", 1.0)
            if isinstance(scale, bool) or not isinstance(scale, (int, float)):
                raise ConfigError(f"path[{i}].scale={scale!r} must be a number > 0")
            steps.append(Step(LayerRef(str(item["model"]), layer), float(scale)))
        embed = data.get("embed")
        plan = cls(tuple(steps), models=models, base=base, embed=None if embed is None else str(embed))
        return plan.validate()

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_yaml(cls, text: str) -> PathPlan:
        """Parse plan YAML text (see the module docstring). Raises ConfigError."""
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"plan is not valid YAML: {e}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def load(cls, path: str | Path) -> PathPlan:
        """Read a plan file. Raises ConfigError (also when the file is missing)."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"plan file {str(p)!r} does not exist; write one with PathPlan.save or `dfsmerge export`")
        return cls.from_yaml(p.read_text())

    # ---------------------------------------------------------------- graph
    def graph(self, pool_layers: Iterable[LayerRef] = ()):
        """The layer-path graph: a ``networkx.DiGraph`` whose nodes are pool layers and edges transitions.

        Node attributes: ``model``, ``index``, ``uses`` (times the path runs the layer). A virtual node
        ``"embed"`` starts the path and ``"head"`` ends it. Edge attributes: ``count`` (times the transition
        occurs), ``scales`` (the scale of each occurrence, applied to the input of the destination), ``scale``
        (their mean).

        Args:
            pool_layers: every layer of the pool, to include unused layers as isolated nodes.
        """
        import networkx as nx

        g = nx.DiGraph()
        g.add_node("embed", model=self.embed_model, index=-1, uses=1)
        g.add_node("head", model=self.base, index=-1, uses=1)
        for ref in pool_layers:
            g.add_node(ref, model=ref.model, index=ref.index, uses=0)
        prev: Any = "embed"
        for step in self.steps:
            ref = step.layer
            if ref not in g:
                g.add_node(ref, model=ref.model, index=ref.index, uses=0)
            g.nodes[ref]["uses"] += 1
            _add_transition(g, prev, ref, step.scale)
            prev = ref
        _add_transition(g, prev, "head", 1.0)
        return g


def _add_transition(g, src, dst, scale: float) -> None:
    if g.has_edge(src, dst):
        e = g.edges[src, dst]
        e["count"] += 1
        e["scales"].append(scale)
        e["scale"] = sum(e["scales"]) / len(e["scales"])
    else:
        g.add_edge(src, dst, count=1, scales=[scale], scale=scale)


class FrozenDict(dict):
    """A read-only, hashable dict (keeps frozen dataclasses holding mappings hashable and immutable)."""

    def _ro(self, *a, **k):
        raise TypeError("this mapping is read-only; build a new object instead")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _ro  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(self.items()))

    def __reduce__(self):
        return (FrozenDict, (dict(self),))
