"""Compact layer-path model for ``transformers`` (bundled with dfsmerge's compact exports).

A data-flow-space merge (Akiba et al., arXiv 2403.13187, sec. 3.2) runs a path of decoder layers that may repeat
and come from several models, each step scaling the hidden state entering it. This file stores every distinct
layer once and runs the path given in ``config.json``, as Sakana AI's EvoLLM-JP-v1-10B does:

    input_layers  [num_hops]  index of the stored layer run at each hop
    input_scales  [num_hops]  scale applied to the hidden state entering each hop
    dfs_model_type            the family (llama, mistral, qwen2, qwen3, gemma2, ...) whose classes run the layers

Forward: ``h = embed(x)``; for each hop ``h = layers[input_layers[k]](h * input_scales[k])``; ``norm``; head
(Gemma-2's final logit soft-capping included). Each hop owns its KV-cache slot (index ``k``), so a layer run twice
keeps two caches. The stored layers, embedding, norm and rotary embedding are the family's own modules
(``AutoModel`` of the family config, e.g. ``LlamaModel``), so weights keep their usual names.

Load with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``. Self-contained: it imports only
``torch`` and ``transformers``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CONFIG_MAPPING, AutoModel, DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

_OUTER_KEYS = ("model_type", "dfs_model_type", "architectures", "auto_map", "num_hops", "num_stored_layers",
               "input_layers", "input_scales", "stored_layer_types", "stored_layer_sources", "transformers_version",
               "layer_types", "num_hidden_layers")


class DfsCompactConfig(PretrainedConfig):
    """The family's config keys plus the path. ``num_hidden_layers`` and ``layer_types`` describe the hops (so
    caches and masks are built per hop); :meth:`family_config` describes the stored layers."""

    model_type = "dfsmerge_compact"

    def __init__(self, dfs_model_type: str = "llama", input_layers=(), input_scales=(), num_hops: int | None = None,
                 num_stored_layers: int | None = None, stored_layer_types=None, **kwargs):
        self.dfs_model_type = dfs_model_type
        self.input_layers = [int(i) for i in input_layers]
        self.input_scales = [float(s) for s in input_scales]
        self.num_hops = len(self.input_layers) if num_hops is None else int(num_hops)
        self.num_stored_layers = (max(self.input_layers) + 1 if self.input_layers else 0) \
            if num_stored_layers is None else int(num_stored_layers)
        self.stored_layer_types = stored_layer_types
        if len(self.input_scales) != len(self.input_layers) or self.num_hops != len(self.input_layers):
            raise ValueError(f"input_layers ({len(self.input_layers)}), input_scales ({len(self.input_scales)}) and "
                             f"num_hops ({self.num_hops}) must agree")
        if any(not 0 <= i < self.num_stored_layers for i in self.input_layers):
            raise ValueError(f"input_layers {self.input_layers} must index the {self.num_stored_layers} stored "
                             "layers")
        kwargs.setdefault("num_hidden_layers", self.num_hops)
        layer_types = kwargs.pop("layer_types", None)
        super().__init__(**kwargs)
        self.num_hidden_layers = kwargs["num_hidden_layers"]
        if layer_types is not None:
            self.layer_types = list(layer_types)

    def family_config(self) -> PretrainedConfig:
        """The family config of the stored layers (``num_hidden_layers`` = number of stored layers)."""
        d = {k: v for k, v in self.to_dict().items() if k not in _OUTER_KEYS}
        d["num_hidden_layers"] = self.num_stored_layers
        if self.stored_layer_types is not None:
            d["layer_types"] = list(self.stored_layer_types)
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
        try:  # the attention backend asked for, when the family supports it; else the family's default
            self.model = AutoModel.from_config(family, attn_implementation=getattr(config, "_attn_implementation",
                                                                                    None))
        except ValueError:  # e.g. Gemma-2 has no sdpa path (attention soft-capping)
            self.model = AutoModel.from_config(config.family_config(), attn_implementation="eager")
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _hop_types(self) -> list[str]:
        types = getattr(self.config, "layer_types", None)
        if types:
            return list(types)
        kind = "sliding_attention" if getattr(self.config, "sliding_window", None) is not None and \
            getattr(self.config, "use_sliding_window", True) else "full_attention"
        return [kind] * self.config.num_hops

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        h = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)  # one slot per hop
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(h.shape[1], device=h.device) + past).unsqueeze(0)  # (1, T)
        types = self._hop_types()
        if isinstance(attention_mask, dict):
            masks = attention_mask
        else:
            # the family config: its attention backend decides the mask format (same sliding window as the hops)
            args = dict(config=self.model.config, inputs_embeds=h, attention_mask=attention_mask,
                        cache=cache, position_ids=position_ids)
            masks = {"full_attention": create_causal_mask(**args)}
            if "sliding_attention" in types:
                masks["sliding_attention"] = create_sliding_window_causal_mask(**args)
        position_embeddings = self.model.rotary_emb(h, position_ids)
        for k, (u, scale) in enumerate(zip(self.config.input_layers, self.config.input_scales, strict=True)):
            if scale != 1.0:
                h = h * scale  # (B, T, D) * () -> (B, T, D)
            h = self.model.layers[u](
                h, attention_mask=masks[types[k]], position_ids=position_ids,
                cache=None if cache is None else _HopCache(cache, k),
                use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
        h = self.model.norm(h)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(h[:, keep, :])  # (B, T', V)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)
