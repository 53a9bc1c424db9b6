"""Decoder layouts read from transformers, with the facts declared per family (``arch/`` in docs/architecture.md).

One place answers "what is layer i of this model" for the pool, the runtime, the merge recipes and the export.
For a ``config.json``, :func:`get_architecture` builds the family's own ``*ForCausalLM`` on the ``meta`` device
(no memory) and reads from it: the decoder-layer list, the tensors before and after the layers, each layer's
tensor names, whether the head is tied to the embedding, each layer's attention type as transformers computes
it (``config.layer_types``), the rotary module and whether it takes a layer type (Gemma 3's local and global
bases). What the modules cannot tell (which tensors end each residual branch, norm conventions, logit transforms)
is declared in :mod:`dfsmerge.arch.families`. A family is chosen by ``config.json``'s ``model_type``, never a path.
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from dfsmerge.arch.families import FAMILIES, FamilyFacts
from dfsmerge.errors import ArchitectureError

ATTENTION_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


@dataclass(frozen=True, slots=True)
class Architecture:
    """Layout of one decoder family for one config (discovered from transformers; see the module docstring).

    Attributes:
        model_type: ``config.json``'s ``model_type``.
        pre_weights: tensors before the first layer (embedding, GPT-2's position embedding).
        layer_templates: per-layer tensor names with ``{}`` for the layer index, present in every layer;
            ``optional_layer_templates``: present in some layers only (e.g. MoE blocks on some layers).
        post_weights: tensors after the last layer (final norm, head; the head even when tied).
        embed, head, final_norm: the embedding's, the head's and the final norm's weight names.
        residual_outputs: per-layer templates of the tensors that end each residual branch; a DFS step scale is
            folded by dividing them by the cumulative scale (``residual_kind="linear"``: projection weight and bias;
            ``"norm"``: a post-norm gain ``norm_offset + w``; ``None``: the family cannot fold scales).
        norm_offset: 1.0 for families whose RMSNorm multiplies by ``1 + w`` (Gemma), else 0.0.
        layer_prefix: ``"model.layers.{}."`` (GPT-2: ``"transformer.h.{}."``).
        num_layers_key: the ``config.json`` key of the layer count (GPT-2: ``n_layer``).
        modules: dotted module paths in the ``*ForCausalLM``: ``layers``, ``embed``, ``final_norm``, ``head``,
            ``rotary`` (absent without rotary embedding), ``position`` (GPT-2's ``wpe``).
        rotary_takes_type: the rotary module's forward takes a layer type (one base per attention type).
        tied_default: whether the head is tied when ``config.json`` does not say.
        attention_types: each layer's attention type for the config the architecture was read from.
        per_layer: per-layer config values (``layer_types``, SmolLM3's ``no_rope_layers``) of that config.
        facts: the family's declared facts.
        cache_arg: the decoder layer's keyword for the KV cache (``cache``; GPT-NeoX: ``layer_past``).
        converted: transformers converts the checkpoint's tensors on load (renamed or fused MoE experts). Every
            name here is then the model layout's (mergekit 0.1.5 merges in that layout too); :func:`layout_reader`
            reads a checkpoint in it. ``checkpoint_sources`` maps each converted name to its checkpoint names.
    """

    model_type: str
    pre_weights: tuple[str, ...]
    layer_templates: tuple[str, ...]
    post_weights: tuple[str, ...]
    embed: str
    head: str
    final_norm: str
    residual_outputs: tuple[str, ...]
    residual_kind: Literal["linear", "norm"] | None = "linear"
    optional_layer_templates: tuple[str, ...] = ()
    norm_offset: float = 0.0
    layer_prefix: str = "model.layers.{}."
    num_layers_key: str = "num_hidden_layers"
    modules: Mapping[str, str] = field(default_factory=dict)
    rotary_takes_type: bool = False
    tied_default: bool = False
    attention_types: tuple[str, ...] = ()
    per_layer: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    layer_names: tuple[tuple[str, ...], ...] = ()
    facts: FamilyFacts | None = None
    converted: bool = False
    cache_arg: str = "cache"
    checkpoint_sources: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    meta_model: Any = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------ tensor names
    def layer_tensor_names(self, index: int, config: Mapping[str, Any] | None = None) -> list[str]:
        """Names of layer ``index``'s tensors (as read from transformers for this config)."""
        if 0 <= index < len(self.layer_names):
            return list(self.layer_names[index])
        return [t.format(index) for t in self.layer_templates]

    def tied(self, config: Mapping[str, Any]) -> bool:
        """Whether the head shares the embedding's weight for this config."""
        return bool(config.get("tie_word_embeddings", self.tied_default))

    def pre_tensor_names(self, config: Mapping[str, Any] | None = None) -> list[str]:
        return list(self.pre_weights)

    def post_tensor_names(self, config: Mapping[str, Any]) -> list[str]:
        """Tensors after the layers that a checkpoint of ``config`` stores (no head when it is tied)."""
        return [n for n in self.post_weights if not (n == self.head and self.tied(config))]

    def num_layers(self, config: Mapping[str, Any]) -> int:
        return int(config[self.num_layers_key])

    def all_tensor_names(self, config: Mapping[str, Any]) -> list[str]:
        """Every tensor name a checkpoint of this config holds, in model order."""
        names = self.pre_tensor_names(config)
        for i in range(self.num_layers(config)):
            names += self.layer_tensor_names(i, config)
        return names + self.post_tensor_names(config)

    def residual_output_names(self, index: int, config: Mapping[str, Any] | None = None) -> list[str]:
        """Tensors of layer ``index`` that end a residual branch (those the layer has)."""
        present = set(self.layer_tensor_names(index, config))
        return [n for n in (t.format(index) for t in self.residual_outputs) if n in present]

    def layer_index(self, tensor_name: str) -> int | None:
        """The layer index of a per-layer tensor name, or None for pre/post tensors."""
        head, _, _ = self.layer_prefix.partition("{}")
        if not tensor_name.startswith(head):
            return None
        idx, dot, _ = tensor_name[len(head):].partition(".")
        return int(idx) if dot and idx.isdigit() else None

    @property
    def residual_filters(self) -> tuple[str, ...]:
        """mergekit ``filter`` substrings that select exactly the residual-branch outputs (``self_attn.o_proj``,
        ``mlp.experts.down_proj``; a bare ``dense`` would also catch GPT-NeoX's ``mlp.dense_h_to_4h``)."""
        out: list[str] = []
        for t in self.residual_outputs:
            rel = t.split("{}.", 1)[-1]
            for suffix in (".weight", ".bias"):
                rel = rel.removesuffix(suffix)
            if rel not in out:
                out.append(rel)
        return tuple(out)

    # ------------------------------------------------------------ per-layer behaviour
    @property
    def foldable(self) -> bool:
        """Whether DFS step scales fold into weights (pre-norm or normalised branch outputs)."""
        return self.residual_kind is not None

    def logit_ops(self, config: Any) -> tuple[tuple[str, float], ...]:
        """``(op, value)`` the ``*ForCausalLM`` applies to the head's output for a transformers ``config``."""
        out = []
        for op, key in self.facts.logits if self.facts else ():
            v = getattr(config, key, None)
            if v is not None:
                out.append((op, float(v)))
        return tuple(out)

    def embed_multiplier(self, config: Any) -> float:
        key = self.facts.embed_multiplier if self.facts else None
        v = getattr(config, key, None) if key else None
        return 1.0 if v is None else float(v)

    def has_experts(self, index: int) -> bool:
        """Whether layer ``index`` holds mixture-of-experts tensors (MoE families may have dense layers)."""
        patterns = [f"{self.layer_prefix.format(index)}{p}.*" for p in (self.facts.experts if self.facts else ())]
        return any(fnmatch.fnmatchcase(n, p) for n in self.layer_tensor_names(index) for p in patterns)

    def module(self, model: Any, role: str) -> Any:
        """The submodule of a ``*ForCausalLM`` with ``role`` (``layers``, ``embed``, ``final_norm``, ``head``,
        ``rotary``, ``position``), or None when the family has none."""
        path = self.modules.get(role)
        return None if path is None else model.get_submodule(path)


class LayoutReader:
    """A checkpoint reader seen in the model layout of a converted family (:attr:`Architecture.converted`).

    ``get_tensor`` of a model-layout name gathers its checkpoint tensors the way transformers' loader fuses them:
    the inverse conversion (``revert_weight_conversion``) applied to an index probe says where each checkpoint
    element lands, so any rename, split, stack or concatenation is inverted exactly. Other calls pass through.
    """

    def __init__(self, reader: Any, arch: Architecture):
        self._reader = reader
        self._arch = arch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)

    def _sources(self, name: str) -> tuple[str, ...]:
        return self._arch.checkpoint_sources.get(name, (name,))

    def __contains__(self, name: str) -> bool:
        return all(s in self._reader for s in self._sources(name))

    def keys(self) -> list[str]:
        names = list(self._arch.shapes) or list(self._reader.keys())
        return [n for n in names if n in self]

    def get_dtype(self, name: str):
        return self._reader.get_dtype(self._sources(name)[0])

    def get_shape(self, name: str) -> tuple[int, ...]:
        if name in self._arch.checkpoint_sources:
            return self._arch.shapes[name]
        return self._reader.get_shape(name)

    def get_tensor(self, name: str):
        import torch
        from transformers.core_model_loading import revert_weight_conversion

        sources = self._sources(name)
        if sources == (name,):
            return self._reader.get_tensor(name)
        shape = self._arch.shapes[name]
        n = math.prod(shape)
        probe = torch.arange(n, dtype=torch.int32 if n < 2**31 else torch.int64).view(shape)
        where = revert_weight_conversion(self._arch.meta_model, {name: probe})  # checkpoint name -> indices
        out = None
        for src, idx in where.items():
            t = self._reader.get_tensor(src)
            if out is None:
                out = torch.empty(n, dtype=t.dtype)
            out[idx.reshape(-1).long()] = t.reshape(-1)
        return out.view(shape)


def layout_reader(reader: Any, *, source: str = "") -> Any:
    """``reader`` in its family's model layout (itself unless transformers converts the family's tensors)."""
    arch = get_architecture(reader.config, source=source)
    return LayoutReader(reader, arch) if arch.converted else reader


def apply_logit_ops(logits, ops: tuple[tuple[str, float], ...]):
    """Apply a family's logit transforms (:meth:`Architecture.logit_ops`) as its ``*ForCausalLM`` does."""
    import torch

    for op, v in ops:
        if op == "softcap":
            logits = torch.tanh(logits / v) * v
        elif op == "mul":
            logits = logits * v
        elif op == "div":
            logits = logits / v
    return logits


def attention_types(config: Any) -> list[str]:
    """Each decoder layer's attention type for a transformers config, as its model builds the masks.

    ``config.layer_types`` when transformers fills it in (Qwen2 with ``use_sliding_window`` and
    ``max_window_layers``, Gemma's patterns); else every layer slides when ``sliding_window`` is set (Mistral,
    Phi-3: their models pick the sliding mask on that alone).
    """
    n = int(config.num_hidden_layers)
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)[:n]
    kind = "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"
    return [kind] * n


def path_layer_config(configs: Mapping[str, Mapping[str, Any]], refs: Sequence[tuple[str, int]]) -> dict[str, Any]:
    """The per-layer config of a checkpoint whose layer ``k`` is layer ``refs[k] = (model, index)``.

    Each layer keeps the values transformers computed for it in its own model (``layer_types``, SmolLM3's
    ``no_rope_layers``), so vanilla transformers rebuilds its masks and rotary base; MoE families also get the
    list of dense layers (``mlp_only_layers``, with ``decoder_sparse_step: 1``) from which layers hold experts.

    Args:
        configs: model name -> ``config.json`` dict.
        refs: ``(model name, layer index)`` per output layer.
    """
    if not refs:
        return {}
    archs = {m: get_architecture(configs[m], source=m) for m in dict.fromkeys(m for m, _ in refs)}
    per = [{k: v[i] for k, v in archs[m].per_layer.items()} for m, i in refs]
    keys = list(dict.fromkeys(k for p in per for k in p))
    out: dict[str, Any] = {k: [p[k] for p in per] for k in keys if all(k in p for p in per)}
    facts = archs[refs[0][0]].facts
    if facts is not None and facts.dense_layers_key:
        out[facts.dense_layers_key] = [k for k, (m, i) in enumerate(refs) if not archs[m].has_experts(i)]
        if facts.sparse_step_key:
            out[facts.sparse_step_key] = 1
    return out


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(FAMILIES))


