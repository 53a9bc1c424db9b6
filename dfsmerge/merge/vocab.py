"""Vocabulary handling for embeddings and LM heads: the output tokenizer and per-token row alignment.

mergekit 0.1.5's merge methods never resize: inputs of different shapes are an error. Vocabularies are aligned
by tokenizer handling (``tokenizer_source`` / ``tokenizer:``), which this module implements with mergekit's
semantics: :func:`build_vocabulary` builds the output tokenizer (``base``: the base model's, stripped of ids at or
beyond its ``vocab_size``; ``union``: the base's plus every other model's tokens, plain ones first, then added
ones; a model: that model's) and maps each output token to its row in each model; :func:`align_rows` gives every
model a tensor indexed by the output vocabulary, rows for tokens a model lacks filled as mergekit fills them (see
its docstring), so the merge method then runs on aligned rows. Or, when asked (``--unsafe-truncate-embeddings``),
the common prefix of token ids is kept (:func:`truncate_vocabulary`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dfsmerge.errors import ConfigError, MergeError

__all__ = ["VocabularyPlan", "align_rows", "build_vocabulary", "truncate_vocabulary"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VocabularyPlan:
    """The output vocabulary and, per model, the row of each output token (``-1``: the model lacks it).

    Attributes:
        tokenizer: the output ``transformers`` tokenizer (saved with the merged model).
        vocab: output token -> id (ids ``0 .. len(vocab) - 1``).
        rows: output vocabulary size after ``pad_to_multiple_of``.
        index: model -> ``(len(vocab),)`` long tensor of source rows, ``-1`` where the model lacks the token.
        model_vocabs: model -> its tokenizer's vocabulary (for ``model_token`` sources given by token).
        tokens: the recipe's per-token settings (``tokenizer.tokens``), by token.
    """

    tokenizer: Any
    vocab: dict[str, int]
    rows: int
    index: dict[str, torch.Tensor]
    model_vocabs: dict[str, dict[str, int]]
    tokens: Mapping[str, Any]


def _model_tokenizer(path: str | Path, model: str):
    from dfsmerge.io.tokenizer import load_tokenizer

    return load_tokenizer(path, name=model, use_fast=True, fix="tokenizer merging needs every model's tokenizer: "
                          "add its tokenizer files, or drop tokenizer_source/tokenizer:")


def _stripped_tokenizer(path: str | Path, model: str, vocab_size: int | None):
    """The model's tokenizer without the tokens whose ids are ``>= vocab_size`` (rows the model does not have)."""
    from tokenizers import Tokenizer

    tok = _model_tokenizer(path, model)
    size = vocab_size or len(tok.get_vocab())
    unused = {t for t, i in tok.get_vocab().items() if i >= size}
    if not unused:
        return tok
    data = json.loads(tok.backend_tokenizer.to_str())
    kind = data["model"]["type"]
    if kind not in ("BPE", "WordLevel"):
        raise ConfigError(f"model {model!r}: its tokenizer has {len(unused)} tokens beyond vocab_size={size} and is "
                          f"of type {kind}; only BPE and WordLevel tokenizers can be stripped for a tokenizer merge")
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < size]
    for t in unused:
        data["model"]["vocab"].pop(t, None)
    if kind == "BPE":
        data["model"]["merges"] = [m for m in data["model"]["merges"]
                                   if not set(m.split(" ") if isinstance(m, str) else m) & unused]
    tok._tokenizer = Tokenizer.from_str(json.dumps(data))
    return tok


def _union_tokenizer(base_tok, toks: Mapping[str, Any], sizes: Mapping[str, int | None]):
    """The base tokenizer plus, in model order, every other plain token, then every added token (first setting
    wins), each only where its id is a row of its model."""
    import tempfile

    from dfsmerge.io.tokenizer import load_tokenizer

    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for model, tok in toks.items():
        size = sizes.get(model) or tok.vocab_size
        decoder = tok.added_tokens_decoder
        added_contents = {info.content for info in decoder.values()}
        for t, i in tok.get_vocab().items():
            if i < size and t not in added_contents:
                plain.setdefault(t, None)
        for i, info in decoder.items():
            if i >= size:
                continue
            if info.content in added and added[info.content] != info:
                log.warning("token %r is added with different settings by several models; using the first",
                            info.content)
            added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as tmp:  # a copy, so the base model's tokenizer is left as loaded
        base_tok.save_pretrained(tmp)
        out = load_tokenizer(tmp, use_fast=True)
    base_vocab = base_tok.get_vocab()
    for t in plain:
        if t not in added and t not in base_vocab:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


