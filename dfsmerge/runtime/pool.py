"""LayerPool: every source model loaded once and kept resident (docs/design.md section 4).

Models are built on the ``meta`` device from their ``config.json`` and filled from safetensors with
``load_state_dict(..., assign=True)``, so loading allocates each tensor once (gpt-fast's zero-copy loading).
The pool checks that its models can share one layer path (same family, hidden size, heads, KV heads, head dim,
rope, vocabulary and tokenizer) and names the mismatch otherwise. Layers are addressed by
:class:`~dfsmerge.genome.plan.LayerRef`; model A (``base``) supplies tokenizer, final norm, head and rotary
embedding, and by default the input embedding.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfsmerge.arch import Architecture, attention_types, get_architecture, hf_config, layout_reader
from dfsmerge.errors import ArchitectureError, CheckpointError, ConfigError
from dfsmerge.genome.plan import LayerRef, PathPlan
from dfsmerge.io import open_checkpoint
from dfsmerge.io.tokenizer import has_tokenizer, load_tokenizer


@dataclass(frozen=True, slots=True)
class PoolModel:
    """One resident model of the pool."""

    name: str
    source: str  # path or hub id as given
    model: nn.Module  # the HF *ForCausalLM
    config: Any  # its transformers config
    architecture: Architecture
    tokenizer_path: Path | None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layers(self) -> nn.ModuleList:
        return self.architecture.module(self.model, "layers")


def load_model(source: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               attn_implementation: str | None = None, name: str | None = None) -> tuple[nn.Module, Path | None]:
    """Build a ``*ForCausalLM`` on ``meta`` from a checkpoint's config and fill it from its tensors (assign=True).

    Args:
        source: checkpoint directory or hub id (read with :func:`dfsmerge.io.open_checkpoint`).
        device, dtype: where and in which dtype the weights live.
        attn_implementation: transformers attention backend (``sdpa``, ``eager``, ...; None: its default).

    Returns:
        ``(model, tokenizer_path)``; the model is in eval mode.

    Raises:
        CheckpointError: missing or extra tensors, named.
        ArchitectureError: unsupported ``model_type``.
    """
    from accelerate import init_empty_weights  # transformers and accelerate load only when a model does
    from transformers import AutoModelForCausalLM

    reader = open_checkpoint(source, name=name)
    arch = get_architecture(reader.config, source=name or str(source))
    config = hf_config(reader.config, source=name or str(source))
    reader = layout_reader(reader, source=name or str(source))  # fused MoE experts, GPT-NeoX's head: model names
    # Parameters on meta (no allocation); buffers (rotary inv_freq, Gemma's embed scale) are computed for real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    device = torch.device(device)
    state = {}
    names = reader.keys()
    for key in names:
        t = reader.get_tensor(key)
        state[key] = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    del state
    if arch.tied(reader.config) and arch.head in missing:
        model.tie_weights()
        missing = [k for k in missing if k != arch.head]
    if missing or unexpected:
        raise CheckpointError(
            f"model {name or source!r}: checkpoint does not match its config "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}); check config.json and the shards")
    model.to(device)  # buffers computed on cpu
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise CheckpointError(f"model {name or source!r}: tensors {meta[:5]} were not loaded")
    model.eval()
    model.requires_grad_(False)
    tok = Path(reader.tokenizer_path) if getattr(reader, "tokenizer_path", None) else None
    return model, tok


def attention_type(config: Any, index: int) -> str:
    """The attention type of decoder layer ``index`` of a transformers config, as its model computes it."""
    return attention_types(config)[index]


class LayerPool:
    """Resident layers of every source model.

    Args:
        models: model name -> checkpoint path or hub id, in pool order (model A first unless ``base`` says).
        base: model A: supplies tokenizer, final norm, head, rotary embedding (default: the first model).
        device, dtype: where the weights live.
        attn_implementation: transformers attention backend for every model.
        check_tokenizers: compare the tokenizers' vocabularies (needs tokenizer files).

    Raises:
        ArchitectureError: the models cannot share a path (the mismatching field and values are named).
        CheckpointError: a checkpoint is unreadable.
    """

    def __init__(self, models: Mapping[str, str | Path], *, base: str | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 attn_implementation: str | None = None, check_tokenizers: bool = True):
        if not models:
            raise ConfigError("LayerPool: models is empty; give at least one {name: path}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.attn_implementation = attn_implementation
        self.base = base or next(iter(models))
        if self.base not in models:
            raise ConfigError(f"LayerPool: base={self.base!r} is not one of the models {list(models)}")
        self._models: dict[str, PoolModel] = {}
        self._hop_table: dict[LayerRef, tuple[nn.Module, str, int | None]] | None = None
        for name, src in models.items():
            model, tok = load_model(src, device=self.device, dtype=dtype, attn_implementation=attn_implementation,
                                    name=name)
            self._add(name, str(src), model, tok)
        self._tokenizer = None
        if check_tokenizers:
            self._check_tokenizers()

    # ---------------------------------------------------------------- building
    def _add(self, name: str, source: str, model: nn.Module, tokenizer_path: Path | None) -> None:
        cfg = model.config
        arch = get_architecture(cfg.to_dict(), source=name)
        pm = PoolModel(name, source, model, cfg, arch, tokenizer_path)
        if self._models:
            check_compatible(self._models[self.base] if self.base in self._models
                             else next(iter(self._models.values())), pm)
        self._models[name] = pm
        self._hop_table = None

    def add_model(self, name: str, model: nn.Module, *, source: str = "", tokenizer_path: Path | None = None,
                  as_base: bool = False) -> None:
        """Add an already resident model (e.g. the PS-merged buffers) to the pool.

        Args:
            as_base: make it model A (joint/staged PS+DFS: the PS-merged model supplies head and norm).

        Raises:
            ArchitectureError: incompatible with the pool. ConfigError: the name is taken.
        """
        if name in self._models:
            raise ConfigError(f"LayerPool.add_model: name {name!r} is already in the pool; choose another")
        if tokenizer_path is None and self.base in self._models:
            tokenizer_path = self._models[self.base].tokenizer_path
        self._add(name, source or name, model, tokenizer_path)
        if as_base:
            self.base = name
            self._models = {name: self._models[name], **{k: v for k, v in self._models.items() if k != name}}

    def _check_tokenizers(self) -> None:
        vocabs = {}
        for pm in self._models.values():
            if pm.tokenizer_path is None or not has_tokenizer(pm.tokenizer_path):
                continue
            vocabs[pm.name] = load_tokenizer(pm.tokenizer_path).get_vocab()
        if not vocabs:
            return
        ref_name, ref = next(iter(vocabs.items()))
        for name, vocab in vocabs.items():
            if vocab != ref:
                diff = sorted(set(vocab.items()) ^ set(ref.items()))[:3]
                raise ArchitectureError(
                    f"tokenizers of models {ref_name!r} and {name!r} differ (e.g. {diff}); a layer path reads "
                    "model A's token ids, so every model needs the same vocabulary")

    # ---------------------------------------------------------------- access
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._models)

    def __contains__(self, name: str) -> bool:
        return name in self._models

    def __getitem__(self, name: str) -> PoolModel:
        try:
            return self._models[name]
        except KeyError:
            raise ConfigError(f"model {name!r} is not in the layer pool; use one of {list(self._models)}") from None

    def __iter__(self) -> Iterator[PoolModel]:
        return iter(self._models.values())

    def num_layers(self, name: str | None = None) -> int | dict[str, int]:
        """Layers of model ``name``, or a dict of all models' layer counts."""
        if name is None:
            return {k: v.num_layers for k, v in self._models.items()}
        return self[name].num_layers

    def refs(self) -> list[LayerRef]:
        """Every pool layer in pool order."""
        return [LayerRef(m.name, i) for m in self._models.values() for i in range(m.num_layers)]

    def layer(self, ref: LayerRef) -> nn.Module:
        """The resident decoder layer module of ``ref``.

        Raises:
            ConfigError: unknown model or index out of range.
        """
        pm = self[ref.model]
        if not 0 <= ref.index < pm.num_layers:
            raise ConfigError(f"layer {ref} is out of range: model {ref.model!r} has {pm.num_layers} layers")
        return pm.layers[ref.index]

    def hop_table(self) -> dict[LayerRef, tuple[nn.Module, str, int | None]]:
        """LayerRef -> (module, attention type, sliding window or None) for every pool layer (cached)."""
        if self._hop_table is None:
            table = {}
            for ref in self.refs():
                kind = self.attention_type(ref)
                table[ref] = (self.layer(ref), kind, self.sliding_window(ref) if kind == "sliding_attention" else None)
            self._hop_table = table
        return self._hop_table

    def attention_type(self, ref: LayerRef) -> str:
        return attention_type(self[ref.model].config, ref.index)

    def sliding_window(self, ref: LayerRef) -> int | None:
        return getattr(self[ref.model].config, "sliding_window", None)

    @property
    def config(self):
        """Model A's transformers config."""
        return self[self.base].config

    @property
    def architecture(self) -> Architecture:
        return self[self.base].architecture

    def embedding(self, name: str | None = None) -> nn.Module:
        """The input embedding module of ``name`` (default model A); Gemma's includes its sqrt(hidden) scale."""
        return self[name or self.base].model.get_input_embeddings()

    def position_embedding(self, name: str | None = None) -> nn.Module | None:
        """Learned absolute position embedding of ``name`` (GPT-2's ``wpe``), or None."""
        pm = self[name or self.base]
        return pm.architecture.module(pm.model, "position")

    def final_norm(self, name: str | None = None) -> nn.Module:
        pm = self[name or self.base]
        return pm.architecture.module(pm.model, "final_norm")

    def head(self, name: str | None = None) -> nn.Module:
        return self[name or self.base].model.get_output_embeddings()

    def rotary(self, name: str | None = None) -> nn.Module | None:
        """The rotary embedding of ``name`` (None for families without one, e.g. GPT-2)."""
        pm = self[name or self.base]
        return pm.architecture.module(pm.model, "rotary")

    @property
    def tokenizer(self):
        """Model A's tokenizer (loaded on first use).

        Raises:
            CheckpointError: model A has no tokenizer files.
        """
        if self._tokenizer is None:
            path = self[self.base].tokenizer_path
            if path is None or not has_tokenizer(path):
                raise CheckpointError(f"model {self.base!r} has no tokenizer files at {path}; add tokenizer.json")
            self._tokenizer = load_tokenizer(path)
        return self._tokenizer

    def model_paths(self) -> dict[str, str]:
        return {k: v.source for k, v in self._models.items()}

    def validate_plan(self, plan: PathPlan) -> PathPlan:
        """Check that every step of ``plan`` names a pool layer. Raises ConfigError naming the step."""
        counts = {k: v.num_layers for k, v in self._models.items()}
        return PathPlan(plan.steps, models=dict(plan.models) or self.model_paths(), base=plan.base,
                        embed=plan.embed).validate(counts)


