"""StitchedModel: a causal LM that runs a layer path over resident decoder layers (docs/design.md section 4).

Data-flow-space merging (Sakana AI, arXiv 2403.13187, sec. 3.2) evaluates a path of (layer, scale) steps drawn
from several models. The model is *handed* its parts (torchtune's ``TransformerDecoder(layers=...)``): the input
embedding, the steps, the final norm, the head and the rotary embedding. Forward is
``embed -> for each step: h = layer(h * scale) -> norm -> head``. Switching candidates swaps the step list
(:meth:`StitchedModel.set_steps`), never a weight.

Each hop owns its KV-cache slot: a ``DynamicCache`` holds one entry per hop, and each layer sees a small view
whose ``update(k, v, layer_idx)`` writes the hop's slot whatever the layer's own ``self_attn.layer_idx`` says, so a
layer used twice keeps two caches. Every hop uses the attention type of the layer it runs (full or sliding
window, with that layer's window), built once per forward with ``transformers.masking_utils``, and the rotary
embedding of its attention type (Gemma 3 has a local and a global base). What a family does around its layers
(Granite's embedding multiplier, GPT-2's learned positions, Cohere's logit scale, Gemma's soft-capping) comes from
its :class:`~dfsmerge.arch.Architecture`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from dfsmerge.arch import Architecture, apply_logit_ops, get_architecture
from dfsmerge.errors import ConfigError
from dfsmerge.runtime.prefix import PrefixStats, PrefixStore, lineage_of, reindexed, set_lineage

if TYPE_CHECKING:
    from dfsmerge.genome.plan import PathPlan
    from dfsmerge.runtime.pool import LayerPool


class Hop(NamedTuple):
    """A resolved step: the layer module, the scale on its input, and its attention type.

    A NamedTuple rather than a frozen dataclass: building 64 of them is part of every candidate switch, and a
    frozen dataclass's ``__init__`` costs several times more.
    """

    layer: nn.Module
    scale: float = 1.0
    attention_type: str = "full_attention"
    sliding_window: int | None = None


@dataclass
class StitchedOutput:
    """The fields of ``CausalLMOutputWithPast`` that callers use."""

    logits: torch.Tensor
    cache: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None

    def __getitem__(self, i: int):
        return (self.logits, self.cache)[i]


class _HopCache:
    """A view of one hop's slot in a shared cache: routes ``update`` to the hop index, everything else through."""

    __slots__ = ("cache", "hop")

    def __init__(self, cache, hop: int):
        self.cache = cache
        self.hop = hop

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        return self.cache.update(key_states, value_states, self.hop, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.cache, name)


class _RecordingHopCache(_HopCache):
    """A hop's cache view that also remembers the update it received (replayed when the prefix store serves this
    step to a later call)."""

    __slots__ = ("record",)

    def __init__(self, cache, hop: int):
        super().__init__(cache, hop)
        self.record = None

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        self.record = (key_states, value_states, args, kwargs)
        return self.cache.update(key_states, value_states, self.hop, *args, **kwargs)


_CACHE_CLASS = None


def new_cache():
    """An empty KV cache for a stitched model: a ``DynamicCache`` whose ``batch_select_indices`` keeps the
    lineage the prefix store keys continuations by."""
    global _CACHE_CLASS
    if _CACHE_CLASS is None:
        from transformers import DynamicCache

        class PathCache(DynamicCache):
            def batch_select_indices(self, indices):
                super().batch_select_indices(indices)
                set_lineage(self, reindexed(lineage_of(self), indices))

        _CACHE_CLASS = PathCache
    return _CACHE_CLASS()


