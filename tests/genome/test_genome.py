"""PS genome (against mergekit-evolve), GenomeSpace modes, candidates and their keys."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dfsmerge.errors import ConfigError
from dfsmerge.genome import MERGED, Candidate, GenomeSpace, PSGenome
from dfsmerge.genome.dfs import DFSGenome, Infeasible
from dfsmerge.genome.plan import PathPlan
from dfsmerge.zoo.tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("genome")
    a = make_tiny_checkpoint("llama", root / "a", seed=1, num_layers=4, hidden=32)
    return {"A": str(a), "B": str(make_tiny_checkpoint("llama", root / "b", seed=2, like=a, delta_std=0.1)),
            "C": str(make_tiny_checkpoint("llama", root / "c", seed=3, like=a, delta_std=0.1))}


def _close(a, b, path="$"):
    """Structural equality with float tolerance; returns the first differing path or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{path}: keys {sorted(a)} vs {sorted(b)}"
        return next((r for k in a if (r := _close(a[k], b[k], f"{path}.{k}"))), None)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: lengths {len(a)} vs {len(b)}"
        return next((r for i, (x, y) in enumerate(zip(a, b)) if (r := _close(x, y, f"{path}[{i}]"))), None)
    if isinstance(a, float) or isinstance(b, float):
        return None if abs(float(a) - float(b)) <= 1e-8 else f"{path}: {a} vs {b}"
    return None if a == b else f"{path}: {a!r} vs {b!r}"


@pytest.mark.parametrize("method, kw", [
    ("ties", dict(layer_granularity=2, filters=["self_attn", "mlp"])),
    ("dare_ties", dict(layer_granularity=1)),
    ("task_arithmetic", dict(layer_granularity=2, smooth=True, filters=["mlp"])),
    ("linear", dict(layer_granularity=0, allow_negative_weights=True)),
])
def test_ps_recipe_matches_mergekit_evolve(method, kw, ckpts):
    from mergekit.config import MergeConfiguration
    from mergekit.evo.genome import ModelGenome, ModelGenomeDefinition

    base = None if method == "linear" else "A"
    ours = PSGenome({"B": ckpts["B"], "C": ckpts["C"]}, method, 4, base_model=base,
                    extra_models={"A": ckpts["A"]}, **kw)
    theirs = ModelGenome(ModelGenomeDefinition(models=[ckpts["B"], ckpts["C"]], merge_method=method,
                                               base_model=ckpts[base] if base else None, **kw))
    x = np.random.default_rng(0).normal(0.3, 0.5, ours.dim)
    assert ours.dim == theirs.initial_genotype().numel()
    assert np.allclose(ours.initial(), theirs.initial_genotype().numpy().reshape(-1))
    want = theirs.genotype_merge_config(x)
    got = MergeConfiguration.model_validate(ours.decode(x).to_mergekit())
    got_d = got.model_dump(exclude_none=True, mode="json")
    want_d = want.model_dump(exclude_none=True, mode="json")
    for field in ("slices", "models", "base_model", "merge_method"):
        diff = _close(got_d.get(field), want_d.get(field), field)
        assert diff is None, diff
    assert got.parameters["normalize"] == want.parameters["normalize"]


def test_ps_genome_errors():
    with pytest.raises(ConfigError, match="layer_granularity=3 does not divide num_hidden_layers=4"):
        PSGenome({"A": "a", "B": "b"}, "linear", 4, layer_granularity=3)
    with pytest.raises(ConfigError, match="needs base_model"):
        PSGenome({"A": "a", "B": "b"}, "ties", 4)
    with pytest.raises(ConfigError, match="merge_method='frob'"):
        PSGenome({"A": "a"}, "frob", 4)
    with pytest.raises(ConfigError, match="slerp"):
        PSGenome({"A": "a", "B": "b"}, "slerp", 4, base_model="A", filters=["mlp"])


def _space(mode, *, stage=1):
    ps = PSGenome({"B": "b", "C": "c"}, "ties", 4, base_model="A", extra_models={"A": "a"}, layer_granularity=2,
                  filters=["mlp"])
    first = MERGED if mode in ("joint", "staged") else "A"
    dfs = DFSGenome({first: 4, "B": 4}, repetitions=2, scales="per_step", max_repeats=2,
                    embed_choices=(first, "B"))
    space = GenomeSpace(mode, ps=ps if mode != "dfs" else None, dfs=dfs if mode != "ps" else None)
    if mode == "staged" and stage == 2:
        space = space.with_stage(2, ps.decode(ps.initial()))
    return space


