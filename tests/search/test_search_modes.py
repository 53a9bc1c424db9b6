"""Every optimizer end to end in every mode over tiny checkpoints: the run directory's contents and the wiring of
objectives, best candidate, Pareto set and report, each checked against an independent recomputation."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import yaml

from dfsmerge.runtime.stitched import StitchedModel
from dfsmerge.search import load_search_config, run_search
from tests.search.conftest import read_evals

MODES = ("ps", "dfs", "staged", "joint")
OPTIMIZERS = ("cma", "nsga2", "random")


def _dominated(a, b) -> bool:
    """b dominates a (brute force reference)."""
    return all(y <= x for x, y in zip(a, b, strict=True)) and any(y < x for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("mode", MODES)
def test_search_end_to_end(mode, optimizer, make_config, tmp_path):
    cfg = load_search_config(make_config(mode, optimizer, popsize=4, max_evals=8))
    run = tmp_path / "run"
    res = run_search(cfg, run, progress=False)
    evals = read_evals(run)
    assert [r["id"] for r in evals] == list(range(len(evals)))
    assert len(evals) >= 4 and res.n_evals == len(evals)
    for r in evals:
        c = r["candidate"]
        stage = r["stage"]
        has_ps = mode in ("ps", "joint", "staged")
        has_path = mode in ("dfs", "joint") or (mode == "staged" and stage == 2)
        assert (c["ps"] is not None) == has_ps, r
        assert (c["path"] is not None or "infeasible" in c) == has_path, r
        if r["error"]:
            assert r["fitness"] is None
            continue
        # cost/hops recomputed from the logged candidate: path length, or the 2 layers of a PS-only model
        hops = len(c["path"]["path"]) if c["path"] is not None else 2
        assert r["objectives"]["cost/hops"] == hops
        expect = 1.0 * r["values"]["cost/hops"] + 0.5 * r["values"]["synthetic/sphere"]
        assert math.isclose(r["fitness"], expect, rel_tol=1e-12)
        if mode in ("joint", "staged") and c["path"] is not None:
            assert c["path"]["models"]["merged"] == "@ps"
    final = [r for r in evals if r["fitness"] is not None]  # best and Pareto set span every stage
    best = json.loads((run / "best" / "best.json").read_text())
    assert best["fitness"] == min(r["fitness"] for r in final)
    assert best["id"] == min(r["id"] for r in final if r["fitness"] == best["fitness"])
    if mode == "staged":
        s1 = [r for r in evals if r["stage"] == 1 and r["fitness"] is not None]
        s1_best = min(s1, key=lambda r: (r["fitness"], r["id"]))
        assert all(r["candidate"]["ps"] == s1_best["candidate"]["ps"] for r in evals if r["stage"] == 2)
    if best["candidate"]["ps"] is not None:
        from mergekit.config import MergeConfiguration

        from dfsmerge.recipe.config import load_merge_config

        recipe = yaml.safe_load((run / "best" / "recipe.yaml").read_text())
        assert recipe == best["candidate"]["ps"]
        MergeConfiguration.model_validate(recipe)  # the oracle reads it
        load_merge_config(run / "best" / "recipe.yaml")
    if best["candidate"]["path"] is not None:
        from dfsmerge.genome.plan import PathPlan

        assert PathPlan.load(run / "best" / "plan.yaml") == PathPlan.from_dict(best["candidate"]["path"])
    assert (run / "best" / "mergekit.yaml").is_file()
    if cfg.n_obj > 1:  # two objectives and an optimizer that takes their vector (nsga2, random): Pareto
        pareto = [json.loads(line) for line in (run / "pareto.jsonl").read_text().splitlines()]
        keys = list(final[0]["values"])
        pts = {r["id"]: [r["values"][k] for k in keys] for r in final}
        ids = {p["id"] for p in pareto}
        assert ids
        for i, v in pts.items():  # non-dominated <=> in the Pareto file (first of equal candidates)
            dominated = any(_dominated(v, w) for j, w in pts.items() if j != i)
            if i in ids:
                assert not dominated
            elif not dominated:
                assert any(pts[j] == v for j in ids)
    else:
        assert not (run / "pareto.jsonl").exists()
    assert (run / "report" / "report.md").is_file() and (run / "report" / "fitness.png").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert load_search_config(saved) == cfg


def test_ps_recipe_reproduces_runtime_weights(make_config, tmp_path, tiny_models):
    """best/recipe.yaml run through `dfsmerge merge` gives the weights the search evaluated (PS buffers)."""
    import torch

    from dfsmerge.io import open_checkpoint
    from dfsmerge.recipe.config import load_merge_config
    from dfsmerge.recipe.executor import run_merge
    from dfsmerge.search.worker import Worker

    cfg = load_search_config(make_config("ps", "random", popsize=4, max_evals=4))
    run = tmp_path / "run"
    run_search(cfg, run, progress=False)
    best = json.loads((run / "best" / "best.json").read_text())
    out = run_merge(load_merge_config(run / "best" / "recipe.yaml"), tmp_path / "merged", progress=False)
    w = Worker(cfg)
    w._load_runtime()
    cand = w.space.decode(np.asarray(best["genome"]))
    model = w.runtime.prepare(cand)
    reader = open_checkpoint(out)
    sd = dict(model.named_parameters())
    names = [k for k in list(reader.keys()) if k in sd]
    diffs = {k: float((reader.get_tensor(k) - sd[k]).abs().max()) for k in names}
    assert diffs and max(diffs.values()) < 1e-5, max(diffs.items(), key=lambda kv: kv[1])
    torch.testing.assert_close(reader.get_tensor("model.layers.0.mlp.down_proj.weight"),
                               sd["model.layers.0.mlp.down_proj.weight"], atol=1e-5, rtol=0)


def test_best_mergekit_passthrough_reproduces_the_path(tiny_models, tmp_path):
    """best/mergekit.yaml of a path (scales folded into o_proj/down_proj) merged with `dfsmerge merge` and loaded in
    vanilla transformers gives the stitched model's logits; a path whose first step is not model A gets no
    passthrough (mergekit would take the embedding from that model)."""
    import torch
    from transformers import AutoModelForCausalLM

    from dfsmerge.genome.plan import PathPlan
    from dfsmerge.recipe.config import load_merge_config
    from dfsmerge.recipe.executor import run_merge
    from dfsmerge.runtime.pool import LayerPool
    from dfsmerge.search.outputs import write_best

    models = {"A": str(tiny_models["m1"]), "B": str(tiny_models["m2"])}
    path = {"models": models, "base": "A",
            "path": [{"model": "A", "layer": 0, "scale": 1.3}, {"model": "B", "layer": 1, "scale": 0.7},
                     {"model": "B", "layer": 0, "scale": 1.1}, {"model": "A", "layer": 1, "scale": 0.9}]}
    write_best(tmp_path / "best", {"id": 0, "fitness": 0.0, "candidate": {"ps": None, "path": path}})
    recipe = yaml.safe_load((tmp_path / "best" / "mergekit.yaml").read_text())
    assert recipe["merge_method"] == "passthrough" and len(recipe["slices"]) == 4
    out = run_merge(load_merge_config(recipe), tmp_path / "merged", progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    plan = PathPlan.from_dict(path)
    stitched = StitchedModel.from_pool(LayerPool(models, base="A"), plan)
    ids = torch.randint(5, 40, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids).logits, stitched(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    path_b = {**path, "path": path["path"][1:]}
    write_best(tmp_path / "best_b", {"id": 0, "fitness": 0.0, "candidate": {"ps": None, "path": path_b}})
    text = (tmp_path / "best_b" / "mergekit.yaml").read_text()
    assert "cannot be written as a mergekit passthrough" in text and "merge_method" not in text


def test_staged_stage1_is_the_ps_search(make_config, tmp_path):
    """Staged mode's first stage is the PS search of the same genome, optimizer and seed, candidate for candidate
    (so a staged run extends its PS run, as the paper's PS+DFS starts from its PS model)."""
    objectives = [{"type": "synthetic", "name": "sphere"}]
    ps = load_search_config(make_config("ps", "cma", objectives=objectives, popsize=4, max_evals=8))
    staged = load_search_config(make_config("staged", "cma", objectives=objectives, popsize=4, max_evals=8))
    run_search(ps, tmp_path / "ps", progress=False)
    run_search(staged, tmp_path / "staged", progress=False)
    a = read_evals(tmp_path / "ps")
    b = [r for r in read_evals(tmp_path / "staged") if r["stage"] == 1]
    assert len(a) == len(b) == 8
    assert [r["candidate"]["ps"] for r in a] == [r["candidate"]["ps"] for r in b]
    assert [r["fitness"] for r in a] == [r["fitness"] for r in b]
    stage2 = [r for r in read_evals(tmp_path / "staged") if r["stage"] == 2]
    assert len(stage2) == 8


def test_staged_stage2_has_its_own_optimizer_and_budget(make_config, tmp_path):
    """``stage2:`` gives the DFS stage its own optimizer and budget; stage 1 is unchanged (still the PS search)."""
    objectives = [{"type": "synthetic", "name": "sphere"}]
    plain = load_search_config(make_config("staged", "cma", objectives=objectives, popsize=4, max_evals=8))
    own = load_search_config(make_config("staged", "cma", objectives=objectives, popsize=4, max_evals=8,
                                         stage2={"optimizer": {"name": "cma", "popsize": 6, "sigma0": 0.5},
                                                 "budget": {"max_evals": 12}}))
    run_search(plain, tmp_path / "plain", progress=False)
    res = run_search(own, tmp_path / "own", progress=False)
    a, b = read_evals(tmp_path / "plain"), read_evals(tmp_path / "own")
    assert [r["candidate"] for r in a if r["stage"] == 1] == [r["candidate"] for r in b if r["stage"] == 1]
    gens = Counter(r["generation"] for r in b if r["stage"] == 2)
    assert list(gens.values()) == [6, 6]  # popsize 6, 12 evaluations
    assert res.stop_reason == "stage2.budget.max_evals=12 reached (12 evaluations)"
    assert [r["genome"] for r in a if r["stage"] == 2] != [r["genome"] for r in b if r["stage"] == 2][:8]
