"""The one tokenizer loader: every part that needs a model's ``transformers`` tokenizer (the layer pool, the search
worker, tokenizer merging, loading a model by name, the LLM optimizer's local model, the MoE builder, the GGUF
export and the GGUF import) loads it through :func:`load_tokenizer`, so they agree on how.

Which files a tokenizer is made of, to copy it with a checkpoint: :data:`dfsmerge.io.formats.TOKENIZER_FILES`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dfsmerge.errors import ConfigError

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json")
"""A directory holding one of these has a tokenizer (the vocabulary itself; the other files only configure it)."""


def has_tokenizer(path: str | Path) -> bool:
    """Whether checkpoint directory ``path`` holds tokenizer files."""
    return any((Path(path) / f).is_file() for f in TOKENIZER_MARKERS)


def load_tokenizer(path: str | Path, *, name: str | None = None, fix: str | None = None, **kwargs: Any):
    """The tokenizer saved in ``path`` (``AutoTokenizer.from_pretrained``; ``kwargs`` go to it, e.g.
    ``use_fast=True`` or ``gguf_file=``).

    Args:
        path: a checkpoint (or tokenizer) directory.
        name: the model as the user named it, for the error (default ``path``).
        fix: what the user can do when it does not load; with it any failure becomes a one-line ``ConfigError``.
            Without it, transformers' own exception propagates (for callers that name the failure themselves).

    Raises:
        ConfigError: (with ``fix``) no loadable tokenizer: ``model NAME has no loadable tokenizer (why); FIX``.
    """
    from transformers import AutoTokenizer

    if fix is None:
        return AutoTokenizer.from_pretrained(str(path), **kwargs)
    try:
        return AutoTokenizer.from_pretrained(str(path), **kwargs)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a missing or broken tokenizer
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        why = f"{type(err).__name__}: {first}" if first else type(err).__name__
        raise ConfigError(f"model {str(name if name is not None else path)!r} has no loadable tokenizer ({why}); "
                          f"{fix}") from None