def build_vocabulary(source: str, *, models: Sequence[str], base: str, paths: Mapping[str, str | Path],
                     vocab_sizes: Mapping[str, int | None], tokens: Mapping[str, Any] | None = None,
                     pad_to_multiple_of: int | None = None) -> VocabularyPlan:
    """The output tokenizer and every model's row for each output token, as mergekit 0.1.5 builds them.

    Args:
        source: ``"base"``, ``"union"`` or a model (``model:<name>`` or the name; any checkpoint path with a
            tokenizer, as mergekit).
        models: every model of the recipe, in recipe order (the union adds their tokens in this order).
        base: the base model (the first model when the recipe has none).
        paths: model -> local checkpoint directory (``source`` may add one more).
        vocab_sizes: model -> ``config.json``'s ``vocab_size`` (rows of its embedding); tokenizer ids at or beyond
            it are not rows.
        tokens: ``tokenizer.tokens``; tokens not yet in the output vocabulary are added to it.
        pad_to_multiple_of: output rows rounded up to a multiple of this.

    Returns:
        A :class:`VocabularyPlan`.

    Raises:
        ConfigError: a model without a loadable tokenizer, a ``model_token`` source naming a token its model
            lacks, a token whose source model lacks it, an unstrippable tokenizer.
    """
    tokens = dict(tokens or {})
    base_tok = _stripped_tokenizer(paths[base], base, vocab_sizes.get(base))
    toks = {base: base_tok}
    for m in models:
        if m != base:
            toks[m] = _model_tokenizer(paths[m], m)
    if source == "base":
        out = base_tok
    elif source == "union":
        out = _union_tokenizer(base_tok, toks, vocab_sizes)
    else:
        name = source.removeprefix("model:")
        out = _model_tokenizer(paths.get(name, name), name)
    existing = set(out.get_vocab())
    for t in tokens:
        if t not in existing:
            out.add_tokens(t)
            existing.add(t)
    vocab = out.get_vocab()
    rows = len(vocab)
    if pad_to_multiple_of and rows % pad_to_multiple_of:
        rows += pad_to_multiple_of - rows % pad_to_multiple_of
    model_vocabs = {m: tok.get_vocab() for m, tok in toks.items()}
    index = {}
    for m in models:
        mv, size = model_vocabs[m], vocab_sizes.get(m) or len(model_vocabs[m])
        idx = torch.full((len(vocab),), -1, dtype=torch.long)
        for t, i in vocab.items():
            j = mv.get(t, -1)
            if j >= size:
                log.warning("model %s: token %r has id %d beyond its vocab_size %d (padding?)", m, t, j, size)
                j = -1
            idx[i] = j
        index[m] = idx
    plan = VocabularyPlan(tokenizer=out, vocab=vocab, rows=rows, index=index, model_vocabs=model_vocabs,
                          tokens=tokens)
    _check_token_sources(plan, vocab_sizes)
    return plan


def _source_model(setting: Any) -> str | None:
    return setting.source_model() if setting is not None and setting.source is not None else None


def _check_token_sources(plan: VocabularyPlan, vocab_sizes: Mapping[str, int | None]) -> None:
    """Every per-token source that names a model row exists there (checked before any tensor is merged)."""
    for token, setting in plan.tokens.items():
        model = _source_model(setting)
        if model is None:
            continue
        src = setting.source
        where = f"tokenizer.tokens[{token!r}].source"
        if getattr(src, "kind", None) == "model_token":
            tid = src.token_id if src.token_id is not None else plan.model_vocabs[model].get(src.token, -1)
            size = vocab_sizes.get(model) or len(plan.model_vocabs[model])
            if not 0 <= tid < size:
                shown = f"token_id={src.token_id}" if src.token_id is not None else f"token={src.token!r}"
                raise ConfigError(f"{where}: {shown} is not a row of model {model!r} (vocab_size {size}); name a "
                                  "token of that model")
        elif plan.index[model][plan.vocab[token]] < 0:
            raise ConfigError(f"{where}={model!r}: that model has no token {token!r}; name a model that has it, "
                              "or use {kind: model_token, model, token} or {kind: zero}")


