"""The built-in merge methods, registered by their mergekit 0.1.5 names with mergekit's parameters and
defaults. Each kernel adapts the registry's calling convention to a plain function of this package."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from dfsmerge.merge.arcee_fusion import QUANTILES, arcee_fusion, fusion_fence, fusion_importance, quantile_rank
from dfsmerge.merge.chunked import (
    ChunkedMerge,
    CountChunks,
    GramChunks,
    MagnitudeChunks,
    QuantileChunks,
    RankWindowChunks,
    VarianceTopKChunks,
    elementwise,
    rowwise,
)
from dfsmerge.merge.gta import Consensus, generalized_task_arithmetic
from dfsmerge.merge.karcher import karcher_mean
from dfsmerge.merge.linear import linear, passthrough
from dfsmerge.merge.model_stock import model_stock
from dfsmerge.merge.multislerp import multislerp
from dfsmerge.merge.nearswap import nearswap
from dfsmerge.merge.ram import ram, ram_overlap_counts
from dfsmerge.merge.registry import REQUIRED, Gene, MergeMethod, ParamSpec, register
from dfsmerge.merge.sce import sce, sce_energy_rows, sce_select_count, sce_variance
from dfsmerge.merge.slerp import nuslerp, slerp
from dfsmerge.merge.sparsify import Sparsification

PerModel = Mapping[str, tuple[Any, ...]]

# Genes (what a PS genome searches), as mergekit-evolve: weights start at 1 / number of models, densities at 1,
# slerp's t at 0.5.
WEIGHT_GENE = Gene("weight", 0.0, 1.0, None, signed=True, clip=False)
DENSITY_GENE = Gene("density", 0.0, 1.0, 1.0)


def _non_base(n: int, base_index: int | None) -> list[int]:
    return [i for i in range(n) if i != base_index]


def _linear(tensors: Sequence[torch.Tensor], *, base_index, per_model: PerModel, params, generator):
    return linear(tensors, per_model["weight"], normalize=params["normalize"])


def _passthrough(tensors: Sequence[torch.Tensor], *, base_index, per_model: PerModel, params, generator):
    return passthrough(tensors[0], per_model["scale"][0])


def _slerp(tensors: Sequence[torch.Tensor], *, base_index, per_model: PerModel, params, generator,
           gram_matrix=None):
    return slerp(params["t"], tensors[base_index], tensors[1 - base_index], gram_matrix=gram_matrix)


def _slerp_chunking(method, base_index, per_model: PerModel, params, numel: int) -> ChunkedMerge:
    return GramChunks(method, base_index, per_model, params,
                      vectors=lambda c: [c[base_index], c[1 - base_index]],
                      merge=lambda c, g: _slerp(c, base_index=base_index, per_model=per_model, params=params,
                                                generator=None, gram_matrix=g))


def _nuslerp_vectors(tensors: Sequence[torch.Tensor], base_index) -> list[torch.Tensor]:
    i, j = _non_base(len(tensors), base_index)
    if base_index is None:
        return [tensors[i], tensors[j]]
    return [tensors[i] - tensors[base_index], tensors[j] - tensors[base_index]]


def _nuslerp(tensors: Sequence[torch.Tensor], *, base_index, per_model: PerModel, params, generator,
             gram_matrix=None):
    i, j = _non_base(len(tensors), base_index)
    w0, w1 = per_model["weight"][i], per_model["weight"][j]
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total  # weights summing to ~0: midpoint, as mergekit
    options = {"row_wise": params["nuslerp_row_wise"], "flatten": params["nuslerp_flatten"]}
    v0, v1 = _nuslerp_vectors(tensors, base_index)
    merged = nuslerp(t, v0, v1, gram_matrix=gram_matrix, **options)
    return merged if base_index is None else tensors[base_index] + merged


def _nuslerp_chunking(method, base_index, per_model: PerModel, params, numel: int) -> ChunkedMerge | None:
    if not params["nuslerp_flatten"]:  # vectors along the last axis are rows; along dim 0 they span the tensor
        return None if params["nuslerp_row_wise"] else rowwise(method, base_index, per_model, params, numel)
    return GramChunks(method, base_index, per_model, params, vectors=lambda c: _nuslerp_vectors(c, base_index),
                      merge=lambda c, g: _nuslerp(c, base_index=base_index, per_model=per_model, params=params,
                                                  generator=None, gram_matrix=g))


def _model_stock_chunking(method, base_index, per_model: PerModel, params, numel: int) -> ChunkedMerge | None:
    # per-tensor cosines need the whole tensor; filter_wise ones are per row
    return rowwise(method, base_index, per_model, params, numel) if params["filter_wise"] else None


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
    prune=None,
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
        prune=prune,
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
        genes=(WEIGHT_GENE,),
        kernel="linear",
        chunking=elementwise,
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
        genes=(Gene("t", 0.0, 1.0, 0.5, signed=True),),
        kernel="slerp",
        chunking=_slerp_chunking,
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
        genes=(WEIGHT_GENE,),
        chunking=_nuslerp_chunking,
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
        chunking=_model_stock_chunking,
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
        chunking=elementwise,
        reference="mergekit passthrough",
    )
)


def _gta_chunking(method, base_index, per_model: PerModel, params, numel: int, *,
                 sparsification: Sparsification | None, consensus: Consensus | None) -> ChunkedMerge | None:
    densities = [d for d in per_model["density"] if d is not None]
    if sparsification is None or all(d >= 1 for d in densities):
        return elementwise(method, base_index, per_model, params, numel)  # no pruning: elementwise
    def merge(chunk, prune):  # pruned by the chunker with the whole tensor's thresholds
        return _gta(chunk, base_index=base_index, per_model=per_model, params=params, generator=None,
                    sparsification=None, consensus=consensus, prune=prune)

    if sparsification is Sparsification.magnitude and not params["rescale"]:
        return MagnitudeChunks(method, base_index, per_model, params, n_entries=numel, merge_fn=merge)
    if sparsification is Sparsification.magnitude_outliers and not params["rescale"]:
        return RankWindowChunks(method, base_index, per_model, params, n_entries=numel, merge_fn=merge)
    # random draws (DARE, DELLA) and the L1 rescale need the whole tensor
    return None


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
        ParamSpec("density", 1.0, True, float, non_base=True, doc="fraction of each task vector kept", ge=0, le=1),
    ]
    if _sparsification is Sparsification.magnitude_outliers:
        _params.append(
            ParamSpec("gamma", 0.01, True, float, non_base=True, doc="fraction of outliers removed", ge=0, le=1)
        )
    if _sparsification is Sparsification.della_magprune:
        _params.append(
            ParamSpec("epsilon", 0.15, True, float, non_base=True, doc="half-width of the keep probabilities", ge=0)
        )
    register(
        MergeMethod(
            name=_name,
            params=tuple(_params),
            base="required",
            random=_sparsification in (Sparsification.random, Sparsification.della_magprune),
            fn=partial(_gta, sparsification=_sparsification, consensus=_consensus),
            reference=_reference,
            # mergekit-evolve searches weights (task arithmetic) and densities (sparsifying methods)
            genes=(WEIGHT_GENE,) if _sparsification is None else (WEIGHT_GENE, DENSITY_GENE),
            kernel="gta",
            chunking=partial(_gta_chunking, sparsification=_sparsification, consensus=_consensus),
        )
    )


def _sce(tensors: Sequence[torch.Tensor], *, base_index, per_model: PerModel, params, generator, **whole_stats):
    others = [tensors[i] for i in _non_base(len(tensors), base_index)]
    return sce(tensors[base_index], others, select_topk=params["select_topk"], int8_mask=params["int8_mask"],
               **whole_stats)


def _sce_chunking(method, base_index, per_model: PerModel, params, numel: int) -> ChunkedMerge:
    def task_vectors(c):
        return torch.stack([c[i] - c[base_index] for i in _non_base(len(c), base_index)], dim=0)

    return VarianceTopKChunks(
        method, base_index, per_model, params, n_entries=numel, select_topk=params["select_topk"],
        task_vectors=task_vectors, variance=sce_variance, energy_rows=sce_energy_rows, select_count=sce_select_count,
        merge=lambda c, mask, energy: _sce(c, base_index=base_index, per_model=per_model, params=params,
                                           generator=None, mask=mask, energy=energy, numel=numel))


def _multislerp(tensors: Sequence[torch.Tensor], *, base_index, per_model: PerModel, params, generator,
                gram_matrix=None):
    idx = _non_base(len(tensors), base_index)
    return multislerp(
        [tensors[i] for i in idx],
        [per_model["weight"][i] for i in idx],
        base=None if base_index is None else tensors[base_index],
        normalize_weights=params["normalize_weights"],
        eps=params["eps"],
        gram_matrix=gram_matrix,
    )


def _multislerp_vectors(tensors: Sequence[torch.Tensor], base_index) -> list[torch.Tensor]:
    idx = _non_base(len(tensors), base_index)  # the task vectors multislerp interpolates
    return [tensors[i] if base_index is None else tensors[i] - tensors[base_index] for i in idx]


def _karcher(tensors: Sequence[torch.Tensor], *, base_index, per_model: PerModel, params, generator,
             gram_matrix=None):
    alphas = [1.0 / len(tensors)] * len(tensors)  # mergekit's karcher: equal weights, the base as any input
    return karcher_mean(tensors, alphas, max_iter=params["max_iter"], tol=params["tol"], gram_matrix=gram_matrix)


def _gram_chunking(fn, vectors):
    """Chunking factory of a method ``fn`` that takes the Gram matrix of ``vectors(tensors, base_index)``."""

    def factory(method, base_index, per_model: PerModel, params, numel: int) -> ChunkedMerge:
        return GramChunks(method, base_index, per_model, params, vectors=lambda c: vectors(c, base_index),
                          merge=lambda c, g: fn(c, base_index=base_index, per_model=per_model, params=params,
                                                generator=None, gram_matrix=g))

    return factory


def _nearswap(tensors: Sequence[torch.Tensor], *, base_index, per_model: PerModel, params, generator):
    return nearswap(params["t"], tensors[base_index], tensors[1 - base_index])


def _arcee_fusion(tensors: Sequence[torch.Tensor], *, base_index, per_model: PerModel, params, generator,
                  fence=None):
    return arcee_fusion(tensors[base_index], tensors[1 - base_index], fence=fence)


def _arcee_chunking(method, base_index, per_model: PerModel, params, numel: int) -> ChunkedMerge:
    return QuantileChunks(
        method, base_index, per_model, params, n_entries=numel,
        importance=lambda c: fusion_importance(c[1 - base_index], c[base_index]),
        ranks=[quantile_rank(q, numel) for q in QUANTILES],
        merge=lambda c, values: _arcee_fusion(c, base_index=base_index, per_model=per_model, params=params,
                                              generator=None, fence=fusion_fence(tuple(values))))


def _ram(tensors: Sequence[torch.Tensor], *, base_index, per_model: PerModel, params, generator, plus: bool,
         overlap=None):
    others = [tensors[i] for i in _non_base(len(tensors), base_index)]
    extra = {"r": params["r"], "alpha": params["alpha"], "overlap": overlap} if plus else {}
    return ram(tensors[base_index], others, epsilon=params["epsilon"], plus=plus, **extra)


def _ramplus_chunking(method, base_index, per_model: PerModel, params, numel: int) -> ChunkedMerge:
    def count(c):
        return ram_overlap_counts(c[base_index], [c[i] for i in _non_base(len(c), base_index)], params["epsilon"])

    return CountChunks(method, base_index, per_model, params, count=count,
                       merge=lambda c, counts: _ram(c, base_index=base_index, per_model=per_model, params=params,
                                                    generator=None, plus=True, overlap=counts))


register(
    MergeMethod(
        name="sce",
        params=(
            ParamSpec("int8_mask", False, False, bool, doc="compute the sign mask in int8 (memory only)"),
            ParamSpec("select_topk", 1.0, False, float, doc="fraction of highest-variance entries kept", ge=0, le=1),
        ),
        base="required",
        random=False,
        fn=_sce,
        reference="Wan et al. 2024, FuseChat, arXiv 2408.07990",
        chunking=_sce_chunking,
        genes=(Gene("select_topk", 0.0, 1.0, 1.0),),
    )
)
register(
    MergeMethod(
        name="multislerp",
        params=(
            ParamSpec("weight", REQUIRED, True, float, non_base=True, doc="weight of each model"),
            ParamSpec("normalize_weights", True, False, bool, doc="divide the weights by their sum"),
            ParamSpec("eps", 1e-8, False, float, doc="norm offset for numerical stability", gt=0),
        ),
        base="optional",
        random=False,
        fn=_multislerp,
        min_non_base=1,
        reference="Goddard, https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        genes=(WEIGHT_GENE,),
        chunking=_gram_chunking(_multislerp, _multislerp_vectors),
    )
)
register(
    MergeMethod(
        name="karcher",
        params=(
            ParamSpec("max_iter", 10, False, int, doc="fixed-point iterations", ge=0),
            ParamSpec("tol", 1e-5, False, float, doc="convergence and zero-norm tolerance", gt=0),
        ),
        base="none",
        random=False,
        fn=_karcher,
        reference="Karcher mean on the hypersphere, arXiv 2603.04972",
        chunking=_gram_chunking(_karcher, lambda c, base_index: list(c)),
    )
)
register(
    MergeMethod(
        name="nearswap",
        params=(ParamSpec("t", REQUIRED, False, float, doc="similarity threshold: |base - other| below it swaps",
                          ge=0),),
        base="required",
        random=False,
        fn=_nearswap,
        min_inputs=2,
        max_inputs=2,
        reference="alchemonaut, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        chunking=elementwise,
        # fine-tunes differ from their base by about 1e-4 to 1e-2 per entry: t searches that scale
        genes=(Gene("t", 0.0, 0.01, 0.001),),
    )
)
register(
    MergeMethod(
        name="arcee_fusion",
        params=(),
        base="required",
        random=False,
        fn=_arcee_fusion,
        min_inputs=2,
        max_inputs=2,
        reference="Arcee Fusion, https://arcee.ai",
        chunking=_arcee_chunking,
    )
)
_RAM_EPSILON = ParamSpec("epsilon", 1e-5, False, float, doc="task-vector magnitude that counts as a contribution",
                         ge=0)
register(
    MergeMethod(
        name="ram",
        params=(_RAM_EPSILON,),
        base="required",
        random=False,
        fn=partial(_ram, plus=False),
        reference="Reinforced Agent Merging, arXiv 2601.13572",
        chunking=elementwise,
    )
)
register(
    MergeMethod(
        name="ramplus_tl",
        params=(
            ParamSpec("r", 0.1, False, float, doc="strength of the unique-entry rescale", ge=0),
            ParamSpec("alpha", 0.2, False, float, doc="cap of the overlap ratio", ge=0),
            _RAM_EPSILON,
        ),
        base="required",
        random=False,
        fn=partial(_ram, plus=True),
        reference="Reinforced Agent Merging Plus (tensor-local), arXiv 2601.13572",
        chunking=_ramplus_chunking,
        genes=(Gene("r", 0.0, 1.0, 0.1), Gene("alpha", 0.0, 1.0, 0.2)),
    )
)
