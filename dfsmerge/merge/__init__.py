"""Merge methods as pure functions over tensors, registered by their mergekit 0.1.5 names.

Use :func:`merge_tensor` (validation, defaults, dtype promotion, seeding) or the building blocks directly:
:mod:`~dfsmerge.merge.sparsify` (magnitude / random / breadcrumbs / DELLA masks), :mod:`~dfsmerge.merge.gta`
(sign consensus, disjoint merge, generalized task arithmetic), :func:`slerp`, :func:`nuslerp`,
:func:`linear`, :func:`model_stock`, :func:`sce`, :func:`multislerp`, :func:`karcher_mean`, :func:`nearswap`,
:func:`arcee_fusion`, :func:`ram`.

Each method is one :class:`MergeMethod` in the registry: its parameters (defaults, ranges, per-model or global),
whether it needs a base model, the genes it gives a PS genome and the fused kernel that implements it.
"""

from dfsmerge.merge.arcee_fusion import arcee_fusion
from dfsmerge.merge.gta import Consensus, disjoint_merge, generalized_task_arithmetic, sign_consensus
from dfsmerge.merge.karcher import karcher_mean
from dfsmerge.merge.linear import linear, passthrough
from dfsmerge.merge.methods import GTA_VARIANTS, GTAVariant  # importing registers the built-in methods
from dfsmerge.merge.model_stock import model_stock
from dfsmerge.merge.multislerp import multislerp
from dfsmerge.merge.nearswap import nearswap
from dfsmerge.merge.ram import ram
from dfsmerge.merge.registry import (
    REQUIRED,
    Gene,
    MergeMethod,
    ParamSpec,
    get_method,
    make_generator,
    merge_tensor,
    register,
    registered_methods,
    resolve_params,
    tensor_seed,
)
from dfsmerge.merge.sce import sce
from dfsmerge.merge.slerp import nuslerp, slerp
from dfsmerge.merge.sparsify import Sparsification, sparsify
from dfsmerge.merge.vocab import truncate_vocabulary

__all__ = [
    "GTA_VARIANTS",
    "REQUIRED",
    "Consensus",
    "GTAVariant",
    "Gene",
    "MergeMethod",
    "ParamSpec",
    "Sparsification",
    "arcee_fusion",
    "disjoint_merge",
    "generalized_task_arithmetic",
    "get_method",
    "karcher_mean",
    "linear",
    "make_generator",
    "merge_tensor",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "passthrough",
    "ram",
    "register",
    "registered_methods",
    "resolve_params",
    "sce",
    "sign_consensus",
    "slerp",
    "sparsify",
    "tensor_seed",
    "truncate_vocabulary",
]
