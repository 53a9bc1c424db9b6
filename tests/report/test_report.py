"""The run report: plots and report.md read back against the run's evals.jsonl (best row, counts, Pareto set),
on finished runs in several modes and on a run whose log ends in a partial line (a search still writing)."""

from __future__ import annotations

import math
import re

import pytest

from dfsmerge.report import load_evals, summarize, write_report
from dfsmerge.search import load_search_config, run_search
from tests.search.conftest import read_evals


def _png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


@pytest.mark.parametrize(("mode", "optimizer", "n_obj"), [("dfs", "nsga2", 2), ("joint", "nsga2", 3),
                                                         ("ps", "cma", 1)])
def test_report_contents(mode, optimizer, n_obj, make_config, tmp_path):
    objs = [{"type": "cost", "name": "hops"}, {"type": "synthetic", "name": "sphere"},
            {"type": "synthetic", "name": "path_length", "weight": 0.1}][:max(n_obj, 2)]
    d = make_config(mode, optimizer, popsize=4, max_evals=12, objectives=objs,
                    dfs={"repetitions": 2, "scales": "per_step"})
    run = tmp_path / "run"
    run_search(load_search_config(d), run, progress=False)
    evals = read_evals(run)
    rep = run / "report"
    md = (rep / "report.md").read_text()
    assert _png(rep / "fitness.png")
    assert _png(rep / "pareto.png") == (len(objs) >= 2)
    ok = [r for r in evals if r["fitness"] is not None and not r["cached"]]
    best = min(ok, key=lambda r: (r["fitness"], r["id"]))
    rows = [line for line in md.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == min(10, len(ok))
    assert rows[0].startswith(f"| {best['id']} |")
    assert f"evaluations: {len(evals)}" in md
    if mode != "ps":
        assert _png(rep / "path.png") and "![Best path](path.png)" in md
    else:
        assert not (rep / "path.png").exists()


def test_report_of_a_running_search(make_config, tmp_path, capsys):
    from dfsmerge.cli import main

    run = tmp_path / "run"
    run_search(load_search_config(make_config("dfs", "random", popsize=4, max_evals=8)), run, progress=False)
    with open(run / "evals.jsonl", "a") as f:
        f.write('{"id": 8, "genome": [0.1')  # a search in the middle of writing a line
    s = summarize(load_evals(run))
    assert s["n"] == 8
    want = min((r for r in read_evals_complete(run)), key=lambda r: (math.inf if r["fitness"] is None
                                                                    else r["fitness"], r["id"]))
    assert s["best"]["id"] == want["id"]
    assert main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"eval id {want['id']}" in out and "report.md" in out
    assert write_report(run) == run / "report"


def read_evals_complete(run):
    import json

    out = []
    for line in (run / "evals.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def test_path_diagram_of_a_plan_with_repeats(tmp_path):
    from dfsmerge.genome.plan import LayerRef, PathPlan, Step
    from dfsmerge.report.report import plot_path

    plan = PathPlan((Step(LayerRef("A", 0)), Step(LayerRef("B", 1), 0.8), Step(LayerRef("A", 0), 1.2),
                     Step(LayerRef("B", 1), 0.8)), models={"A": "a", "B": "b"}, base="A")
    g = plan.graph()
    assert g.edges[LayerRef("A", 0), LayerRef("B", 1)]["count"] == 2  # what the diagram labels
    out = plot_path(plan.to_dict(), tmp_path / "p.png")
    assert _png(out)


def test_path_figure_at_real_depth_names_models_as_written(tmp_path):
    """A 48-step path over three 24-layer models (repeats, skips, scales) renders; labels are the names the user
    wrote (``math (zoo:math)``, ``merged (PS merge)``), never the cache paths the plan holds."""
    import random

    from dfsmerge.report.report import model_label, plot_path

    rng = random.Random(0)
    steps = [{"model": rng.choice(["merged", "math", "language"]),
              "layer": min(23, max(0, k // 2 + rng.randint(-1, 1))), "scale": round(rng.uniform(0.7, 1.3), 2)}
             for k in range(48)]
    path = {"models": {"merged": "@ps", "math": "/root/.cache/dfsmerge/zoo/x/models/math",
                       "language": "/root/.cache/dfsmerge/zoo/x/models/language"}, "base": "merged", "path": steps}
    names = {"math": "zoo:math", "language": "zoo:language"}
    import matplotlib.figure
    import matplotlib.text

    texts: list[str] = []
    save = matplotlib.figure.Figure.savefig

    def spy(fig, *a, **k):  # every string the figure draws, read just before it is saved
        texts.extend(t.get_text() for t in fig.findobj(matplotlib.text.Text))
        return save(fig, *a, **k)

    matplotlib.figure.Figure.savefig = spy
    try:
        out = plot_path(path, tmp_path / "deep.png", {"merged": 24, "math": 24, "language": 24}, names=names)
    finally:
        matplotlib.figure.Figure.savefig = save
    assert _png(out)
    assert {"math (zoo:math)", "language (zoo:language)", "merged (PS merge)"} <= set(texts)
    assert not any(".cache" in t for t in texts)
    assert any(t.startswith("path: 48 steps") for t in texts)
    assert model_label("math", path["models"]["math"], names) == "math (zoo:math)"
    assert model_label("merged", "@ps", names) == "merged (PS merge)"
    assert model_label("m1", "/some/cache/m1", {}) == "m1"


def test_fitness_plot_rises_when_the_objective_improves():
    """fitness.png draws minus the minimised fitness: for one maximised objective, the objective itself, and the best
    so far never falls (each stage of a staged run restarts it)."""
    from dfsmerge.report.report import _fitness_axis, fitness_series

    scores = [0.1, 0.3, 0.2, 0.5, 0.4]
    evals = [{"id": i, "fitness": -v, "objectives": {"acc": v}, "stage": 1} for i, v in enumerate(scores)]
    evals.append({"id": 5, "fitness": None, "objectives": {}, "stage": 1})
    evals += [{"id": 6 + i, "fitness": -v, "objectives": {"acc": v}, "stage": 2} for i, v in enumerate([0.2, 0.6])]
    ids, fs, xs, ys = fitness_series(evals)
    assert fs == [0.1, 0.3, 0.2, 0.5, 0.4, 0.2, 0.6] and ids == [0, 1, 2, 3, 4, 6, 7]
    assert ys == [0.1, 0.3, 0.3, 0.5, 0.5, 0.5, 0.2, 0.6]  # the best so far, stage 2 restarting at its own first
    assert _fitness_axis(evals) == "acc (higher is better)"
    evals[0]["objectives"] = {"acc": 0.1, "hops": 3.0}  # several objectives: minus the scalar fitness
    assert _fitness_axis(evals).startswith("score = minus")
