"""Every supported family through the runtime and both exports, against vanilla transformers.

- the identity plan reproduces ``AutoModelForCausalLM``'s logits;
- random plans (repeats, layers of two models, scales) equal a step-by-step reference built here from
  transformers' own modules, with explicit 4-D masks per attention type;
- folded and compact exports reload with the runtime's logits and generate the same 24 greedy tokens with and
  without the KV cache.
"""

from __future__ import annotations

import inspect
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from dfsmerge.arch import get_architecture, hf_config
from dfsmerge.errors import ConfigError
from dfsmerge.export import export_plan
from dfsmerge.genome.plan import LayerRef, PathPlan, Step
from dfsmerge.runtime.pool import LayerPool
from dfsmerge.runtime.stitched import StitchedModel
from dfsmerge.zoo.tiny import FAMILIES, make_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_LAYERS = 2  # tests/conftest.py's tiny_family_models
T = 12  # longer than the tiny sliding windows (8), so sliding and full layers differ


def _hf(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _report(got, want) -> str:
    d = (got - want).abs()
    return f"max diff {d.max().item():.3g}, mean {d.mean().item():.3g}, max |want| {want.abs().max().item():.3g}"


def _rel(got, want) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.fixture(scope="module")
def pools(tiny_family_models):
    return {}


def _pool(pools, tiny_family_models, family) -> LayerPool:
    if family not in pools:
        m = tiny_family_models[family]
        pools[family] = LayerPool({"A": str(m["base"]), "B": str(m["ft1"])})
    return pools[family]


def _random_plan(seed: int, paths: dict, *, scales: bool = True, length: int = 5) -> PathPlan:
    rng = random.Random(seed)
    steps = [Step(LayerRef(rng.choice("AB"), rng.randrange(N_LAYERS)), rng.uniform(0.6, 1.6) if scales else 1.0)
             for _ in range(length)]
    steps[1] = Step(steps[0].layer, steps[1].scale)  # a repeated layer
    steps[2] = Step(LayerRef("B" if steps[0].layer.model == "A" else "A", rng.randrange(N_LAYERS)), steps[2].scale)
    return PathPlan(tuple(steps), models=paths, base="A", embed=rng.choice("AB"))


# ------------------------------------------------------------------ the independent reference
def _types(config) -> list[str]:
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    kind = "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"
    return [kind] * config.num_hidden_layers


def _mask(mask2d: torch.Tensor, window: int | None) -> torch.Tensor:
    """(B, 1, T, T) additive mask: causal, padding, and the sliding window when given."""
    n = mask2d.shape[1]
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (k <= q) if window is None else (k <= q) & (q - k < window)
    allowed = allowed[None, None] & mask2d.bool()[:, None, None, :]
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def _decoder_layers(model):
    return next(m for m in model.base_model.children() if isinstance(m, torch.nn.ModuleList))


def _final_norm(model):
    for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        if hasattr(model.base_model, name):
            return getattr(model.base_model, name)
    raise AssertionError(f"no final norm on {type(model).__name__}")


def _family_logits(config, logits):
    """What each family's *ForCausalLM does to the head's output (read from transformers' modeling files)."""
    if getattr(config, "final_logit_softcapping", None) is not None:
        cap = config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    if config.model_type in ("cohere", "cohere2"):
        logits = logits * config.logit_scale
    if config.model_type == "granite":
        logits = logits / config.logits_scaling
    return logits


def _reference(hf: dict, plan: PathPlan, ids: torch.Tensor, mask2d: torch.Tensor) -> torch.Tensor:
    a = hf[plan.base]
    pos = torch.arange(ids.shape[1])[None]
    # the input of the first decoder layer, as the embedding model computes it (multipliers, learned positions)
    h = hf[plan.embed_model](ids, attention_mask=mask2d, output_hidden_states=True).hidden_states[0]
    rotary = getattr(a.base_model, "rotary_emb", None)
    for step in plan.steps:
        model = hf[step.layer.model]
        layer = _decoder_layers(model)[step.layer.index]
        kind = _types(model.config)[step.layer.index]
        window = model.config.sliding_window if kind == "sliding_attention" else None
        extra = {}
        if rotary is not None:
            takes_type = "layer_type" in inspect.signature(rotary.forward).parameters
            extra["position_embeddings"] = rotary(h, pos, kind) if takes_type else rotary(h, pos)
        out = layer(h * step.scale, attention_mask=_mask(mask2d, window), position_ids=pos, **extra)
        h = out[0] if isinstance(out, tuple) else out
    return _family_logits(a.config, a.get_output_embeddings()(_final_norm(a)(h)))


# ------------------------------------------------------------------ runtime
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_plan_matches_vanilla(family, tiny_family_models, pools):
    path = tiny_family_models[family]["base"]
    ref = _hf(path)
    model = StitchedModel.from_pool(_pool(pools, tiny_family_models, family), PathPlan.identity("A", N_LAYERS))
    ids = torch.randint(5, 40, (2, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask, position_ids=pos).logits
        got = model(ids, attention_mask=mask, position_ids=pos).logits
    keep = mask.bool()
    assert torch.allclose(got[keep], want[keep], atol=1e-5, rtol=1e-5), _report(got[keep], want[keep])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_plan_matches_stepwise_reference(family, seed, tiny_family_models, pools):
    m = tiny_family_models[family]
    pool = _pool(pools, tiny_family_models, family)
    hf = {"A": _hf(m["base"]), "B": _hf(m["ft1"])}
    plan = _random_plan(seed, {"A": str(m["base"]), "B": str(m["ft1"])})
    ids = torch.randint(5, 40, (2, T), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, T - 3:] = 0  # right padding on one row
    with torch.no_grad():
        want = _reference(hf, plan, ids, mask)
        got = StitchedModel.from_pool(pool, plan)(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert torch.allclose(got[keep], want[keep], atol=1e-5, rtol=1e-5), _report(got[keep], want[keep])


# ------------------------------------------------------------------ exports
def _check_reload(out, runtime, *, trust: bool) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, trust_remote_code=trust).eval()
    ids = torch.randint(5, 40, (2, T), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = runtime(ids).logits
        got = model(ids).logits
    assert _rel(got, want) <= 1e-5, _report(got, want)
    prompt = ids[:, :6]
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=24, do_sample=False, use_cache=True, pad_token_id=0,
                                eos_token_id=None)
        full = model.generate(prompt, max_new_tokens=24, do_sample=False, use_cache=False, pad_token_id=0,
                              eos_token_id=None)
        ours = runtime.generate(prompt, max_new_tokens=24)
    assert cached.shape == (2, 30)
    assert torch.equal(cached, full), f"with cache {cached.tolist()} vs without {full.tolist()}"
    assert torch.equal(cached, ours), f"reloaded {cached.tolist()} vs runtime {ours.tolist()}"


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_export_reloads_with_runtime_logits(family, tiny_family_models, pools, tmp_path):
    m = tiny_family_models[family]
    paths = {"A": str(m["base"]), "B": str(m["ft1"])}
    pool = _pool(pools, tiny_family_models, family)
    plan = _random_plan(3, paths)
    arch = get_architecture(pool.config.to_dict())
    if not arch.foldable:
        with pytest.raises(ConfigError, match="compact"):
            export_plan(plan, tmp_path / "refused")
        assert not (tmp_path / "refused").exists()
        # a scale on the first step only is the embedding's: exact for any block
        plan = PathPlan((Step(plan.steps[0].layer, 1.4), *(Step(s.layer) for s in plan.steps[1:])),
                        models=paths, base="A", embed=plan.embed)
    out = export_plan(plan, tmp_path / "folded")
    _check_reload(out, StitchedModel.from_pool(pool, plan), trust=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_compact_export_reloads_with_runtime_logits(family, tiny_family_models, pools, tmp_path):
    m = tiny_family_models[family]
    paths = {"A": str(m["base"]), "B": str(m["ft1"])}
    pool = _pool(pools, tiny_family_models, family)
    plan = _random_plan(4, paths)
    out = export_plan(plan, tmp_path / "compact", format="compact")
    _check_reload(out, StitchedModel.from_pool(pool, plan), trust=True)


def test_qwen2_use_sliding_window_export_keeps_transformers_layer_types(tmp_path):
    """A raw Qwen2 config.json with use_sliding_window and no layer_types: transformers slides only the layers at
    or above max_window_layers; the runtime and both exports must agree with it (the old export slid every layer)."""
    path = make_tiny_checkpoint("qwen2", tmp_path / "q", seed=3, num_layers=2, hidden=32)
    raw = json.loads((path / "config.json").read_text())
    raw.pop("layer_types", None)
    raw.update(use_sliding_window=True, sliding_window=8, max_window_layers=1)
    (path / "config.json").write_text(json.dumps(raw))
    want_types = hf_config(raw).layer_types
    assert want_types == ["full_attention", "sliding_attention"]
    pool = LayerPool({"A": str(path)})
    ids = torch.randint(5, 40, (1, 2 * T), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = StitchedModel.from_pool(pool, PathPlan.identity("A", 2))(ids).logits
        assert torch.allclose(got, _hf(path)(ids).logits, atol=1e-5)
    plan = PathPlan((Step(LayerRef("A", 1)), Step(LayerRef("A", 0), 1.3), Step(LayerRef("A", 1), 0.8)),
                    models={"A": str(path)}, base="A")
    for fmt in ("folded", "compact"):
        out = export_plan(plan, tmp_path / fmt, format=fmt)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
        model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, trust_remote_code=True).eval()
        with torch.no_grad():
            got, want = model(ids).logits, StitchedModel.from_pool(pool, plan)(ids).logits
        assert _rel(got, want) <= 1e-5, _report(got, want)
