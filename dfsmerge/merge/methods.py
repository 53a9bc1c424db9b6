"""The built-in merge methods, registered by their mergekit 0.1.5 names with mergekit's parameters and
defaults. Each kernel adapts the registry's calling convention to a plain function of this package."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from dfsmerge.merge.gta import Consensus, generalized_task_arithmetic
from dfsmerge.merge.linear import linear, passthrough
from dfsmerge.merge.model_stock import model_stock
from dfsmerge.merge.registry import REQUIRED, MergeMethod, ParamSpec, register
from dfsmerge.merge.slerp import nuslerp, slerp
from dfsmerge.merge.sparsify import Sparsification

PerModel = Mapping[str, tuple[Any, ...]]


def _non_base(n: int, base_index: int | None) -> list[int]:
    return [i for i in range(n) if i != base_index]


def _linear(tensors: Sequence[torch.Tensor], *, base_index, per_model: PerModel, params, generator):
    return linear(tensors, per_model["weight"], normalize=params["normalize"])


def _passthrough(tensors: Sequence[torch.Tensor], *, base_index, per_model: PerModel, params, generator):
    return passthrough(tensors[0], per_model["scale"][0])


def _slerp(tensors: Sequence[torch.Tensor], *, base_index, per_model: PerModel, params, generator):
    return slerp(params["t"], tensors[base_index], tensors[1 - base_index])


def _nuslerp(tensors: Sequence[torch.Tensor], *, base_index, per_model: PerModel, params, generator):
    i, j = _non_base(len(tensors), base_index)
    w0, w1 = per_model["weight"][i], per_model["weight"][j]
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total  # weights summing to ~0: midpoint, as mergekit
    options = {"row_wise": params["nuslerp_row_wise"], "flatten": params["nuslerp_flatten"]}
    if base_index is None:
        return nuslerp(t, tensors[i], tensors[j], **options)
    base = tensors[base_index]
    return base + nuslerp(t, tensors[i] - base, tensors[j] - base, **options)


def _model_stock(tensors: Sequence[torch.Tensor], *, base_index, per_model: PerModel, params, generator):
    others = [tensors[i] for i in _non_base(len(tensors), base_index)]
    return model_stock(tensors[base_index], others, filter_wise=params["filter_wise"])


def _gta(
    tensors: Sequence[torch.Tensor],
    *,
    base_index,
    per_model: PerModel,
    params,
    generator,
    sparsification: Sparsification | None,
    consensus: Consensus | None,
):
    idx = _non_base(len(tensors), base_index)
    return generalized_task_arithmetic(
        tensors[base_index],
        [tensors[i] for i in idx],
        [per_model["weight"][i] for i in idx],
        [per_model["density"][i] for i in idx],
        sparsification=sparsification,
        consensus=consensus,
        normalize=params["normalize"],
        rescale=params["rescale"],
        lambda_=params["lambda"],
        int8_mask=params["int8_mask"],
        epsilon=[per_model["epsilon"][i] for i in idx] if "epsilon" in per_model else 0.0,
        gamma=[per_model["gamma"][i] for i in idx] if "gamma" in per_model else 0.0,
        generator=generator,
    )


register(
    MergeMethod(
        name="linear",
        params=(
            ParamSpec("weight", REQUIRED, True, float, doc="weight of each model"),
            ParamSpec("normalize", True, False, bool, doc="divide by the sum of weights"),
        ),
        base="none",
        random=False,
        fn=_linear,
        reference="Wortsman et al. 2022, Model soups, arXiv 2203.05482",
    )
)
register(
    MergeMethod(
        name="slerp",
        params=(ParamSpec("t", REQUIRED, False, float, doc="interpolation factor: 0 = base, 1 = other model"),),
        base="required",
        random=False,
        fn=_slerp,
        min_inputs=2,
        max_inputs=2,
        reference="Shoemake 1985, Animating rotation with quaternion curves",
    )
)
register(
    MergeMethod(
        name="nuslerp",
        params=(
            ParamSpec("weight", REQUIRED, True, float, non_base=True, doc="relative weight of each model"),
            ParamSpec("nuslerp_row_wise", False, False, bool, doc="slerp vectors along dim 0"),
            ParamSpec("nuslerp_flatten", True, False, bool, doc="slerp whole tensors as one vector"),
        ),
        base="optional",
        random=False,
        fn=_nuslerp,
        min_non_base=2,
        max_non_base=2,
        reference="mergekit nuslerp (spherical interpolation of two models or their task vectors)",
    )
)
register(
    MergeMethod(
        name="model_stock",
        params=(ParamSpec("filter_wise", False, False, bool, doc="one ratio per row instead of per tensor"),),
        base="required",
        random=False,
        fn=_model_stock,
        min_inputs=3,
        reference="Jang et al. 2024, Model Stock, arXiv 2403.19522",
    )
)
register(
    MergeMethod(
        name="passthrough",
        params=(ParamSpec("scale", None, True, float, doc="multiply the tensor by this value"),),
        base="none",
        random=False,
        fn=_passthrough,
        max_inputs=1,
        reference="mergekit passthrough",
    )
)


@dataclass(frozen=True, slots=True)
class GTAVariant:
    """How one GTA-family method configures :func:`generalized_task_arithmetic` (for fused kernels)."""

    name: str
    sparsification: Sparsification | None
    consensus: Consensus | None
    default_normalize: bool
    default_rescale: bool
    reference: str


# name, sparsification, consensus, default normalize, default rescale, reference
_GTA = (
    ("task_arithmetic", None, None, False, False, "Ilharco et al. 2022, arXiv 2212.04089"),
    ("ties", Sparsification.magnitude, Consensus.sum, True, False, "Yadav et al. 2023, arXiv 2306.01708"),
    ("dare_ties", Sparsification.random, Consensus.sum, False, True, "Yu et al. 2023, arXiv 2311.03099"),
    ("dare_linear", Sparsification.random, None, False, True, "Yu et al. 2023, arXiv 2311.03099"),
    ("breadcrumbs", Sparsification.magnitude_outliers, None, False, False, "Davari et al. 2023, arXiv 2312.06795"),
    (
        "breadcrumbs_ties",
        Sparsification.magnitude_outliers,
        Consensus.sum,
        False,
        False,
        "Davari et al. 2023, arXiv 2312.06795",
    ),
    ("della", Sparsification.della_magprune, Consensus.sum, True, True, "Deep et al. 2024, arXiv 2406.11617"),
    ("della_linear", Sparsification.della_magprune, None, False, True, "Deep et al. 2024, arXiv 2406.11617"),
)

GTA_VARIANTS: dict[str, GTAVariant] = {row[0]: GTAVariant(*row) for row in _GTA}
"""The GTA-family methods by name: task_arithmetic, ties, dare_*, breadcrumbs*, della*."""

for _name, _sparsification, _consensus, _normalize, _rescale, _reference in _GTA:
    _params = [
        ParamSpec("int8_mask", False, False, bool, doc="compute the sign mask in int8 (memory only)"),
        ParamSpec("normalize", _normalize, False, bool, doc="divide by the sum of (kept) weights"),
        ParamSpec("rescale", _rescale, False, bool, doc="restore each pruned task vector's L1 norm"),
        ParamSpec("lambda", 1.0, False, float, doc="scale of the merged task vector"),
        ParamSpec("weight", REQUIRED, True, float, non_base=True, doc="weight of each task vector"),
        ParamSpec("density", 1.0, True, float, non_base=True, doc="fraction of each task vector kept"),
    ]
    if _sparsification is Sparsification.magnitude_outliers:
        _params.append(ParamSpec("gamma", 0.01, True, float, non_base=True, doc="fraction of outliers removed"))
    if _sparsification is Sparsification.della_magprune:
        _params.append(
            ParamSpec("epsilon", 0.15, True, float, non_base=True, doc="half-width of the keep probabilities")
        )
    register(
        MergeMethod(
            name=_name,
            params=tuple(_params),
            base="required",
            random=_sparsification in (Sparsification.random, Sparsification.della_magprune),
            fn=partial(_gta, sparsification=_sparsification, consensus=_consensus),
            reference=_reference,
        )
    )
