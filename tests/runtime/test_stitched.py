"""StitchedModel against vanilla transformers and an independent step-by-step reference."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from dfsmerge.errors import ConfigError
from dfsmerge.genome.plan import LayerRef, PathPlan, Step
from dfsmerge.runtime.pool import LayerPool
from dfsmerge.runtime.stitched import StitchedModel
from dfsmerge.zoo.tiny import FAMILIES


def _hf(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _mask(B, T, pad, n_pad=3):
    m = torch.ones(B, T, dtype=torch.long)
    if pad == "left":
        m[0, :n_pad] = 0
    elif pad == "right":
        m[0, T - n_pad:] = 0
    return m if pad != "none" else None


def _report(a, b):
    d = (a - b).abs()
    return f"max diff {d.max().item():.3g}, mean diff {d.mean().item():.3g}"


@pytest.fixture(scope="module")
def family_pools(tiny_family_ckpts):
    return {fam: LayerPool({"A": str(a), "B": str(b)}) for fam, (a, b) in tiny_family_ckpts.items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pad", ["none", "left", "right"])
def test_identity_plan_matches_hf(family, pad, tiny_family_ckpts, family_pools):
    a, _ = tiny_family_ckpts[family]
    ref = _hf(a)
    model = StitchedModel.from_pool(family_pools[family], PathPlan.identity("A", 3))
    ids = torch.randint(5, 40, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = _mask(2, 11, pad)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask).logits
    keep = mask.bool() if mask is not None else torch.ones(2, 11, dtype=torch.bool)
    assert torch.allclose(got[keep], want[keep], atol=1e-5, rtol=0), _report(got[keep], want[keep])


def test_gemma2_sliding_window_longer_than_window(tiny_family_ckpts, family_pools):
    """Sequences past the 64-token window exercise the per-layer (sliding/full) masks."""
    a, _ = tiny_family_ckpts["gemma2"]
    ref = _hf(a)
    pool = family_pools["gemma2"]
    assert {pool.attention_type(LayerRef("A", i)) for i in range(3)} == {"sliding_attention", "full_attention"}
    ids = torch.randint(5, 40, (2, 80), generator=torch.Generator().manual_seed(1))
    mask = _mask(2, 80, "left", n_pad=5)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask, position_ids=pos).logits
        model = StitchedModel.from_pool(pool, PathPlan.identity("A", 3))
        got = model(ids, attention_mask=mask, position_ids=pos).logits
    keep = mask.bool()
    assert torch.allclose(got[keep], want[keep], atol=1e-5, rtol=0), _report(got[keep], want[keep])


def _random_plan(rng, n_layers, length, *, scales=True):
    steps = [Step(LayerRef(rng.choice("AB"), rng.randrange(n_layers)), rng.uniform(0.5, 1.8) if scales else 1.0)
             for _ in range(length)]
    # make sure the plan repeats a layer and crosses models
    steps[1] = Step(steps[0].layer, steps[1].scale)
    steps[2] = Step(LayerRef("B" if steps[0].layer.model == "A" else "A", 0), steps[2].scale)
    return PathPlan(tuple(steps), models={"A": "A", "B": "B"}, base="A")


def _reference_forward(hf_models, plan, ids, mask2d):
    """Step by step from fresh HF modules, with an explicit 4-D additive mask built here."""
    a = hf_models[plan.base]
    B, T = ids.shape
    h = hf_models[plan.embed_model].model.embed_tokens(ids)
    pos = torch.arange(T).unsqueeze(0)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    allowed = causal[None, None] & mask2d.bool()[:, None, None, :]  # (B, 1, T, T)
    mask = torch.zeros(B, 1, T, T).masked_fill(~allowed, torch.finfo(torch.float32).min)
    pe = a.model.rotary_emb(h, pos)
    for step in plan.steps:
        layer = hf_models[step.layer.model].model.layers[step.layer.index]
        h = layer(h * step.scale, attention_mask=mask, position_ids=pos, position_embeddings=pe)
    return a.lm_head(a.model.norm(h))


@pytest.mark.parametrize("seed", [0, 1])
def test_random_plan_matches_stepwise_reference(seed, llama_pair):
    pool = LayerPool({"A": str(llama_pair["A"]), "B": str(llama_pair["B"])})
    hf = {"A": _hf(llama_pair["A"]), "B": _hf(llama_pair["B"])}
    rng = random.Random(seed)
    plan = _random_plan(rng, 4, 7)
    ids = torch.randint(5, 40, (2, 10), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0  # right padding on one row
    with torch.no_grad():
        want = _reference_forward(hf, plan, ids, mask)
        got = StitchedModel.from_pool(pool, plan)(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert torch.allclose(got[keep], want[keep], atol=1e-5, rtol=1e-5), _report(got[keep], want[keep])


def test_embedding_from_another_model(llama_pair):
    pool = LayerPool({"A": str(llama_pair["A"]), "B": str(llama_pair["B"])})
    hf = {"A": _hf(llama_pair["A"]), "B": _hf(llama_pair["B"])}
    plan = PathPlan(tuple(Step(LayerRef("A", i)) for i in range(4)), models={"A": "A", "B": "B"}, base="A",
                    embed="B")
    ids = torch.randint(5, 40, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = _reference_forward(hf, plan, ids, torch.ones(1, 6))
        got = StitchedModel.from_pool(pool, plan)(ids).logits
    assert torch.allclose(got, want, atol=1e-5), _report(got, want)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_greedy_with_cache_equals_full_recompute(family, tiny_family_ckpts, family_pools):
    pool = family_pools[family]
    plan = PathPlan((Step(LayerRef("A", 0)), Step(LayerRef("B", 1), 0.9), Step(LayerRef("A", 1), 1.2),
                     Step(LayerRef("A", 1), 0.8), Step(LayerRef("B", 2)), Step(LayerRef("A", 2))),
                    models={"A": "A", "B": "B"}, base="A")
    model = StitchedModel.from_pool(pool, plan)
    ids = torch.randint(5, 40, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=8, use_cache=True)
        full = model.generate(ids, attention_mask=mask, max_new_tokens=8, use_cache=False)
        out = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
    assert cached.shape == (2, 14)
    assert torch.equal(cached, full), f"cached {cached.tolist()} vs recompute {full.tolist()}"
    # every hop owns a slot: the repeated layer A[1] keeps two caches
    assert len(out.cache.layers) == len(plan)
    k3, k4 = out.cache.layers[2].keys, out.cache.layers[3].keys
    assert not torch.equal(k3, k4)


def test_cache_logits_match_recompute_each_step(llama_pair):
    """Stronger than token equality: the logits of each cached step equal a full recompute."""
    pool = LayerPool({"A": str(llama_pair["A"]), "B": str(llama_pair["B"])})
    plan = _random_plan(random.Random(5), 4, 6)
    model = StitchedModel.from_pool(pool, plan)
    ids = torch.randint(5, 40, (1, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        seq = ids
        for _ in range(4):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            out = model(nxt, cache=out.cache, use_cache=True)
            full = model(seq).logits[:, -1]
            assert torch.allclose(out.logits[:, -1], full, atol=1e-5), _report(out.logits[:, -1], full)


def test_sampling_reproducible_and_top_k_one_is_greedy(llama_pair):
    pool = LayerPool({"A": str(llama_pair["A"])})
    model = StitchedModel.from_pool(pool, PathPlan.identity("A", 4))
    ids = torch.randint(5, 40, (2, 4), generator=torch.Generator().manual_seed(6))
    s1 = model.generate(ids, max_new_tokens=6, do_sample=True, temperature=1.3, top_p=0.9,
                        generator=torch.Generator().manual_seed(0))
    s2 = model.generate(ids, max_new_tokens=6, do_sample=True, temperature=1.3, top_p=0.9,
                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(s1, s2)
    greedy = model.generate(ids, max_new_tokens=6)
    k1 = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(greedy, k1)


def test_generate_stops_at_eos_and_pads(llama_pair):
    pool = LayerPool({"A": str(llama_pair["A"])})
    model = StitchedModel.from_pool(pool, PathPlan.identity("A", 4))
    ids = torch.randint(5, 40, (2, 4), generator=torch.Generator().manual_seed(7))
    free = model.generate(ids, max_new_tokens=5)
    eos = int(free[0, 5])  # the second generated token of row 0
    first = 4 + int((free[0, 4:] == eos).nonzero()[0])  # where row 0 first produces it
    out = model.generate(ids, max_new_tokens=5, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out[0, :first + 1], free[0, :first + 1])
    assert (out[0, first + 1:] == 0).all()
    assert out.shape[1] == 9 or bool((out[1, 4:] == eos).any())  # stopped early only if row 1 finished too


def test_switching_plans_copies_no_weights(llama_pair):
    pool = LayerPool({"A": str(llama_pair["A"]), "B": str(llama_pair["B"])})
    ptrs = {n: p.data_ptr() for m in pool for n, p in m.model.named_parameters(prefix=m.name)}
    model = StitchedModel.from_pool(pool, PathPlan.identity("A", 4))
    plan = _random_plan(random.Random(9), 4, 8)
    model.set_plan(pool, plan)
    assert [h.layer for h in model.hops] == [pool.layer(s.layer) for s in plan.steps]
    assert model.config.num_hidden_layers == 8
    assert {n: p.data_ptr() for m in pool for n, p in m.model.named_parameters(prefix=m.name)} == ptrs


def test_cache_from_other_path_is_rejected(llama_pair):
    pool = LayerPool({"A": str(llama_pair["A"])})
    long = StitchedModel.from_pool(pool, PathPlan.identity("A", 4))
    short = StitchedModel.from_pool(pool, PathPlan((Step(LayerRef("A", 0)),), models={"A": "A"}, base="A"))
    ids = torch.randint(5, 40, (1, 3))
    cache = long(ids, use_cache=True).cache
    with pytest.raises(ConfigError, match="hops"):
        short(ids[:, :1], cache=cache, use_cache=True)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_identity_greedy_generation_matches_hf_generate(family, tiny_family_ckpts, family_pools):
    a, _ = tiny_family_ckpts[family]
    ref = _hf(a)
    model = StitchedModel.from_pool(family_pools[family], PathPlan.identity("A", 3))
    ids = torch.randint(5, 40, (2, 6), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                            eos_token_id=None)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=10)
    assert torch.equal(got, want), f"{got.tolist()} vs {want.tolist()}"


@pytest.fixture(scope="module")
def mistral_window8(tmp_path_factory):
    """A tiny Mistral with an 8-token sliding window (sdpa attention, sliding masks on every layer)."""
    import json

    from dfsmerge.zoo.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("mistral_w8")
    a = make_tiny_checkpoint("mistral", root / "a", seed=8, num_layers=2, hidden=32)
    cfg = json.loads((a / "config.json").read_text())
    cfg["sliding_window"] = 8
    (a / "config.json").write_text(json.dumps(cfg))
    return a


def test_mistral_sliding_window_forward_and_generation_match_hf(mistral_window8):
    ref = _hf(mistral_window8)
    pool = LayerPool({"A": str(mistral_window8)})
    assert pool.attention_type(LayerRef("A", 0)) == "sliding_attention"
    model = StitchedModel.from_pool(pool, PathPlan.identity("A", 2))
    ids = torch.randint(5, 40, (2, 20), generator=torch.Generator().manual_seed(12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask, position_ids=pos).logits
        got = model(ids, attention_mask=mask, position_ids=pos).logits
        keep = mask.bool()
        assert torch.allclose(got[keep], want[keep], atol=1e-5), _report(got[keep], want[keep])
        gen_ref = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                               eos_token_id=None)
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=12)
        full = model.generate(ids, attention_mask=mask, max_new_tokens=12, use_cache=False)
    assert torch.equal(gen, gen_ref) and torch.equal(gen, full)


def test_gemma2_cross_type_plan_matches_reference_with_per_layer_masks(tiny_family_ckpts, family_pools):
    """Sliding and full layers moved to other positions keep their own mask (window 64, sequence 72)."""
    a, b = tiny_family_ckpts["gemma2"]
    pool = family_pools["gemma2"]
    hf = {"A": _hf(a), "B": _hf(b)}
    window = hf["A"].config.sliding_window
    types = hf["A"].config.layer_types
    plan = PathPlan((Step(LayerRef("A", 1), 1.1), Step(LayerRef("B", 0), 0.9), Step(LayerRef("A", 0), 1.0),
                     Step(LayerRef("B", 1), 1.3), Step(LayerRef("A", 2), 0.8)), models={"A": "A", "B": "B"},
                    base="A")
    T = window + 8
    ids = torch.randint(5, 40, (1, T), generator=torch.Generator().manual_seed(13))
    q = torch.arange(T)[:, None]
    k = torch.arange(T)[None, :]
    allowed = {"full_attention": k <= q, "sliding_attention": (k <= q) & (q - k < window)}
    masks = {t: torch.zeros(1, 1, T, T).masked_fill(~m, torch.finfo(torch.float32).min) for t, m in allowed.items()}
    with torch.no_grad():
        h = hf["A"].model.embed_tokens(ids)
        pos = torch.arange(T)[None]
        pe = hf["A"].model.rotary_emb(h, pos)
        for step in plan.steps:
            layer = hf[step.layer.model].model.layers[step.layer.index]
            h = layer(h * step.scale, attention_mask=masks[types[step.layer.index]], position_ids=pos,
                      position_embeddings=pe)
        want = hf["A"].lm_head(hf["A"].model.norm(h))
        cap = hf["A"].config.final_logit_softcapping
        want = torch.tanh(want / cap) * cap
        got = StitchedModel.from_pool(pool, plan)(ids).logits
    assert torch.allclose(got, want, atol=1e-5), _report(got, want)
