"""Layer Swapping (Bandarkar et al., ICLR 2025, arXiv 2410.01335), the hand-made recipe the real-experts searches
are measured against: the language expert's bottom and top decoder layers around the math expert's middle ones,
with "transition zones" between them where the two experts' layers are averaged.

The recipe is written as a mergekit YAML (``merge_method: linear`` over layer slices: a slice with one source is
that layer copied, a transition slice averages both sources at equal weights), which ``dfsmerge merge`` and
``mergekit-yaml`` both run. mergekit takes the embedding from the first slice's sources and the final norm and head
from the last slice's, so with ``bottom`` and ``top`` of at least one layer they are the language expert's, as the
language expert reads and writes the target language. :func:`layer_swap_plan` writes the same model as a layer
path (``dfsmerge export --plan``), which the tests check tensor for tensor against the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

from dfsmerge.errors import ConfigError

__all__ = ["LayerSwap", "layer_swap_plan", "layer_swap_recipe"]


@dataclass(frozen=True, slots=True)
class LayerSwap:
    """Split points over ``num_layers`` decoder layers: ``bottom`` and ``top`` layers from the language expert,
    ``transition`` averaged layers on the inner side of each, the math expert's layers in between."""

    num_layers: int
    bottom: int
    top: int
    transition: int = 0

    def __post_init__(self) -> None:
        middle = self.num_layers - self.bottom - self.top - 2 * self.transition
        if min(self.bottom, self.top) < 1 or self.transition < 0 or middle < 1:
            raise ConfigError(f"layer swap bottom={self.bottom}, top={self.top}, transition={self.transition} leaves "
                              f"{middle} math layers of {self.num_layers}; use bottom, top >= 1, transition >= 0 "
                              "and leave at least one math layer")

    def sources(self) -> list[str]:
        """Per layer: ``lang``, ``math`` or ``avg``."""
        t, n = self.transition, self.num_layers
        return (["lang"] * self.bottom + ["avg"] * t + ["math"] * (n - self.bottom - self.top - 2 * t)
                + ["avg"] * t + ["lang"] * self.top)


def _runs(labels: list[str]) -> list[tuple[str, int, int]]:
    out: list[tuple[str, int, int]] = []
    for i, lab in enumerate(labels):
        if out and out[-1][0] == lab:
            out[-1] = (lab, out[-1][1], i + 1)
        else:
            out.append((lab, i, i + 1))
    return out


def layer_swap_recipe(swap: LayerSwap, *, math: str, lang: str, dtype: str = "float32") -> dict:
    """The mergekit YAML (as a dict) of ``swap`` over the models ``math`` and ``lang`` (references or paths)."""
    slices = []
    for lab, a, b in _runs(swap.sources()):
        refs = {"lang": [lang], "math": [math], "avg": [lang, math]}[lab]
        w = 1.0 / len(refs)
        slices.append({"sources": [{"model": r, "layer_range": [a, b], "parameters": {"weight": w}} for r in refs]})
    return {"merge_method": "linear", "slices": slices, "parameters": {"normalize": False}, "dtype": dtype}


def layer_swap_plan(swap: LayerSwap, *, math: str, lang: str, avg: str | None = None) -> dict:
    """The same model as a layer path (a plan YAML as a dict): embedding, final norm and head of ``lang``, each
    layer taken from its source. Transition layers need ``avg``, a model whose every layer is the two experts'
    average (``linear`` at 0.5 / 0.5)."""
    names = {"lang": lang, "math": math, "avg": avg}
    if swap.transition and avg is None:
        raise ConfigError("layer_swap_plan: a transition zone needs avg=, the experts' 0.5/0.5 linear merge")
    models = {k: v for k, v in names.items() if v is not None}
    path = [{"model": lab, "layer": i, "scale": 1.0} for i, lab in enumerate(swap.sources())]
    return {"models": models, "base": "lang", "path": path}
