"""Prefix reuse (dfsmerge.runtime.prefix): a stitched model that resumes forward calls from stored path prefixes
gives bit-identical logits, caches and generations to one that computes every step (the reference: the same model
without a store)."""

from __future__ import annotations

import pytest
import torch

from dfsmerge.genome.plan import LayerRef, PathPlan, Step
from dfsmerge.runtime.pool import LayerPool
from dfsmerge.runtime.prefix import PrefixStore
from dfsmerge.runtime.stitched import StitchedModel

# rotary; per-layer sliding/full attention with two rotary bases; learned positions; an embedding multiplier
FAMS = ["llama", "gemma3_text", "gpt2", "granite"]


def _plans(n_a: int, n_b: int) -> list[PathPlan]:
    """Paths that share prefixes of different lengths, as a search's neighbouring candidates do."""
    A = [Step(LayerRef("A", i)) for i in range(n_a)]
    B = [Step(LayerRef("B", i), 0.9) for i in range(n_b)]
    raw = [A, A[:2] + B[1:], A[:2] + B[1:2] + A[2:], A[:1] + [Step(LayerRef("A", 1), 1.1)] + A[2:], A, B + A[1:],
           A[:2] + B[1:]]
    return [PathPlan(tuple(s), models={"A": "A", "B": "B"}, base="A") for s in raw]


def _mc_like(model, ctx, ctx_mask, cont, prefix=None):
    """Native multiple choice's pattern: a cached left-padded prefill, rows re-indexed, continuations on top. With
    ``prefix`` (1, P), native shared prompts' pattern: that one-row prefix runs first and is re-indexed to every row,
    so the left-padded batch after it has padding in the middle of its mask."""
    B, P = ctx.shape[0], 0 if prefix is None else prefix.shape[1]
    cache = None
    if prefix is not None:
        o0 = model(prefix, attention_mask=torch.ones_like(prefix), position_ids=torch.arange(P)[None, :],
                   use_cache=True)
        cache = o0.cache
        cache.batch_select_indices(torch.zeros(B, dtype=torch.long))
    seen = torch.cat([torch.ones(B, P, dtype=torch.long), ctx_mask], dim=1)
    pos = P + (ctx_mask.cumsum(-1) - 1).clamp(min=0)
    o = model(ctx, attention_mask=seen, position_ids=pos, cache=cache, use_cache=True)
    index = torch.tensor([1, 0, 1])
    o.cache.batch_select_indices(index)
    full = torch.cat([seen[index], torch.ones(3, cont.shape[1], dtype=torch.long)], dim=1)
    cpos = (P + ctx_mask.sum(-1))[index][:, None] + torch.arange(cont.shape[1])[None, :]
    o2 = model(cont, attention_mask=full, position_ids=cpos, cache=o.cache, use_cache=True)
    return o.logits, o2.logits


def _twins(ckpts):
    """The pool of a family's two models, the test paths, and two stitched models over them: ``ref`` computes
    everything, ``got`` has a prefix store."""
    a, b = ckpts
    pool = LayerPool({"A": str(a), "B": str(b)})
    plans = _plans(3, 3)
    ref = StitchedModel.from_pool(pool, plans[0])
    got = StitchedModel.from_pool(pool, plans[0])
    got.prefix_store = PrefixStore(64)
    return pool, plans, ref, got


@pytest.mark.parametrize("family", FAMS)
def test_stored_prefixes_give_bit_identical_results(family, tiny_family_ckpts):
    pool, plans, ref, got = _twins(tiny_family_ckpts[family])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 40, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    cont = torch.randint(5, 40, (3, 4), generator=g)
    with torch.no_grad():
        for _ in range(2):  # the second round is served from the store throughout
            for plan in plans:
                for m in (ref, got):
                    m.set_plan(pool, plan)
                assert torch.equal(got(ids).logits, ref(ids).logits)  # no cache, no mask
                for x, y in zip(_mc_like(got, ids, mask, cont), _mc_like(ref, ids, mask, cont), strict=True):
                    assert torch.equal(x, y)
                gen = dict(attention_mask=mask, max_new_tokens=5)
                assert torch.equal(got.generate(ids, **gen), ref.generate(ids, **gen))
    st = got.prefix_stats
    assert st.hits > 0 and st.cached_tokens > 0
    assert st.forward_tokens + st.cached_tokens == pytest.approx(st.tokens)
    assert ref.prefix_stats.cached_tokens == 0 and ref.prefix_stats.forward_tokens == st.tokens


