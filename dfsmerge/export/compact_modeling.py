"""Compact layer-path model for ``transformers`` (bundled with dfsmerge's compact exports).

A data-flow-space merge (Akiba et al., arXiv 2403.13187, sec. 3.2) runs a path of decoder layers that may repeat
and come from several models, each step scaling the hidden state entering it. This file stores every distinct
layer once and runs the path given in ``config.json``, as Sakana AI's EvoLLM-JP-v1-10B does:

    input_layers  [num_hops]  index of the stored layer run at each hop
    input_scales  [num_hops]  scale applied to the hidden state entering each hop
    dfs_model_type            the family (llama, gemma3_text, gpt2, ...) whose classes run the layers
    layer_types, ...          per-hop values of the family's per-layer config (attention type, NoPE flag)
    stored_layer_config       the same keys for the stored layers

The family's own base model (``AutoModel`` of the family config, e.g. ``Gemma3TextModel``) holds the embedding,
the stored layers, the final norm and the rotary embedding, under the family's usual names. Forward runs that
model's own ``forward`` with its layer list swapped for the hops (each hop scales its input and owns its KV-cache
slot, so a layer run twice keeps two caches) and its config swapped for the per-hop one: the family's masks per
attention type, rotary bases, embedding multipliers and positions apply unchanged. The head and the family's logit
transforms (``dfs_logit_ops``: Gemma's soft-capping, Cohere's scale, Granite's divisor) follow.

Load with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``. Self-contained: it imports only
``torch`` and ``transformers``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import CONFIG_MAPPING, AutoModel, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

_OUTER_KEYS = ("model_type", "dfs_model_type", "architectures", "auto_map", "num_hops", "num_stored_layers",
               "input_layers", "input_scales", "stored_layer_types", "stored_layer_sources", "transformers_version",
               "stored_layer_config", "dfs_base_prefix", "dfs_layers_attr", "dfs_head", "dfs_head_bias",
               "dfs_logit_ops", "num_hidden_layers")


class DfsCompactConfig(PretrainedConfig):
    """The family's config keys plus the path. ``num_hidden_layers`` and the per-layer keys describe the hops (so
    caches and masks are built per hop); :meth:`family_config` describes the stored layers."""

    model_type = "dfsmerge_compact"

    def __init__(self, dfs_model_type: str = "llama", input_layers=(), input_scales=(), num_hops: int | None = None,
                 num_stored_layers: int | None = None, stored_layer_config=None, dfs_base_prefix: str = "model",
                 dfs_layers_attr: str = "layers", dfs_head: str = "lm_head", dfs_head_bias: bool = False,
                 dfs_logit_ops=(), **kwargs):
        self.dfs_model_type = dfs_model_type
        self.input_layers = [int(i) for i in input_layers]
        self.input_scales = [float(s) for s in input_scales]
        self.num_hops = len(self.input_layers) if num_hops is None else int(num_hops)
        self.num_stored_layers = (max(self.input_layers) + 1 if self.input_layers else 0) \
            if num_stored_layers is None else int(num_stored_layers)
        self.stored_layer_config = dict(stored_layer_config or {})
        self.dfs_base_prefix = dfs_base_prefix
        self.dfs_layers_attr = dfs_layers_attr
        self.dfs_head = dfs_head
        self.dfs_head_bias = bool(dfs_head_bias)
        self.dfs_logit_ops = [(str(op), float(v)) for op, v in dfs_logit_ops]
        if len(self.input_scales) != len(self.input_layers) or self.num_hops != len(self.input_layers):
            raise ValueError(f"input_layers ({len(self.input_layers)}), input_scales ({len(self.input_scales)}) and "
                             f"num_hops ({self.num_hops}) must agree")
        if any(not 0 <= i < self.num_stored_layers for i in self.input_layers):
            raise ValueError(f"input_layers {self.input_layers} must index the {self.num_stored_layers} stored "
                             "layers")
        kwargs.setdefault("num_hidden_layers", self.num_hops)
        super().__init__(**kwargs)
        for key, value in kwargs.items():  # PretrainedConfig keeps unknown keys; make sure the per-hop lists stay
            if isinstance(value, list) and len(value) == self.num_hops:
                setattr(self, key, value)

    def family_config(self, *, hops: bool = False) -> PretrainedConfig:
        """The family config of the stored layers, or (``hops``) of the path with one layer per hop."""
        d = {k: v for k, v in self.to_dict().items() if k not in _OUTER_KEYS}
        if hops:
            d["num_hidden_layers"] = self.num_hops
        else:
            d["num_hidden_layers"] = self.num_stored_layers
            d.update(self.stored_layer_config)
        return CONFIG_MAPPING[self.dfs_model_type](**d)


class _HopCache:
    """A view of one hop's slot of a shared cache: ``update`` goes to the hop index, all else passes through."""

    __slots__ = ("cache", "hop")

    def __init__(self, cache, hop: int):
        self.cache = cache
        self.hop = hop

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        return self.cache.update(key_states, value_states, self.hop, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.cache, name)


