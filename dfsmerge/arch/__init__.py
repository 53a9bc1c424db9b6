"""Decoder architectures as data (DESIGN.md section 2): tensor-name templates per family.

An :class:`Architecture` says which tensors come before the decoder layers, which belong to each layer
(``{}`` is the layer index), which come after, whether the head may be tied to the embedding, and which tensors
end each residual branch (needed to fold DFS input scales into the weights, DESIGN.md section 6).
Architecture is chosen from ``config.json``'s ``model_type`` through :data:`REGISTRY`, never from a path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from dfsmerge.errors import ArchitectureError


@dataclass(frozen=True, slots=True)
class Architecture:
    """Tensor layout of one decoder family.

    Attributes:
        model_type: ``config.json``'s ``model_type``.
        pre_weights: tensors before the first layer (the embedding).
        layer_templates: per-layer tensor names with ``{}`` for the layer index; optional ones (e.g. biases that
            a config may switch off) are listed in ``optional_layer_templates``.
        post_weights: tensors after the last layer (final norm, head).
        embed: name of the input embedding; ``head``: name of the output head (absent when tied).
        final_norm: name of the final norm weight.
        residual_outputs: per-layer templates of the tensors that end each residual branch. A DFS step scale is
            folded by dividing these by the cumulative scale (``residual_kind="linear"``: a projection's weight and
            bias; ``"norm"``: a post-norm weight, stored as ``w`` with effective gain ``norm_offset + w``).
        norm_offset: 1.0 for families whose RMSNorm multiplies by ``1 + w`` (Gemma), else 0.0.
        embed_scale: ``"sqrt_hidden"`` when the embedding output is multiplied by sqrt(hidden_size) (Gemma).
        filter_groups: mergekit-style filter names and the substring each matches (``self_attn``, ``mlp``).
    """

    model_type: str
    pre_weights: tuple[str, ...]
    layer_templates: tuple[str, ...]
    post_weights: tuple[str, ...]
    embed: str
    head: str
    final_norm: str
    residual_outputs: tuple[str, ...]
    residual_kind: Literal["linear", "norm"] = "linear"
    optional_layer_templates: tuple[str, ...] = ()
    norm_offset: float = 0.0
    embed_scale: Literal["none", "sqrt_hidden"] = "none"
    layer_prefix: str = "model.layers.{}."
    num_layers_key: str = "num_hidden_layers"

    def layer_tensor_names(self, index: int, config: Mapping[str, Any] | None = None) -> list[str]:
        """Names of layer ``index``'s tensors (optional ones included only when ``config`` enables them)."""
        names = [t.format(index) for t in self.layer_templates]
        if config is not None:
            names += [t.format(index) for t in self.optional_layer_templates if _optional_enabled(t, config)]
        return names

    def tied(self, config: Mapping[str, Any]) -> bool:
        """Whether the head shares the embedding's weight for this config."""
        return bool(config.get("tie_word_embeddings", self.model_type == "gemma2"))

    def pre_tensor_names(self, config: Mapping[str, Any]) -> list[str]:
        return list(self.pre_weights)

    def post_tensor_names(self, config: Mapping[str, Any]) -> list[str]:
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
        """Tensors of layer ``index`` that end a residual branch (present ones only when ``config`` given)."""
        names = []
        for t in self.residual_outputs:
            if config is not None and t in self.optional_layer_templates and not _optional_enabled(t, config):
                continue
            names.append(t.format(index))
        return names

    def layer_index(self, tensor_name: str) -> int | None:
        """The layer index of a per-layer tensor name, or None for pre/post tensors."""
        head, _, rest = self.layer_prefix.partition("{}")
        if not tensor_name.startswith(head):
            return None
        idx, dot, _ = tensor_name[len(head):].partition(".")
        return int(idx) if dot and idx.isdigit() else None


def _optional_enabled(template: str, config: Mapping[str, Any]) -> bool:
    if template.endswith(".bias"):
        if "self_attn" in template and "o_proj" not in template:
            return bool(config.get("attention_bias", False)) or config.get("model_type") == "qwen2"
        if "o_proj" in template:
            return bool(config.get("attention_bias", False)) and config.get("model_type") != "qwen2"
        return bool(config.get("mlp_bias", False))
    return True


_ATTN = tuple(f"model.layers.{{}}.self_attn.{p}_proj.weight" for p in "qkvo")
_ATTN_BIAS = tuple(f"model.layers.{{}}.self_attn.{p}_proj.bias" for p in "qkvo")
_MLP = tuple(f"model.layers.{{}}.mlp.{p}_proj.weight" for p in ("gate", "up", "down"))
_MLP_BIAS = tuple(f"model.layers.{{}}.mlp.{p}_proj.bias" for p in ("gate", "up", "down"))
_NORMS = ("model.layers.{}.input_layernorm.weight", "model.layers.{}.post_attention_layernorm.weight")
_PRE = ("model.embed_tokens.weight",)
_POST = ("model.norm.weight", "lm_head.weight")
_COMMON = dict(pre_weights=_PRE, post_weights=_POST, embed=_PRE[0], head="lm_head.weight",
               final_norm="model.norm.weight")
_LINEAR_RESIDUAL = ("model.layers.{}.self_attn.o_proj.weight", "model.layers.{}.self_attn.o_proj.bias",
                    "model.layers.{}.mlp.down_proj.weight", "model.layers.{}.mlp.down_proj.bias")


def _llama_like(model_type: str, *, extra: tuple[str, ...] = ()) -> Architecture:
    return Architecture(model_type=model_type, layer_templates=_ATTN + _MLP + _NORMS + extra,
                        optional_layer_templates=_ATTN_BIAS + _MLP_BIAS, residual_outputs=_LINEAR_RESIDUAL,
                        **_COMMON)


REGISTRY: dict[str, Architecture] = {
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "qwen2": _llama_like("qwen2"),
    "qwen3": _llama_like("qwen3", extra=("model.layers.{}.self_attn.q_norm.weight",
                                         "model.layers.{}.self_attn.k_norm.weight")),
    "gemma2": Architecture(
        model_type="gemma2",
        layer_templates=_ATTN + _MLP + _NORMS + ("model.layers.{}.pre_feedforward_layernorm.weight",
                                                 "model.layers.{}.post_feedforward_layernorm.weight"),
        residual_outputs=("model.layers.{}.post_attention_layernorm.weight",
                          "model.layers.{}.post_feedforward_layernorm.weight"),
        residual_kind="norm", norm_offset=1.0, embed_scale="sqrt_hidden", **_COMMON),
}


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(REGISTRY))


def get_architecture(config: Mapping[str, Any] | str, *, source: str = "") -> Architecture:
    """The architecture of a ``config.json`` dict (or a ``model_type`` string).

    Raises:
        ArchitectureError: the ``model_type`` is missing or not supported; the message names it and the list.
    """
    model_type = config if isinstance(config, str) else config.get("model_type")
    where = f" of {source}" if source else ""
    if not model_type:
        raise ArchitectureError(
            f"config.json{where} has no model_type; supported: {', '.join(supported_model_types())}")
    try:
        return REGISTRY[model_type]
    except KeyError:
        raise ArchitectureError(
            f"model_type={model_type!r}{where} is not supported; supported model types: "
            f"{', '.join(supported_model_types())}") from None