def align_rows(tensors: Mapping[str, torch.Tensor], plan: VocabularyPlan, *, base: str | None,
               name: str = "") -> dict[str, torch.Tensor]:
    """Each model's vocabulary-indexed tensor (vocabulary on axis 0) re-indexed by the output vocabulary.

    A model's row for an output token is its own row for that token, unless it lacks the token or the token's
    setting has ``force``; then the token's default row, the same for every model: from the token's setting
    (``{kind: zero}``; a model's row of the token; ``model_token``: a model's row of another token), else, for a
    token without setting: the row of the only model that has it, zero when none has it, the base model's when
    it is among ``tensors`` and has it, else the mean over the models that have it. Padding rows (beyond the
    vocabulary, from ``pad_to_multiple_of``) are each model's mean row. As mergekit 0.1.5's
    ``PermutedVocabulary``.

    Args:
        tensors: model -> tensor ``(V_model, *S)``, in merge-input order.
        plan: from :func:`build_vocabulary`.
        base: the base model of this tensor's merge, or None.
        name: tensor name for messages.

    Returns:
        model -> ``(plan.rows, *S)`` tensors in the promoted dtype of the inputs.

    Raises:
        MergeError: shapes that differ outside the vocabulary axis; a token source model missing from the inputs.
    """
    models = list(tensors)
    shapes = [tuple(t.shape) for t in tensors.values()]
    if len({s[1:] for s in shapes}) > 1 or any(len(s) == 0 or s[0] == 0 for s in shapes):
        raise MergeError(f"tensor {name!r}: shapes {shapes} differ outside the vocabulary axis 0 (or are empty); "
                         "merge only models of one architecture and size")
    first = tensors[models[0]]
    dtype = first.dtype
    for t in tensors.values():
        dtype = torch.promote_types(dtype, t.dtype)
    n = len(plan.vocab)
    index = torch.stack([plan.index[m] for m in models])  # (M, V_out)
    present = index >= 0
    forced = torch.zeros(n, dtype=torch.bool)
    for token, setting in plan.tokens.items():
        if setting.force:
            forced[plan.vocab[token]] = True
    token_of = {i: t for t, i in plan.vocab.items()}
    defaults: dict[int, torch.Tensor] = {}
    for tid in torch.nonzero(forced | ~present.all(0)).flatten().tolist():  # tokens some model lacks, or forced
        token = token_of[tid]
        defaults[tid] = _default_row(token, tid, tensors, plan, present[:, tid].tolist(), models, base, dtype, name)
    out = {}
    for k, m in enumerate(models):
        src = tensors[m].to(dtype)
        new = torch.zeros((plan.rows, *src.shape[1:]), dtype=dtype, device=src.device)  # (V_pad, *S)
        own = present[k] & ~forced
        ids = torch.nonzero(own).flatten()
        new[ids.to(src.device)] = src[index[k, ids].to(src.device)]
        for tid, row in defaults.items():
            if not own[tid]:
                new[tid] = row
        if plan.rows > n:
            new[n:] = new[:n].mean(dim=0)  # new rows at the mean embedding (Hewitt, "Initializing new word embeddings")
        out[m] = new
    return out


def _default_row(token: str, tid: int, tensors: Mapping[str, torch.Tensor], plan: VocabularyPlan,
                 has: list[bool], models: list[str], base: str | None, dtype: torch.dtype, name: str) -> torch.Tensor:
    first = tensors[models[0]]
    setting = plan.tokens.get(token)
    if setting is None:
        if sum(has) == 0:
            log.warning("token %r is in no model; its rows are zero", token)
            return first.new_zeros(first.shape[1:], dtype=dtype)
        if sum(has) == 1 or (base in models and has[models.index(base)]):
            donor = models[has.index(True)] if sum(has) == 1 else base
            return tensors[donor][plan.index[donor][tid]].to(dtype)
        row = torch.zeros(first.shape[1:], dtype=dtype, device=first.device)
        for m, h in zip(models, has, strict=True):
            if h:
                row = row + tensors[m][plan.index[m][tid]]
        return row / sum(has)
    model = _source_model(setting)
    if model is None:
        if setting.source is None:
            raise MergeError(f"tokenizer.tokens[{token!r}] has no source but needs one (some model lacks the token "
                             "or force is set); give source: <model>, {kind: zero} or {kind: model_token, ...}")
        return first.new_zeros(first.shape[1:])
    if model not in tensors:
        raise MergeError(f"tokenizer.tokens[{token!r}].source={model!r}, but tensor {name!r} is not merged from "
                         f"that model (its inputs: {models}); name one of them")
    src = setting.source
    if getattr(src, "kind", None) == "model_token":
        row = src.token_id if src.token_id is not None else plan.model_vocabs[model][src.token]
    else:
        row = int(plan.index[model][tid])
    return tensors[model][row]


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
