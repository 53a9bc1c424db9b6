"""Folding DFS step scales into weights (docs/design.md section 6).

A layer path (Sakana AI, arXiv 2403.13187, sec. 3.2) runs ``h_k = layer_k(s_k * h_{k-1})``. Every foldable block
is pre-norm, ``x -> x + f(N(x))`` with ``N`` an RMSNorm, and ``N(c x) = N(x)`` for ``c > 0`` up to the norm's
eps. With the cumulative products ``C_k = s_1 s_2 ... s_k`` (``C_0 = 1``) and ``g_k = h_k / C_k``::

    h_k = layer_k(C_k g_{k-1}) = C_k g_{k-1} + f(N(C_k g_{k-1})) = C_k (g_{k-1} + f(N(g_{k-1})) / C_k)

so ``g_k = layer'_k(g_{k-1})`` where ``layer'_k`` is ``layer_k`` with the tensors that end each residual branch
(``o_proj``/``down_proj`` weight and bias; Gemma-2/3's and GLM-4's post-norms; named per family in
:mod:`dfsmerge.arch.families`) divided by ``C_k``; ``g_0 = h_0`` is the
unchanged embedding (Gemma's sqrt(hidden) normaliser included); and the final norm removes the leftover factor:
``N_f(h_L) = N_f(C_L g_L) = N_f(g_L)``. A branch that ends in a norm with gain ``1 + w`` (Gemma-2) folds as
``1 + w' = (1 + w) / C_k``, i.e. ``w' = (1 + w) / C_k - 1``.

The embedding is a free factor when the output head does not share it (untied): storing ``e E`` instead of ``E``
gives ``g_k = e h_k / C_k``, so the divisors become ``D_k = C_k / e``. dfsmerge takes ``e = s_1``: then the input
of step 1 is exactly the path's ``s_1 h_0`` (``D_1 = 1``) and the divisors stay near 1 along the early steps,
where the residual stream is smallest and the eps matters most (:func:`fold_factors`). With a tied head, ``e = 1``.

Families whose MLP reads the raw residual stream (OLMo-2/3, EXAONE 4: post-norms only) are not scale invariant;
they export folded only when every divisor is 1 (:func:`check_divisors`), else compact.

Accuracy: the folded norm of step ``k`` sees ``g = u / D_k`` where the path's norm saw ``u = s_k h_{k-1}``, so it
computes ``u / sqrt(mean(u^2) + eps D_k^2)`` instead of ``u / sqrt(mean(u^2) + eps)``: a relative change of at most
``eps |D_k^2 - 1| / (2 mean(u^2))`` per norm (:func:`eps_bound`). With ``eps = 1e-6``, ``mean(u^2) ~ 1`` and
``D_k = 10`` that is 5e-5. Real checkpoints can have small early hidden states (Llama's embeddings have std ~0.02,
``mean(u^2) ~ 4e-4``), which is why ``e = s_1`` matters; the compact format is exact whatever the scales.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from dfsmerge.arch import Architecture, get_architecture
from dfsmerge.arch import path_layer_config as arch_path_layer_config
from dfsmerge.errors import ArchitectureError, ConfigError
from dfsmerge.genome.plan import PathPlan, cumulative_scales

# Config keys that change what a decoder layer computes; a folded checkpoint has one config, so every model that
# lends a layer must agree with the base model on them.
LAYER_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "hidden_act", "hidden_activation", "rms_norm_eps", "attention_bias", "mlp_bias",
                     "query_pre_attn_scalar", "attn_logit_softcapping", "use_qk_norm")


def check_foldable(plan: PathPlan) -> list[float]:
    """The cumulative scales of ``plan``, checked positive and finite.

    Raises:
        ConfigError: a cumulative scale is not > 0 (or not finite); names the step and suggests the compact format.
    """
    cum = cumulative_scales(plan.scales)
    for k, c in enumerate(cum):
        if not (math.isfinite(c) and c > 0):
            raise ConfigError(
                f"path[{k}]: cumulative scale C_{k + 1} = {c!r} (product of scales {list(plan.scales[:k + 1])}) "
                "must be finite and > 0 to fold the scales into the weights; use --format compact, which stores "
                "the scales as they are")
    return cum


def fold_factors(scales: Sequence[float], *, embed_free: bool) -> tuple[float, list[float]]:
    """The embedding factor ``e`` and the divisors ``D_k = C_k / e`` of the fold.

    Args:
        scales: the step scales ``s_k``.
        embed_free: the exported embedding is not shared with the head, so it may absorb ``e = s_1``.

    Returns:
        ``(e, [D_1, ..., D_L])``.
    """
    cum = cumulative_scales(scales)
    e = cum[0] if embed_free and cum else 1.0
    return e, [c / e for c in cum]


def eps_bound(divisors: Sequence[float], eps: float, mean_sq: float = 1.0) -> float:
    """Largest relative change of one norm's output caused by folding (see the module docstring)."""
    return max(eps * abs(d * d - 1.0) / (2.0 * mean_sq) for d in divisors) if divisors else 0.0


