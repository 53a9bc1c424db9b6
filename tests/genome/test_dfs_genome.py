"""DFS genome (Sakana AI, arXiv 2403.13187, sec. 3.2): decoding semantics, constraints, repair, round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dfsmerge.errors import ConfigError
from dfsmerge.genome.dfs import SCALE_MODES, DFSGenome, Infeasible
from dfsmerge.genome.plan import LayerRef, PathPlan, Step


def _vec(g, on_slots=(), scale_genes=None, off=-0.5):
    x = np.zeros(g.dim)
    x[: g.num_slots] = off
    for t in on_slots:
        x[t] = 0.5
    if scale_genes is not None:
        x[g.num_slots: g.num_slots + g.num_scale_genes] = scale_genes
    return x


@pytest.mark.parametrize("scales", SCALE_MODES)
def test_initial_is_model_a_at_scale_one(scales):
    g = DFSGenome({"A": 3, "B": 2}, repetitions=3, scales=scales)
    assert g.num_slots == 15
    plan = g.decode(g.initial())
    assert plan == PathPlan.identity("A", 3, models={"A": "A", "B": "B"})
    assert g.initial()[:15].tolist() == [0.5] * 3 + [-0.5] * 12


def test_paper_initialisation_option_off_zero_is_still_model_a():
    g = DFSGenome({"A": 2, "B": 2}, init_off=0.0)
    assert set(g.initial()[2: g.num_slots]) == {0.0}
    assert g.decode(g.initial()).layers == (LayerRef("A", 0), LayerRef("A", 1))


def test_slots_follow_pool_order_and_repetitions():
    g = DFSGenome({"A": 2, "B": 3}, repetitions=2, scales="none")
    # slot t is pool layer t mod M: M = 5; slots 1, 3, 5, 6 -> A1, B1, A0(rep 1), A1(rep 1)
    plan = g.decode(_vec(g, (1, 3, 5, 6)))
    assert plan.layers == (LayerRef("A", 1), LayerRef("B", 1), LayerRef("A", 0), LayerRef("A", 1))


def test_indicator_threshold_is_strictly_positive():
    g = DFSGenome({"A": 2}, repetitions=1, scales="none")
    x = np.array([1e-9, 0.0])
    assert g.decode(x).layers == (LayerRef("A", 0),)


def test_full_scales_use_w_ij_of_the_transition():
    g = DFSGenome({"A": 2, "B": 2}, repetitions=2, scales="full")
    M = 4
    W = np.zeros((M, M))
    W[0, 2] = 0.3  # A0 -> B0
    W[2, 1] = -0.7  # B0 -> A1
    plan = g.decode(_vec(g, (0, 2, 5), W.reshape(-1)))
    assert plan.layers == (LayerRef("A", 0), LayerRef("B", 0), LayerRef("A", 1))
    assert plan.scales == (1.0, round(math.exp(0.3), 9), round(math.exp(-0.7), 9))


def test_per_layer_and_per_step_scales():
    g = DFSGenome({"A": 2}, repetitions=2, scales="per_layer")
    plan = g.decode(_vec(g, (0, 1, 3), [0.2, -0.4]))
    assert plan.scales == tuple(round(math.exp(s), 9) for s in (0.2, -0.4, -0.4))
    g = DFSGenome({"A": 2}, repetitions=2, scales="per_step")
    plan = g.decode(_vec(g, (0, 1, 3), [0.2, -0.4, 9.0, 1.0]))
    assert plan.scales == tuple(round(math.exp(s), 9) for s in (0.2, -0.4, 1.0))


def test_scales_clipped_to_bound_and_positive():
    g = DFSGenome({"A": 2}, repetitions=1, scales="per_step", scale_bound=1.5)
    plan = g.decode(_vec(g, (0, 1), [50.0, -50.0]))
    assert plan.scales == (round(math.exp(1.5), 9), round(math.exp(-1.5), 9))


def test_repair_and_infeasible():
    kw = dict(layers={"A": 3, "B": 3}, repetitions=2, scales="none", min_length=2, max_length=3, max_repeats=1)
    g = DFSGenome(**kw)
    x = _vec(g, ())
    x[4] = -0.1  # the strongest off slot (B1) is switched on first
    x[7] = -0.2  # then A1 of repetition 2
    assert g.decode(x).layers == (LayerRef("B", 1), LayerRef("A", 1))
    x = _vec(g, (0, 1, 2, 6))  # A0 twice: max_repeats keeps the first
    x[6] = 0.9  # ... unless the later one is stronger
    assert g.decode(x).layers == (LayerRef("A", 1), LayerRef("A", 2), LayerRef("A", 0))
    strict = DFSGenome(**kw, repair=False)
    out = strict.decode(_vec(g, (0, 1, 2, 3)))
    assert isinstance(out, Infeasible) and "max_length 3" in out.reason


def test_forced_first_and_last_layers_of_a():
    g = DFSGenome({"A": 3, "B": 3}, repetitions=2, scales="none", force_first=True, force_last=True)
    plan = g.decode(_vec(g, (4, 5, 10)))  # B1 B2 | B1(rep 2)
    assert plan.layers[0] == LayerRef("A", 0) and plan.layers[-1] == LayerRef("A", 2)
    assert LayerRef("B", 1) in plan.layers


def test_embedding_choice_genes():
    g = DFSGenome({"A": 2, "B": 2}, embed_choices=["A", "B"])
    assert g.num_embed_genes == 2
    x = g.initial()
    assert g.decode(x).embed is None
    x[-1] = 1.0
    plan = g.decode(x)
    assert plan.embed == "B" and plan.embed_model == "B"
    assert g.decode(g.encode(plan)) == plan


def test_encode_rejects_what_the_genome_cannot_express():
    g = DFSGenome({"A": 2, "B": 2}, repetitions=1, scales="per_layer")
    too_many = PathPlan((Step(LayerRef("A", 1)), Step(LayerRef("A", 0))), models={"A": "A", "B": "B"}, base="A")
    with pytest.raises(ConfigError, match="repetitions=1"):
        g.encode(too_many)
    g2 = DFSGenome({"A": 2, "B": 2}, repetitions=2, scales="per_layer")
    conflict = PathPlan((Step(LayerRef("A", 0), 1.2), Step(LayerRef("A", 0), 0.8)), models={"A": "A"}, base="A")
    with pytest.raises(ConfigError, match="per_step"):
        g2.encode(conflict)
    with pytest.raises(ConfigError, match="not in the pool"):
        g.encode(PathPlan((Step(LayerRef("C", 0)),), models={"C": "c"}, base="C"))
    with pytest.raises(ConfigError, match="dim="):
        g.decode(np.zeros(3))


def test_bad_definitions_are_config_errors():
    with pytest.raises(ConfigError, match="repetitions"):
        DFSGenome({"A": 2}, repetitions=0)
    with pytest.raises(ConfigError, match="scales='diag'"):
        DFSGenome({"A": 2}, scales="diag")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="min_length"):
        DFSGenome({"A": 2}, repetitions=1, min_length=3)
    with pytest.raises(ConfigError, match="first pool model"):
        DFSGenome({"A": 2, "B": 2}, base="B")


genome_defs = st.builds(
    lambda na, nb, r, scales, min_len, span, max_rep, ff, fl, repair, emb: DFSGenome(
        {"A": na, "B": nb}, repetitions=r, scales=scales, min_length=min(min_len, (na + nb) * r),
        max_length=min(min_len + span, (na + nb) * r), max_repeats=max_rep, force_first=ff, force_last=fl,
        repair=repair, embed_choices=("A", "B") if emb else ()),
    st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.sampled_from(SCALE_MODES), st.integers(1, 6),
    st.integers(0, 8), st.one_of(st.none(), st.integers(1, 3)), st.booleans(), st.booleans(), st.booleans(),
    st.booleans())


@settings(max_examples=300, deadline=None)
@given(g=genome_defs, data=st.data())
def test_random_genomes_decode_to_valid_plan_or_infeasible(g, data):
    x = np.array(data.draw(st.lists(st.one_of(st.floats(-3, 3), st.just(float("nan"))), min_size=g.dim,
                                    max_size=g.dim)))
    out = g.decode(x)
    if isinstance(out, Infeasible):
        assert out.reason
        return
    out.validate(g.layers)
    assert g.min_length <= len(out) <= g.max_len
    counts = {}
    for ref in out.layers:
        counts[ref] = counts.get(ref, 0) + 1
    assert max(counts.values()) <= (g.max_repeats or g.repetitions)
    if g.force_first:
        assert out.layers[0] == LayerRef("A", 0)
    if g.force_last:
        assert out.layers[-1] == LayerRef("A", g.layers["A"] - 1)
    assert all(math.exp(-g.scale_bound) - 1e-9 <= s <= math.exp(g.scale_bound) + 1e-9 for s in out.scales)
    assert g.decode(g.encode(out)) == out


def test_single_embed_choice_fixes_the_embedding_without_a_gene():
    g = DFSGenome({"A": 2, "B": 2}, embed_choices=["B"])
    assert g.num_embed_genes == 0
    plan = g.decode(g.initial())
    assert plan.embed == "B" and plan.layers == (LayerRef("A", 0), LayerRef("A", 1))
    assert g.decode(g.encode(plan)) == plan
    with pytest.raises(ConfigError, match="fixes the embedding"):
        g.encode(PathPlan.identity("A", 2, models={"A": "A", "B": "B"}))