def _unsupported(model_type: Any, where: str, why: str = "is not supported") -> ArchitectureError:
    return ArchitectureError(f"model_type={model_type!r}{where} {why}; supported model types: "
                             f"{', '.join(supported_model_types())}")


def _check_model_type(config: Mapping[str, Any] | str, source: str) -> str:
    model_type = config if isinstance(config, str) else config.get("model_type")
    where = f" of {source}" if source else ""
    if not model_type:
        raise ArchitectureError(f"config.json{where} has no model_type; supported: "
                                f"{', '.join(supported_model_types())}")
    if model_type not in FAMILIES:
        raise _unsupported(model_type, where)
    return model_type


def hf_config(config: Mapping[str, Any] | str, *, source: str = ""):
    """The transformers config object of a ``config.json`` dict (or a ``model_type``'s defaults).

    Raises:
        ArchitectureError: the ``model_type`` is missing, unknown to transformers or not supported.
    """
    from transformers import CONFIG_MAPPING

    model_type = _check_model_type(config, source)
    try:
        cls = CONFIG_MAPPING[model_type]
    except KeyError:
        where = f" of {source}" if source else ""
        raise _unsupported(model_type, where, "is unknown to this transformers") from None
    try:
        return cls() if isinstance(config, str) else cls.from_dict(dict(config))
    except (TypeError, ValueError) as err:  # transformers' own validation of the config
        where = f" of {source}" if source else ""
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ArchitectureError(f"config.json{where} (model_type={model_type!r}) is rejected by transformers: "
                                f"{first}; fix config.json") from None