@pytest.mark.parametrize("family", FAMS)
def test_shared_prompt_prefixes_through_the_store(family, tiny_family_ckpts):
    # the stitched model serves the shared-prompt pattern from the store bit for bit, and it equals the same batch
    # run without a separate prefix pass up to float rounding
    pool, plans, ref, got = _twins(tiny_family_ckpts[family])
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(5, 40, (1, 6), generator=g)
    rest = torch.randint(5, 40, (2, 4), generator=g)
    mask = torch.ones(2, 4, dtype=torch.long)
    mask[0, :2] = 0
    cont = torch.randint(5, 40, (3, 3), generator=g)
    whole = torch.cat([prefix.expand(2, -1), rest], dim=1)
    whole_mask = torch.cat([torch.ones(2, 6, dtype=torch.long), mask], dim=1)
    with torch.no_grad():
        for _ in range(2):
            for plan in plans:
                for m in (ref, got):
                    m.set_plan(pool, plan)
                shared = _mc_like(got, rest, mask, cont, prefix)
                for x, y in zip(shared, _mc_like(ref, rest, mask, cont, prefix), strict=True):
                    assert torch.equal(x, y)
                # unshared: the whole prompts in one batch (the prefix's positions are 0..5 in every row)
                pos = (whole_mask.cumsum(-1) - 1).clamp(min=0)
                o = ref(whole, attention_mask=whole_mask, position_ids=pos, use_cache=True)
                real = mask.bool()
                assert torch.allclose(shared[0][real], o.logits[:, 6:][real], atol=1e-5, rtol=1e-4)
    assert got.prefix_stats.hits > 0


def test_budget_evicts_least_recently_used(llama_pair):
    pool = LayerPool({"A": str(llama_pair["A"]), "B": str(llama_pair["B"])})
    model = StitchedModel.from_pool(pool, PathPlan.identity("A", 4))
    store = PrefixStore(memory_mb=0.01)  # 10 KiB: a few (2, 9, 32) fp32 states (2.3 KiB each)
    model.prefix_store = store
    with torch.no_grad():
        for s in range(6):
            model(torch.randint(5, 40, (2, 9), generator=torch.Generator().manual_seed(s)))
    assert 0 < store.bytes <= store.budget
    assert len(store.entries) == store.bytes // (2 * 9 * 32 * 4)


def test_rewritten_weights_are_never_served_stale(llama_pair):
    """The PS-merged model's weights change in place: bump() must retire every state that read them."""
    pool = LayerPool({"A": str(llama_pair["A"]), "B": str(llama_pair["B"])})
    plan = PathPlan((Step(LayerRef("B", 0)), Step(LayerRef("A", 1)), Step(LayerRef("A", 2))),
                    models={"A": "A", "B": "B"}, base="A", embed="B")
    model = StitchedModel.from_pool(pool, plan)
    store = PrefixStore(64)
    store.mark_volatile([pool["A"].model])
    model.prefix_store = store
    ids = torch.randint(5, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids)
        layer = pool["A"].model.model.layers[1]
        layer.mlp.down_proj.weight.mul_(1.5)  # what PSBuffers.apply does to the merged model
        store.bump()
        hits = model.prefix_stats.hits
        got = model(ids).logits
        assert model.prefix_stats.hits == hits + 1  # B's embedding and layer 0 (not volatile): still served
        model.prefix_store = None
        assert torch.equal(got, model(ids).logits)
