"""What transformers cannot tell about a decoder family, declared per ``model_type`` (docs/design.md section 6).

The layout of a family (its decoder-layer list, tensor names, tied head, attention types, rotary modules) is read
from transformers itself (:mod:`dfsmerge.arch`). This table holds only the facts its modules do not expose:

- ``residual``: per-layer module (or fused parameter) names, relative to the layer, whose output ends a residual
  branch. A DFS step
  scale is folded by dividing them by the cumulative scale: ``"linear"`` divides a projection's weight and bias;
  ``"norm"`` divides a post-norm's gain (stored ``w``, effective gain ``norm_offset + w``). ``None``: the block
  is not scale invariant (OLMo-2's MLP reads the raw residual stream), so scales cannot be folded into weights.
- ``norm_offset``: 1.0 where an RMSNorm multiplies by ``1 + w`` (Gemma), else 0.0.
- ``embed_multiplier``: config key of a factor the model applies to the embedding output outside the embedding
  module (Granite's ``embedding_multiplier``); Gemma's sqrt(hidden) lives inside its embedding module.
- ``position_embedding``: module (relative to the base model) of learned absolute positions added to the token
  embedding (GPT-2's ``wpe``).
- ``logits``: what the ``*ForCausalLM`` does to the head's output, as ``(op, config key)``: ``softcap``
  (``tanh(x / c) * c``), ``mul``, ``div``.
- ``per_layer_keys``: config keys holding one value per decoder layer, written per step by the export.
- ``layer_keys``: config keys (beyond the common ones) that change what a layer computes; every model lending a
  layer to one exported checkpoint must agree on them.
- ``experts``: per-layer module names (relative to the layer) that hold the experts of a mixture-of-experts block.
- ``dense_layers_key`` / ``sparse_step_key``: config keys that choose which layers are dense (an index list) and
  the sparse-layer step; the export writes them per step from which layers hold experts.
- ``mergekit``: mergekit 0.1.5 ships a definition of the family (its merges are tested against it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class FamilyFacts:
    residual: tuple[str, ...]
    residual_kind: Literal["linear", "norm"] | None = "linear"
    norm_offset: float = 0.0
    embed_multiplier: str | None = None
    position_embedding: str | None = None
    logits: tuple[tuple[str, str], ...] = ()
    per_layer_keys: tuple[str, ...] = ("layer_types",)
    layer_keys: tuple[str, ...] = ()
    experts: tuple[str, ...] = ()
    dense_layers_key: str | None = None
    sparse_step_key: str | None = None
    mergekit: bool = True


_LLAMA = ("self_attn.o_proj", "mlp.down_proj")
_GEMMA_POST = ("post_attention_layernorm", "post_feedforward_layernorm")
_SOFTCAP = (("softcap", "final_logit_softcapping"),)

FAMILIES: dict[str, FamilyFacts] = {
    "llama": FamilyFacts(_LLAMA),
    "mistral": FamilyFacts(_LLAMA),
    "qwen2": FamilyFacts(_LLAMA),
    "qwen3": FamilyFacts(_LLAMA),
    "helium": FamilyFacts(_LLAMA, mergekit=False),
    "ministral": FamilyFacts(_LLAMA, mergekit=False),
    "seed_oss": FamilyFacts(_LLAMA, mergekit=False),
    "smollm3": FamilyFacts(_LLAMA, per_layer_keys=("layer_types", "no_rope_layers"), mergekit=False),
    "phi3": FamilyFacts(_LLAMA, layer_keys=("partial_rotary_factor",)),
    "gemma": FamilyFacts(_LLAMA, norm_offset=1.0),
    "gemma2": FamilyFacts(_GEMMA_POST, residual_kind="norm", norm_offset=1.0, logits=_SOFTCAP),
    "gemma3_text": FamilyFacts(_GEMMA_POST, residual_kind="norm", norm_offset=1.0, logits=_SOFTCAP),
    "glm4": FamilyFacts(("post_self_attn_layernorm", "post_mlp_layernorm"), residual_kind="norm",
                        layer_keys=("partial_rotary_factor",)),
    "olmo2": FamilyFacts((), residual_kind=None),
    "olmo3": FamilyFacts((), residual_kind=None, mergekit=False),
    "exaone4": FamilyFacts((), residual_kind=None, mergekit=False),
    "granite": FamilyFacts(_LLAMA, embed_multiplier="embedding_multiplier", logits=(("div", "logits_scaling"),),
                           layer_keys=("residual_multiplier", "attention_multiplier")),
    "cohere": FamilyFacts(_LLAMA, logits=(("mul", "logit_scale"),), layer_keys=("layer_norm_eps", "use_qk_norm")),
    "cohere2": FamilyFacts(_LLAMA, logits=(("mul", "logit_scale"),), layer_keys=("layer_norm_eps",)),
    "starcoder2": FamilyFacts(("self_attn.o_proj", "mlp.c_proj"), layer_keys=("norm_epsilon", "use_bias")),
    "phi": FamilyFacts(("self_attn.dense", "mlp.fc2"),
                       layer_keys=("layer_norm_eps", "partial_rotary_factor", "qk_layernorm")),
    # mergekit 0.1.5's gpt-neox definition requires the attention.bias/masked_bias buffers that checkpoints saved by
    # current transformers do not have, so it merges none of them
    "gpt_neox": FamilyFacts(("attention.dense", "mlp.dense_4h_to_h"),
                            layer_keys=("layer_norm_eps", "rotary_pct", "use_parallel_residual"), mergekit=False),
    # Mixture-of-experts, in the model layout transformers loads (and mergekit 0.1.5 merges): each layer's experts
    # are fused tensors mlp.experts.gate_up_proj (E, 2I, H) and mlp.experts.down_proj (E, H, I)
    "mixtral": FamilyFacts(("self_attn.o_proj", "mlp.experts.down_proj"), experts=("mlp.experts",),
                           layer_keys=("num_local_experts", "num_experts_per_tok")),
    "qwen2_moe": FamilyFacts(("self_attn.o_proj", "mlp.experts.down_proj", "mlp.shared_expert.down_proj",
                              "mlp.down_proj"), experts=("mlp.experts",), dense_layers_key="mlp_only_layers",
                             sparse_step_key="decoder_sparse_step",
                             layer_keys=("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                                         "shared_expert_intermediate_size", "norm_topk_prob"), mergekit=False),
    "qwen3_moe": FamilyFacts(("self_attn.o_proj", "mlp.experts.down_proj", "mlp.down_proj"),
                             experts=("mlp.experts",), dense_layers_key="mlp_only_layers",
                             sparse_step_key="decoder_sparse_step",
                             layer_keys=("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                                         "norm_topk_prob")),
    "gpt2": FamilyFacts(("attn.c_proj", "mlp.c_proj"), position_embedding="wpe",
                        layer_keys=("layer_norm_epsilon", "n_inner", "activation_function", "scale_attn_weights",
                                    "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn")),
}
"""model_type -> the facts transformers cannot tell. A family missing here is not supported."""