SPACES = [("ps", 1), ("dfs", 1), ("joint", 1), ("staged", 1), ("staged", 2)]


@pytest.mark.parametrize("mode, stage", SPACES)
def test_initial_candidate_is_the_starting_model(mode, stage):
    space = _space(mode, stage=stage)
    lo, hi = space.bounds
    assert lo.shape == hi.shape == (space.dim,) and (lo < hi).all()
    cand = space.decode(space.initial())
    if space._parts[1] is not None:
        first = MERGED if mode != "dfs" else "A"
        assert cand.path == PathPlan.identity(first, 4, models={first: first, "B": "B"})
    if mode in ("ps", "joint") or (mode, stage) == ("staged", 1):
        assert cand.ps is not None and cand.ps.to_mergekit()["merge_method"] == "ties"


@pytest.mark.parametrize("mode, stage", SPACES)
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_decode_encode_round_trip(mode, stage, seed):
    space = _space(mode, stage=stage)
    x = np.random.default_rng(seed).uniform(-1.5, 1.5, space.dim)
    cand = space.decode(x)
    if isinstance(cand.path, Infeasible):
        with pytest.raises(ConfigError):
            space.encode(cand)
        return
    again = space.decode(space.encode(cand))
    assert again == cand
    assert again.key() == cand.key()
    assert hash(again) == hash(cand)


def test_keys_are_stable_and_distinguish_candidates():
    space = _space("joint")
    c1 = space.decode(space.initial())
    x = space.initial()
    x[0] += 0.25
    c2 = space.decode(x)
    assert c1.key() == space.decode(space.initial()).key()
    assert c1.key() != c2.key()
    assert len({c1: 1, c2: 2}) == 2
    assert Candidate(path=Infeasible("too long")).key() != c1.key()


def test_space_errors():
    with pytest.raises(ConfigError, match="mode='both'"):
        GenomeSpace("both")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs a DFS genome"):
        GenomeSpace("joint", ps=_space("ps").ps)
    with pytest.raises(ConfigError, match="'merged'"):
        GenomeSpace("joint", ps=_space("ps").ps, dfs=_space("dfs").dfs)
    with pytest.raises(ConfigError, match="fixed_ps"):
        _space("staged").with_stage(2)
    space = _space("dfs")
    with pytest.raises(ConfigError, match="dim="):
        space.decode(np.zeros(space.dim + 1))


@pytest.mark.parametrize("mode, stage", SPACES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_vector_decodes_without_crashing(mode, stage, data):
    from mergekit.config import MergeConfiguration

    space = _space(mode, stage=stage)
    x = data.draw(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=space.dim,
                           max_size=space.dim))
    cand = space.decode(np.array(x))
    if cand.ps is not None:
        MergeConfiguration.model_validate(cand.ps.to_mergekit())  # always a valid mergekit recipe
    if cand.path is not None and not isinstance(cand.path, Infeasible):
        cand.path.validate(space.dfs.layers)
    assert isinstance(cand.key(), str)


def test_spaces_and_candidates_pickle():
    import pickle

    space = _space("joint")
    cand = space.decode(space.initial())
    space2 = pickle.loads(pickle.dumps(space))
    assert space2 == space and space2.decode(space.initial()) == cand
    assert pickle.loads(pickle.dumps(cand)) == cand


def test_initial_weight_starts_every_weight_gene_there(ckpts):
    """initial_weight moves only the weight genes' start (densities stay at 1); a start outside the bounds or
    for a method without weights is refused."""
    g = PSGenome({"B": ckpts["B"], "C": ckpts["C"]}, "ties", 4, base_model="A", extra_models={"A": ckpts["A"]},
                 layer_granularity=2, initial_weight=1.0)
    x = g.initial().reshape(g.shape)
    assert np.all(x[..., g.genes.index("weight")] == 1.0) and np.all(x[..., g.genes.index("density")] == 1.0)
    per_input, _ = g.decode(g.initial()).tensor_params("model.layers.3.mlp.up_proj.weight", 3)
    assert [p.get("weight") for p in per_input[:2]] == [1.0, 1.0]
    with pytest.raises(ConfigError, match="initial_weight=1.5"):
        PSGenome({"B": ckpts["B"]}, "task_arithmetic", 4, base_model="A", extra_models={"A": ckpts["A"]},
                 initial_weight=1.5)
    PSGenome({"B": ckpts["B"]}, "linear", 4, allow_negative_weights=True, initial_weight=-0.5)
    with pytest.raises(ConfigError, match="no weight genes"):
        PSGenome({"B": ckpts["B"], "C": ckpts["C"]}, "slerp", 4, base_model="B", initial_weight=0.5)