class StitchedModel(nn.Module):
    """A causal LM over a path of resident decoder layers; called like a Hugging Face ``*ForCausalLM``.

    Args:
        embedding: input embedding module (Gemma's scales by sqrt(hidden) itself).
        hops: the steps (layer module, scale, attention type, window).
        final_norm, head, rotary: model A's modules (``rotary`` None for families without one).
        config: model A's transformers config (copied; ``num_hidden_layers`` becomes the path length).
        final_logit_softcapping: Gemma-2's ``tanh`` cap on the logits; overrides the family's logit transforms.
        architecture: model A's family layout (default: read from ``config``).
        position_embedding: learned absolute positions added to the embedding (GPT-2's ``wpe``; default model A's
            when the family has them, through ``architecture``: pass it explicitly).
    """

    def __init__(self, *, embedding: nn.Module, hops: Sequence[Hop], final_norm: nn.Module, head: nn.Module,
                 rotary: nn.Module | None, config: Any, final_logit_softcapping: float | None = None,
                 architecture: Architecture | None = None, position_embedding: nn.Module | None = None):
        super().__init__()
        self.embed_tokens = embedding
        self.wpe = position_embedding
        self.norm = final_norm
        self.lm_head = head
        self.rotary_emb = rotary
        self._base_config = config
        self._set_family(architecture, final_logit_softcapping)
        self._configs: dict[int | None, Any] = {}
        self.prefix_store: PrefixStore | None = None
        """Set by the runtime: forward calls resume from stored path prefixes (:mod:`dfsmerge.runtime.prefix`)."""
        self.prefix_stats = PrefixStats()
        self.set_steps(hops)
        self.train(False)  # an evaluation runtime: no dropout, like the pool's models

    # ---------------------------------------------------------------- building
    @classmethod
    def from_pool(cls, pool: LayerPool, plan: PathPlan) -> StitchedModel:
        """Resolve ``plan`` against ``pool``'s resident modules.

        Raises:
            ConfigError: a step names a layer outside the pool.
        """
        plan = pool.validate_plan(plan)
        return cls(embedding=pool.embedding(plan.embed_model), hops=hops_from_plan(pool, plan),
                   final_norm=pool.final_norm(plan.base), head=pool.head(plan.base), rotary=pool.rotary(plan.base),
                   config=pool[plan.base].config, architecture=pool[plan.base].architecture,
                   position_embedding=pool.position_embedding(plan.embed_model))

    def _set_family(self, architecture: Architecture | None, softcap: float | None = None) -> None:
        config = self._base_config
        arch = architecture or get_architecture(config.to_dict())
        self.architecture = arch
        self._logit_ops = (("softcap", float(softcap)),) if softcap is not None else arch.logit_ops(config)
        self._embed_multiplier = arch.embed_multiplier(config)
        self._rotary_takes_type = arch.rotary_takes_type
        self._cache_arg = arch.cache_arg

    def set_steps(self, hops: Sequence[Hop]) -> None:
        """Swap the path (no weight is copied)."""
        hops = tuple(hops)
        if not hops:
            raise ConfigError("a stitched model needs at least one step; the path is empty")
        self.hops = hops
        self._keys_for = None  # the prefix store's keys of this path (see _prefix_keys)
        # Registered for .parameters()/.to(); repeated layers are one module, so nothing is duplicated. The
        # ModuleList is filled directly: add_module's checks cost more than the rest of a switch.
        layers = nn.ModuleList()
        layers._modules = {_NAMES[i] if i < len(_NAMES) else str(i): h.layer for i, h in enumerate(hops)}
        self.layers = layers
        config = copy.copy(self._base_config)
        # skips PretrainedConfig.__setattr__'s bookkeeping; GPT-2 keeps the count as n_layer
        config.__dict__[getattr(type(config), "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")] = \
            len(hops)
        if getattr(self._base_config, "layer_types", None) is not None:
            config.__dict__["layer_types"] = [h.attention_type for h in hops]
        self.config = config

    def set_plan(self, pool: LayerPool, plan: PathPlan) -> None:
        """Switch to ``plan`` over the same pool (embedding, norm and head follow the plan's ``embed``/``base``)."""
        config = pool[plan.base].config
        if config is not self._base_config:
            self._base_config = config
            self._configs = {}
            self._set_family(pool[plan.base].architecture)
        self.set_steps(hops_from_plan(pool, plan))
        self.embed_tokens = pool.embedding(plan.embed_model)
        self.wpe = pool.position_embedding(plan.embed_model)
        self.norm = pool.final_norm(plan.base)
        self.lm_head = pool.head(plan.base)
        self.rotary_emb = pool.rotary(plan.base)
        self._keys_for = None

    # ---------------------------------------------------------------- HF-like surface
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def _mask_config(self, window: int | None):
        cfg = self._configs.get(window)
        if cfg is None:
            cfg = copy.copy(self._base_config)
            cfg.__dict__["sliding_window"] = window
            self._configs[window] = cfg
        return cfg

    def _masks(self, inputs_embeds, attention_mask, cache, position_ids) -> dict[tuple[str, int | None], Any]:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        masks: dict[tuple[str, int | None], Any] = {}
        for h in self.hops:
            key = (h.attention_type, h.sliding_window)
            if key in masks:
                continue
            if h.attention_type == "sliding_attention" and h.sliding_window is not None:
                masks[key] = create_sliding_window_causal_mask(
                    config=self._mask_config(h.sliding_window), inputs_embeds=inputs_embeds,
                    attention_mask=attention_mask, cache=cache, position_ids=position_ids)
            else:
                masks[key] = create_causal_mask(config=self._base_config, inputs_embeds=inputs_embeds,
                                                attention_mask=attention_mask, cache=cache,
                                                position_ids=position_ids)
        return masks

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Any = None, use_cache: bool = False,
                inputs_embeds: torch.Tensor | None = None, logits_to_keep: int = 0,
                output_hidden_states: bool = False, **kwargs) -> StitchedOutput:
        """Run the path, as ``*ForCausalLM.forward``.

        Args:
            input_ids: (B, T) token ids (or ``inputs_embeds`` (B, T, D)).
            attention_mask: (B, past + T) with 1 for real tokens, 0 for padding (left or right).
            position_ids: (B, T); default ``past + arange(T)`` as transformers (pass them for left padding).
            cache: a cache returned by a previous call (one slot per hop).
            use_cache: create/extend the cache and return it.
            logits_to_keep: keep only the last N positions' logits (0: all).

        Returns:
            :class:`StitchedOutput` with ``logits`` (B, T, V) in the model dtype and ``cache``.

        Raises:
            ConfigError: a cache from a different path (more slots than hops).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        fresh_cache = use_cache and cache is None
        if fresh_cache:
            cache = new_cache()
        if cache is not None and len(getattr(cache, "layers", ())) > len(self.hops):
            raise ConfigError(f"cache holds {len(cache.layers)} slots but the path has "
                              f"{len(self.hops)} hops; a cache belongs to the path that filled it")
        lineage = b"" if fresh_cache or cache is None else lineage_of(cache)
        store = self.prefix_store if lineage is not None and input_ids is not None and not output_hidden_states \
            else None
        call = keys = None
        start = 0
        if store is not None:
            call = store.call_key(input_ids, attention_mask, position_ids, lineage)
            keys, volatile = self._prefix_keys(store)
            start = store.longest(call, keys, need_kv=cache is not None)
        n_tok = int(input_ids.numel() if input_ids is not None else inputs_embeds.shape[0] * inputs_embeds.shape[1])
        st = self.prefix_stats
        st.calls += 1
        st.hits += start > 0
        st.tokens += n_tok
        st.forward_tokens += n_tok * (len(self.hops) - start) / len(self.hops)
        st.cached_tokens += n_tok * start / len(self.hops)
        if start == 0:
            h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
            if self._embed_multiplier != 1.0:
                h = h * self._embed_multiplier  # Granite: outside the embedding module
        else:  # only its shape, device and dtype are read below (masks, rotary); replaced before the first step
            h = store.get(call, keys[start - 1]).hidden
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(h.shape[1], device=h.device) + past).unsqueeze(0)  # (1, T)
        if self.wpe is not None and start == 0:
            h = h + self.wpe(position_ids)  # (B, T, D) + (B|1, T, D): GPT-2's learned positions
        masks = self._masks(h, attention_mask, cache, position_ids)
        rotary: dict[str, Any] = {}
        if self.rotary_emb is not None:  # (cos, sin): (B, T, head_dim) each
            kinds = {hop.attention_type for hop in self.hops}
            if self._rotary_takes_type:  # one base per attention type (Gemma 3: local and global)
                rotary = {k: self.rotary_emb(h, position_ids, k) for k in kinds}
            else:
                rotary = dict.fromkeys(kinds, self.rotary_emb(h, position_ids))
        states = (h,) if output_hidden_states else None
        for i in range(start):  # served from the store: replay the steps' cache updates, take the last output
            e = store.get(call, keys[i])
            if cache is not None:
                k, v, args, kw = e.kv
                cache.update(k, v, i, *args, **kw)
            h = e.hidden
        for i in range(start, len(self.hops)):
            hop = self.hops[i]
            if hop.scale != 1.0:
                h = h * hop.scale  # (B, T, D) * () -> (B, T, D)
            extra = {"position_embeddings": rotary[hop.attention_type]} if rotary else {}
            view = None
            if cache is not None:
                view = _RecordingHopCache(cache, i) if store is not None else _HopCache(cache, i)
            extra[self._cache_arg] = view
            h = hop.layer(h, attention_mask=masks[(hop.attention_type, hop.sliding_window)],
                          position_ids=position_ids, use_cache=use_cache, **extra)
            if store is not None and (cache is None or view.record is not None):
                store.put(call, keys[i], h, None if cache is None else view.record, volatile[i])
            if states is not None:
                states += (h,)
        if cache is not None and call is not None:
            set_lineage(cache, call)
        h = self.norm(h)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = apply_logit_ops(self.lm_head(h), self._logit_ops)  # (B, T, V)
        return StitchedOutput(logits=logits, cache=cache if use_cache else None,
                              hidden_states=states)

    def _prefix_keys(self, store: PrefixStore) -> tuple[list[bytes], list[bool]]:
        """The store's keys of every prefix of the path (cached per path and store version)."""
        tag = (id(store), store.version)
        if self._keys_for is not None and self._keys_for[0] == tag:
            return self._keys_for[1]
        context = (self.embed_tokens, self.wpe, float(self._embed_multiplier), self.rotary_emb, id(self._base_config),
                   self.lm_head.weight.dtype)
        out = store.path_keys(context, [(h.layer, h.scale, h.attention_type, h.sliding_window) for h in self.hops])
        self._keys_for = (tag, out)
        return out

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True, **kwargs) -> torch.Tensor:
        """Greedy or sampled decoding with the per-hop KV cache (inputs left-padded, as transformers).

        Args:
            input_ids: (B, T) prompt ids, left-padded; ``attention_mask`` (B, T) marks real tokens.
            max_new_tokens: tokens to add.
            do_sample, temperature, top_k, top_p: sampling (greedy when ``do_sample`` is False).
            eos_token_id: stops a row when produced; later tokens of that row are ``pad_token_id``.
            generator: torch RNG for reproducible sampling.
            use_cache: False recomputes the whole sequence at every step (the reference the cache is tested
                against).

        Returns:
            (B, T + n) ids, n <= max_new_tokens (stops early when every row has finished).
        """
        B, T = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=device)
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        eos_t = torch.tensor(eos, device=device, dtype=input_ids.dtype)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T), left padding aware
        seq = input_ids
        cache = None
        out = self(seq, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache,
                   logits_to_keep=1)
        cache = out.cache
        for n in range(max_new_tokens):
            logits = out.logits[:, -1, :].float()  # (B, V)
            nxt = self._pick(logits, do_sample, temperature, top_k, top_p, generator)  # (B,)
            if eos:
                nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
                finished |= torch.isin(nxt, eos_t)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
            if (eos and bool(finished.all())) or n == max_new_tokens - 1:
                break
            if use_cache:
                position_ids = position_ids[:, -1:] + 1  # (B, 1)
                out = self(nxt[:, None], attention_mask=attention_mask, position_ids=position_ids,
                           cache=cache, use_cache=True, logits_to_keep=1)
                cache = out.cache
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                out = self(seq, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1)
        return seq

    @staticmethod
    def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
              top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(-1)
        if temperature <= 0:
            raise ConfigError(f"temperature={temperature} must be > 0 when sampling; use do_sample=False for greedy")
        logits = logits / temperature
        if top_k is not None and top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
            probs = sorted_logits.softmax(-1)
            # drop a token once the mass before it already reaches top_p (the first token always stays)
            drop = (probs.cumsum(-1) - probs) >= top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def hops_from_plan(pool: LayerPool, plan: PathPlan) -> list[Hop]:
    """Resolve the steps of ``plan`` to resident modules of ``pool`` (with each layer's attention type).

    Raises:
        ConfigError: a step names a layer outside the pool.
    """
    table = pool.hop_table()
    try:
        entries = [(table[s.layer], float(s.scale)) for s in plan.steps]
    except KeyError:
        pool.validate_plan(plan)  # raises with the step, field and value
        raise
    return [Hop(e[0], scale, e[1], e[2]) for e, scale in entries]


_NAMES = tuple(str(i) for i in range(1024))