def get_architecture(config: Mapping[str, Any] | str, *, source: str = "") -> Architecture:
    """The architecture of a ``config.json`` dict (or a ``model_type`` string, with that family's defaults).

    The layout is read once per distinct config (cached); building the model on ``meta`` allocates nothing.

    Raises:
        ArchitectureError: the ``model_type`` is missing or not supported (one line naming it and the supported
            list), or its layers carry state other than attention (linear attention, Mamba).
    """
    if hasattr(config, "to_dict") and not isinstance(config, Mapping | str):
        config = config.to_dict()  # a transformers config object
    model_type = _check_model_type(config, source)
    key = json.dumps({"model_type": model_type} if isinstance(config, str) else dict(config), sort_keys=True,
                     default=str)
    try:
        return _discover(key)
    except ArchitectureError as err:
        raise ArchitectureError(f"{source}: {err}" if source else str(err)) from None


@functools.lru_cache(maxsize=64)
def _discover(config_json: str) -> Architecture:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    raw = json.loads(config_json)
    model_type = raw["model_type"]
    facts = FAMILIES[model_type]
    cfg = hf_config(raw if len(raw) > 1 else model_type)
    where = ""
    types = attention_types(cfg)
    odd = sorted({t for t in types if t not in ATTENTION_TYPES})
    if odd:
        raise _unsupported(model_type, where, f"has layers of type {odd} that carry state other than attention")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # config sanity warnings (pad id) are the checkpoint's business
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    finally:
        hf_logging.set_verbosity(verbosity)
    n = int(cfg.num_hidden_layers)
    module_name = {id(m): name for name, m in model.named_modules()}
    layers_path = next((name for name, m in model.named_modules()
                        if isinstance(m, torch.nn.ModuleList) and len(m) == n and name.count(".") <= 1), None)
    if layers_path is None:
        raise _unsupported(model_type, where, "has no decoder-layer list transformers exposes")
    embed_mod, head_mod = model.get_input_embeddings(), model.get_output_embeddings()
    modules = {"layers": layers_path, "embed": module_name[id(embed_mod)], "head": module_name[id(head_mod)]}
    tied = head_mod.weight is embed_mod.weight
    prefix = f"{layers_path}."
    base = layers_path.rsplit(".", 1)[0]
    if facts.position_embedding:
        modules["position"] = f"{base}.{facts.position_embedding}"
    state = model.state_dict()
    # model-layout name -> the checkpoint names save_pretrained writes for it (transformers' conversion mapping)
    sources = _checkpoint_sources(model, state)
    per_layer: list[list[str]] = [[] for _ in range(n)]
    pre: list[str] = []
    post: list[str] = []
    pre_modules = {modules["embed"], modules.get("position")}
    for name in state:
        if name.startswith(prefix):
            continue
        (pre if name.rsplit(".", 1)[0] in pre_modules else post).append(name)
    for name in state:
        if name.startswith(prefix):
            idx, _, _ = name[len(prefix):].partition(".")
            per_layer[int(idx)].append(name)
    head_params = [p for p in post if p.startswith(modules["head"] + ".")]
    norm_params = [p for p in post if p not in head_params]
    norm_modules = {p.rsplit(".", 1)[0] for p in norm_params}
    if len(norm_modules) != 1:
        raise _unsupported(model_type, where, f"has tensors {norm_params} after its layers, not one final norm")
    modules["final_norm"] = norm_modules.pop()
    post = norm_params + head_params
    embed, head = f"{modules['embed']}.weight", f"{modules['head']}.weight"
    rotary = [name for name, m in model.named_modules() if name.startswith(base) and not name.startswith(prefix)
              and name.endswith("rotary_emb")]
    layer_params = inspect.signature(model.get_submodule(layers_path)[0].forward).parameters
    cache_arg = next((a for a in ("cache", "past_key_values", "layer_past") if a in layer_params), "cache")
    takes_type = False
    if rotary:
        modules["rotary"] = rotary[0]
        takes_type = "layer_type" in inspect.signature(model.get_submodule(rotary[0]).forward).parameters
    templates: dict[str, int] = {}
    for i, layer in enumerate(per_layer):
        for name in layer:
            t = prefix + "{}." + name[len(prefix) + len(str(i)) + 1:]
            templates[t] = templates.get(t, 0) + 1
    required = tuple(t for t, c in templates.items() if c == n)
    optional = tuple(t for t, c in templates.items() if c != n)
    residual = []
    for pattern in facts.residual:  # a module's weight (and bias), or a parameter itself (fused MoE experts)
        for suffix in ((".weight", "") if facts.residual_kind == "norm" else (".weight", ".bias", "")):
            full = f"{prefix}{{}}.{pattern}{suffix}"
            residual += [t for t in templates if fnmatch.fnmatchcase(t, full) and t not in residual]
    per_layer_cfg = {}
    for key in facts.per_layer_keys:
        v = getattr(cfg, key, None)
        if isinstance(v, list | tuple) and len(v) >= n:
            per_layer_cfg[key] = tuple(v[:n])
    num_key = getattr(type(cfg), "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")
    if num_key not in raw and "num_hidden_layers" in raw:
        num_key = "num_hidden_layers"
    return Architecture(
        model_type=model_type, pre_weights=tuple(pre), layer_templates=required, post_weights=tuple(post),
        converted=bool(sources), checkpoint_sources=sources, meta_model=model if sources else None,
        shapes={k: tuple(v.shape) for k, v in state.items()} if sources else {},
        embed=embed, head=head, final_norm=f"{modules['final_norm']}.weight", residual_outputs=tuple(residual),
        residual_kind=facts.residual_kind, optional_layer_templates=optional, norm_offset=facts.norm_offset,
        layer_prefix=prefix + "{}.", num_layers_key=num_key, modules=modules, rotary_takes_type=takes_type,
        cache_arg=cache_arg,
        tied_default=tied if "tie_word_embeddings" not in raw else _class_tie_default(cfg, tied),
        attention_types=tuple(types), per_layer=per_layer_cfg, layer_names=tuple(tuple(x) for x in per_layer),
        facts=facts)


def _checkpoint_sources(model: Any, state: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Model-layout name -> the checkpoint names ``save_pretrained`` writes it as, for the tensors transformers
    converts (GPT-NeoX's head is ``embed_out``; fused MoE experts are one tensor per expert on disk); empty when
    the family stores its tensors under their module names."""
    from transformers.core_model_loading import revert_weight_conversion

    if set(revert_weight_conversion(model, dict(state))) == set(state):
        return {}
    out = {}
    for k in state:
        names = tuple(revert_weight_conversion(model, {k: state[k]}))
        if names != (k,):
            out[k] = names
    return out


def _class_tie_default(cfg: Any, fallback: bool) -> bool:
    try:
        return bool(type(cfg)().tie_word_embeddings)
    except Exception:  # noqa: BLE001 - a config class that needs arguments: the config's own value
        return fallback

