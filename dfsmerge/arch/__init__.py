"""Decoder architectures as data: one place answers "what is layer i of this model" for the pool, the runtime, the
merge recipes and the export.

:mod:`~dfsmerge.arch.layout` reads a family's layout from transformers (:func:`get_architecture`, by ``config.json``'s
``model_type``, never a path); :mod:`~dfsmerge.arch.families` declares what transformers cannot tell (the tensors
that end each residual branch, norm conventions, logit transforms).
"""

from dfsmerge.arch.families import FamilyFacts
from dfsmerge.arch.layout import (
    ATTENTION_TYPES,
    Architecture,
    apply_logit_ops,
    attention_types,
    get_architecture,
    hf_config,
    layout_reader,
    path_layer_config,
    supported_model_types,
)

__all__ = ["ATTENTION_TYPES", "Architecture", "FamilyFacts", "apply_logit_ops", "attention_types",
           "get_architecture", "hf_config", "layout_reader", "path_layer_config", "supported_model_types"]
