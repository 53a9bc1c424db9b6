"""Vocabulary-size alignment before merging embeddings and LM heads.

mergekit 0.1.5's merge methods never resize: inputs of different shapes are an error, vocabularies are
aligned by tokenizer handling (``tokenizer_source``) or, when asked (``--unsafe-truncate-embeddings``), by
keeping the common prefix of token ids. This module provides that truncation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from dfsmerge.errors import MergeError

__all__ = ["truncate_vocabulary"]

log = logging.getLogger(__name__)


def truncate_vocabulary(tensors: Sequence[torch.Tensor], axis: int, name: str = "") -> list[torch.Tensor]:
    """Keep the first ``min(vocab sizes)`` slices along ``axis`` of every input (views, no copy).

    Only safe when the kept token ids mean the same in every model.

    Args:
        tensors: the inputs of one vocabulary-indexed tensor (embed_tokens: axis 0; lm_head: axis 0).
        axis: the vocabulary axis.
        name: tensor name for messages.

    Returns:
        The narrowed tensors (unchanged when the sizes already agree).

    Raises:
        MergeError: bad axis, an empty vocabulary, or other dimensions that differ.
    """
    shapes = [tuple(t.shape) for t in tensors]
    if any(not 0 <= axis < t.dim() for t in tensors):
        raise MergeError(f"vocabulary axis {axis} is invalid for tensor {name!r} of shapes {shapes}")
    rest = {s[:axis] + s[axis + 1 :] for s in shapes}
    if len(rest) > 1:
        raise MergeError(
            f"tensor {name!r}: shapes {shapes} differ outside the vocabulary axis {axis}; "
            "merge only models of one architecture and size"
        )
    rows = min(s[axis] for s in shapes)
    if rows == 0:
        raise MergeError(f"tensor {name!r} has an empty vocabulary in shapes {shapes}")
    if all(s[axis] == rows for s in shapes):
        return list(tensors)
    log.warning("truncating the vocabulary of %s from %s to %d rows (unsafe unless ids agree)", name, shapes, rows)
    return [t.narrow(axis, 0, rows) for t in tensors]