def fold_tensor(arch: Architecture, tensor: torch.Tensor, c: float) -> torch.Tensor:
    """A residual-branch output tensor of a step whose divisor is ``c``, folded.

    A projection is multiplied by ``1 / c`` in float32, exactly what a mergekit passthrough slice with
    ``scale: 1/c`` computes (so the export's ``mergekit.yaml`` reproduces it bit for bit); a ``1 + w`` norm gain,
    which no passthrough scale can express, is folded in float64.

    Returns:
        the folded tensor (the caller casts it to the output dtype).
    """
    if arch.residual_kind == "norm":  # gain (offset + w) -> (offset + w) / c
        t = tensor.to(torch.float64)
        return (arch.norm_offset + t) / c - arch.norm_offset
    return tensor.to(torch.float32) * (1.0 / c)


def path_layer_config(configs: Mapping[str, Mapping[str, Any]], refs: Sequence[Any]) -> dict[str, Any]:
    """Per-layer config of a checkpoint whose layer ``k`` is ``refs[k]`` (``LayerRef``s); see
    :func:`dfsmerge.arch.path_layer_config`."""
    return arch_path_layer_config(configs, [(r.model, r.index) for r in refs])


def check_divisors(arch: Architecture, divisors: Sequence[float], embed_factor: float = 1.0) -> None:
    """Raise when ``arch`` cannot fold these divisors into weights.

    Raises:
        ConfigError: the family's blocks are not scale invariant and a divisor (or the embedding factor) is not 1.
    """
    if arch.foldable or all(d == 1.0 for d in divisors):  # only the embedding scaled: exact for any block
        return
    raise ConfigError(f"model_type={arch.model_type!r} cannot fold step scales into weights (its MLP reads the raw "
                      f"residual stream, so a scaled input is not a scaled weight); the path has cumulative scales "
                      f"{[round(d * embed_factor, 6) for d in divisors]}; use --format compact, which stores the "
                      "scales as they are, or a path with every scale 1")


def check_layer_configs(configs: Mapping[str, Mapping[str, Any]], base: str, used: Sequence[str]) -> None:
    """Check that every model lending a layer computes its layers as the base model's config says.

    Raises:
        ArchitectureError: a model differs from the base in a layer-defining key (named with both values).
    """
    ref = configs[base]
    facts = get_architecture(ref, source=base).facts
    keys = LAYER_CONFIG_KEYS + (facts.layer_keys if facts else ())
    for name in used:
        cfg = configs[name]
        if cfg.get("model_type") != ref.get("model_type"):
            raise ArchitectureError(f"model {name!r} has model_type={cfg.get('model_type')!r} but base {base!r} has "
                                    f"{ref.get('model_type')!r}; a path needs one family")
        for key in keys:
            if cfg.get(key) != ref.get(key):
                raise ArchitectureError(
                    f"model {name!r} has {key}={cfg.get(key)!r} but base {base!r} has {ref.get(key)!r}; one "
                    "checkpoint config cannot describe both layers, so this path cannot be exported")
    windows = {configs[n].get("sliding_window") for n in used if configs[n].get("sliding_window") is not None}
    if len(windows) > 1:
        raise ArchitectureError(f"models of the path use different sliding windows {sorted(windows)}; one "
                                "checkpoint config holds one sliding_window")
