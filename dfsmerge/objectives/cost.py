"""Cost objectives (all minimised): path length, unique parameters of the exported model, estimated FLOPs per token
and measured latency per token. They read a :class:`CandidateDescription`, which the runtime can fill for a
stitched candidate (hops, unique parameters) or :func:`describe_model` derives from any HF-like model.

FLOPs follow Kaplan et al., "Scaling Laws for Neural Language Models" (arXiv 2001.08361), Table 1:
C_forward ≈ 2 N + 2 n_layer n_ctx d_attn per token, with N the non-embedding parameters a token passes through
(here: every hop's layer, counted again when a layer repeats, plus the output head).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from dfsmerge.errors import ConfigError


class DescribedCandidate(Protocol):
    """What a cost objective may read (the runtime's candidate description satisfies it)."""

    n_hops: int
    unique_params: int


@dataclass(frozen=True, slots=True)
class CandidateDescription:
    """Static facts about a candidate model.

    Args:
        n_hops: decoder layers a token passes through (path length; a repeated layer counts each time).
        unique_params: parameters the exported model stores (a repeated layer counts once).
        layer_params: parameters of one decoder layer (for the FLOPs estimate).
        head_params: parameters of the output head (vocab x hidden).
        attn_dim: query heads x head dim (for the attention term of the FLOPs estimate).
    """

    n_hops: int
    unique_params: int
    layer_params: int = 0
    head_params: int = 0
    attn_dim: int = 0


def _unique_param_count(model: torch.nn.Module) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for p in model.parameters():
        key = (p.data_ptr(), p.numel())
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


def describe_model(model, *, n_hops: int | None = None, unique_params: int | None = None) -> CandidateDescription:
    """Describe an HF-like model from its config and parameters.

    Args:
        model: the candidate. Attributes ``n_hops`` / ``unique_params`` on it (a stitched model may define them)
            take precedence over the config's ``num_hidden_layers`` and a count of distinct parameter storages.
        n_hops, unique_params: explicit values (highest precedence).
    """
    cfg = model.config
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    inter = getattr(cfg, "intermediate_size", 4 * hidden)
    layer = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2 + 3 * hidden * inter
    n_hops = n_hops if n_hops is not None else getattr(model, "n_hops", None) or cfg.num_hidden_layers
    if unique_params is None:
        unique_params = getattr(model, "unique_params", None) or _unique_param_count(model)
    return CandidateDescription(n_hops=int(n_hops), unique_params=int(unique_params), layer_params=layer,
                                head_params=cfg.vocab_size * hidden, attn_dim=heads * head_dim)


def hops(model, desc: DescribedCandidate, **_) -> float:
    """Path length (decoder layers per token)."""
    return float(desc.n_hops)


def params(model, desc: DescribedCandidate, **_) -> float:
    """Unique parameters of the exported model."""
    return float(desc.unique_params)


def flops(model, desc: CandidateDescription, *, context: int = 128, **_) -> float:
    """Estimated forward FLOPs per token at ``context`` tokens of context (Kaplan et al. 2020, Table 1)."""
    if not desc.layer_params:
        desc = describe_model(model, n_hops=desc.n_hops, unique_params=desc.unique_params)
    n = desc.n_hops * desc.layer_params + desc.head_params
    return float(2 * n + 2 * desc.n_hops * context * desc.attn_dim)


def latency(model, desc: DescribedCandidate, *, tokens: int = 32, repeats: int = 3, **_) -> float:
    """Measured seconds per token of a batch-1 forward over ``tokens`` tokens on the model's device (best of
    ``repeats`` after one warm-up; synchronised on CUDA)."""
    dev = getattr(model, "device", None) or next(model.parameters()).device
    ids = torch.zeros((1, tokens), dtype=torch.long, device=dev)
    sync = torch.cuda.synchronize if torch.device(dev).type == "cuda" else (lambda: None)
    best = float("inf")
    with torch.no_grad():
        model(input_ids=ids)
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            model(input_ids=ids)
            sync()
            best = min(best, time.perf_counter() - t0)
    return best / tokens


COSTS: dict[str, Callable[..., float]] = {"hops": hops, "params": params, "flops": flops, "latency": latency}


def compute_cost(name: str, model, desc: DescribedCandidate | None = None, **kwargs) -> float:
    """Evaluate the cost objective ``name`` (one of :data:`COSTS`).

    Raises:
        ConfigError: unknown cost name.
    """
    if name not in COSTS:
        raise ConfigError(f"cost objective name={name!r} is unknown; use one of {', '.join(COSTS)}")
    return COSTS[name](model, desc if desc is not None else describe_model(model), **kwargs)
