"""Merge methods as pure functions over tensors, registered by their mergekit 0.1.5 names.

Use :func:`merge_tensor` (validation, defaults, dtype promotion, seeding) or the building blocks directly:
:mod:`~dfsmerge.merge.sparsify` (magnitude / random / breadcrumbs / DELLA masks), :mod:`~dfsmerge.merge.gta`
(sign consensus, disjoint merge, generalized task arithmetic), :func:`slerp`, :func:`nuslerp`,
:func:`linear`, :func:`model_stock`.
"""

from dfsmerge.merge.gta import Consensus, disjoint_merge, generalized_task_arithmetic, sign_consensus
from dfsmerge.merge.linear import linear, passthrough
from dfsmerge.merge.methods import GTA_VARIANTS, GTAVariant  # importing registers the built-in methods
from dfsmerge.merge.model_stock import model_stock
from dfsmerge.merge.registry import (
    REQUIRED,
    MergeMethod,
    ParamSpec,
    get_method,
    make_generator,
    merge_tensor,
    register,
    registered_methods,
    tensor_seed,
)
from dfsmerge.merge.slerp import nuslerp, slerp
from dfsmerge.merge.sparsify import Sparsification, sparsify
from dfsmerge.merge.vocab import truncate_vocabulary

__all__ = [
    "GTA_VARIANTS",
    "REQUIRED",
    "Consensus",
    "GTAVariant",
    "MergeMethod",
    "ParamSpec",
    "Sparsification",
    "disjoint_merge",
    "generalized_task_arithmetic",
    "get_method",
    "linear",
    "make_generator",
    "merge_tensor",
    "model_stock",
    "nuslerp",
    "passthrough",
    "register",
    "registered_methods",
    "sign_consensus",
    "slerp",
    "sparsify",
    "tensor_seed",
    "truncate_vocabulary",
]
