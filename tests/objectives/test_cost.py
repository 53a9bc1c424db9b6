"""Cost objectives against references computed in the test."""

from __future__ import annotations

import pytest
import torch

from dfsmerge.errors import ConfigError
from dfsmerge.objectives import COSTS, CandidateDescription, compute_cost, describe_model


def test_costs_of_vanilla_model(tiny_model):
    model, _ = tiny_model
    cfg = model.config
    desc = describe_model(model)
    assert compute_cost("hops", model, desc) == cfg.num_hidden_layers
    assert compute_cost("params", model, desc) == sum(p.numel() for p in model.parameters())
    # reference: 2 x (weights a token meets) + attention scores and mixing over the context
    layer = model.model.layers[0]
    layer_w = sum(p.numel() for n, p in layer.named_parameters() if p.ndim == 2)
    n = cfg.num_hidden_layers * layer_w + model.lm_head.weight.numel()
    attn = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    assert compute_cost("flops", model, desc) == 2 * n + 2 * cfg.num_hidden_layers * 128 * attn
    lat = compute_cost("latency", model, desc)
    assert 0 < lat < 1.0


def test_repeated_layer_counts_once_in_params_and_twice_in_hops(tiny_model):
    """A stitched-style model that runs layer 0 twice: parameters stored once, hops and FLOPs per hop."""
    model, _ = tiny_model
    base = describe_model(model)
    layers = model.model.layers
    stitched = torch.nn.Module()
    stitched.config = model.config
    stitched.steps = torch.nn.ModuleList([layers[0], layers[0], layers[1]])
    stitched.rest = torch.nn.ModuleList([model.model.embed_tokens, model.model.norm, model.lm_head])
    desc = describe_model(stitched, n_hops=3)
    assert desc.unique_params == base.unique_params  # layer 0 is shared, not copied
    assert compute_cost("hops", stitched, desc) == 3
    assert compute_cost("flops", stitched, desc) - compute_cost("flops", model, base) == pytest.approx(
        2 * desc.layer_params + 2 * 128 * desc.attn_dim)


def test_cost_protocol_accepts_any_description(tiny_model):
    model, _ = tiny_model
    desc = CandidateDescription(n_hops=7, unique_params=123)
    assert compute_cost("hops", model, desc) == 7 and compute_cost("params", model, desc) == 123
    assert compute_cost("flops", model, desc) > 0  # fills layer sizes from the config
    assert set(COSTS) == {"hops", "params", "flops", "latency"}
    with pytest.raises(ConfigError, match="hops, params, flops, latency"):
        compute_cost("speed", model, desc)