def check_compatible(a: Any, b: Any) -> None:
    """Whether two models can share one layer path, from their transformers configs alone (``a.name``,
    ``a.config``: a :class:`PoolModel` or anything with those two attributes, so searches can check config files
    before loading any weight).

    Raises:
        ArchitectureError: the first difference, naming both models and the values.
    """
    if a.config.model_type != b.config.model_type:
        raise ArchitectureError(
            f"models {a.name!r} (model_type={a.config.model_type!r}) and {b.name!r} "
            f"(model_type={b.config.model_type!r}) are different families; a layer path needs one family")
    for f in ("hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        va, vb = getattr(a.config, f, None), getattr(b.config, f, None)
        if va != vb:
            raise ArchitectureError(f"models {a.name!r} and {b.name!r} differ in {f}: {va} vs {vb}; "
                                    "a layer path needs equal hidden size, heads and vocabulary")
    ha, hb = _head_dim(a.config), _head_dim(b.config)
    if ha != hb:
        raise ArchitectureError(f"models {a.name!r} and {b.name!r} differ in head_dim: {ha} vs {hb}")
    ra, rb = _rope(a.config), _rope(b.config)
    if ra != rb:
        raise ArchitectureError(f"models {a.name!r} and {b.name!r} differ in rope settings: {ra} vs {rb}; "
                                "model A's rotary embedding would misplace the other's positions")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope(config) -> Any:
    params = getattr(config, "rope_parameters", None)
    if params is not None:
        return dict(params)
    return (getattr(config, "rope_theta", None), getattr(config, "rope_scaling", None))