def _is_cache(x) -> bool:
    return hasattr(x, "update") and hasattr(x, "get_seq_length")


class _Hop(nn.Module):
    """Hop ``k``: scales its input, runs the stored layer with its own cache slot."""

    def __init__(self, layer: nn.Module, scale: float, hop: int):
        super().__init__()
        self.__dict__["layer"] = layer  # not a submodule: the stored layer's weights are saved once, elsewhere
        self.scale = scale
        self.hop = hop

    def forward(self, hidden_states, *args, **kwargs):
        if self.scale != 1.0:
            hidden_states = hidden_states * self.scale  # (B, T, D) * () -> (B, T, D)
        args = tuple(_HopCache(a, self.hop) if _is_cache(a) else a for a in args)  # GPT-2 passes it positionally
        for key, value in kwargs.items():  # ``cache`` (GPT-NeoX: ``layer_past``)
            if _is_cache(value):
                kwargs[key] = _HopCache(value, self.hop)
        return self.layer(hidden_states, *args, **kwargs)


class DfsCompactPreTrainedModel(PreTrainedModel):
    config_class = DfsCompactConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class DfsCompactForCausalLM(DfsCompactPreTrainedModel, GenerationMixin):
    """A causal LM running ``config.input_layers`` over the stored layers (see the module docstring)."""

    def __init__(self, config: DfsCompactConfig):
        super().__init__(config)
        family = config.family_config()
        self.base_model_prefix = config.dfs_base_prefix
        try:  # the attention backend asked for, when the family supports it; else the family's default
            base = AutoModel.from_config(family, attn_implementation=getattr(config, "_attn_implementation", None))
        except ValueError:  # e.g. Gemma-2 has no sdpa path (attention soft-capping)
            base = AutoModel.from_config(config.family_config(), attn_implementation="eager")
        setattr(self, config.dfs_base_prefix, base)
        setattr(self, config.dfs_head, nn.Linear(family.hidden_size, family.vocab_size, bias=config.dfs_head_bias))
        hop_config = copy.copy(base.config)
        n_key = getattr(type(hop_config), "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")
        hop_config.__dict__[n_key] = config.num_hops  # GPT-2 keeps it as n_layer
        for key, value in vars(config.family_config(hops=True)).items():
            if isinstance(value, list) and len(value) == config.num_hops:
                hop_config.__dict__[key] = value
        self.__dict__["_hop_config"] = hop_config
        self.post_init()

    @property
    def _base(self) -> nn.Module:
        return getattr(self, self.config.dfs_base_prefix)

    def get_input_embeddings(self):
        return self._base.get_input_embeddings()

    def set_input_embeddings(self, value):
        self._base.set_input_embeddings(value)

    def get_output_embeddings(self):
        return getattr(self, self.config.dfs_head)

    def set_output_embeddings(self, value):
        setattr(self, self.config.dfs_head, value)

    def _hops(self) -> nn.ModuleList:
        stored = self._base._modules[self.config.dfs_layers_attr]
        key = (id(stored), tuple(self.config.input_layers), tuple(self.config.input_scales))
        cached = self.__dict__.get("_hop_list")
        if cached is None or cached[0] != key:
            hops = nn.ModuleList([_Hop(stored[u], s, k) for k, (u, s) in
                                  enumerate(zip(self.config.input_layers, self.config.input_scales, strict=True))])
            self.__dict__["_hop_list"] = cached = (key, hops)
        return cached[1]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        base = self._base
        attr = self.config.dfs_layers_attr
        stored, family_config = base._modules[attr], base.config
        hop_config = self.__dict__["_hop_config"]
        hop_config._attn_implementation = family_config._attn_implementation
        base._modules[attr] = self._hops()  # the family's forward runs the hops with the per-hop config
        base.config = hop_config
        try:
            out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                       inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        finally:
            base._modules[attr] = stored
            base.config = family_config
        h = out.last_hidden_state  # (B, T, D)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.get_output_embeddings()(h[:, keep, :])  # (B, T', V)
        for op, v in self.config.dfs_logit_ops:
            if op == "softcap":
                logits = torch.tanh(logits / v) * v
            elif op == "mul":
                logits = logits * v
            elif op == "div":
                logits = logits / v
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=getattr(out, "cache", None))
