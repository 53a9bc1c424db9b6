"""``dfsmerge ablate``: the rows of a joint PS+DFS candidate are the ablations the path asks for, each row's score
equals a separate ``dfsmerge eval`` of the plan it wrote, the candidate row equals the score the search recorded, and
the paired tests are those of the per-document outcomes; the search report states best-vs-start and best-vs-source
tests."""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections import Counter

import pytest

from dfsmerge.cli import main
from dfsmerge.rundir.reader import open_run
from dfsmerge.search import load_search_config, run_search
from tests.search.conftest import MC_TASK


def _eval_json(*argv: str) -> dict:
    f = io.StringIO()
    with contextlib.redirect_stdout(f):
        assert main(["eval", *argv, "--json"]) == 0
    return json.loads(f.getvalue())


def test_ablation_rows_equal_separate_evals_of_the_plans_it_wrote(joint_run, mc_task_dir, capsys):
    run = open_run(joint_run)
    # the richest candidate: the longest path (more leave-one-out rows), repeats where there are some
    cand = max((r for r in run.records if r.ok and r.path), key=lambda r: (len(r.path["path"]), -r.id))
    assert main(["ablate", str(joint_run), "--candidate", str(cand.id), "--quiet"]) == 0
    out = joint_run / "ablation"
    table = json.loads((out / "table.json").read_text())
    rows = table["rows"]
    steps = cand.path["path"]
    kinds = Counter(r["kind"] for r in rows)
    assert kinds["candidate"] == 1 and kinds["drop"] == len(steps)
    assert kinds["scales"] == int(any(not math.isclose(s["scale"], 1.0) for s in steps))
    repeats = Counter((s["model"], s["layer"]) for s in steps)
    assert kinds["dedup"] == sum(1 for c in repeats.values() if c > 1)
    assert kinds["ps-only"] == 1 and kinds["dfs-unmerged"] == 1
    assert sorted(r["model"] for r in rows if r["kind"] == "source") == ["base", "m1", "m2"]
    for r in rows:
        if r["kind"] == "drop":
            removed = steps[r["step"]]
            assert r["model"] == removed["model"]
    key = MC_TASK
    # the candidate row is the search's own score of it (same split, same pool)
    assert rows[0]["scores"][key] == pytest.approx(cand.objectives[key], abs=1e-12)
    cand_plan = out / rows[0]["files"][0]
    cand_docs = _eval_json(str(cand_plan), "--tasks", MC_TASK, "--task-search-path", str(mc_task_dir), "--native")
    for r in rows:
        plan = out / next(f for f in r["files"] if f.endswith("plan.yaml"))
        got = _eval_json(str(plan), "--tasks", MC_TASK, "--task-search-path", str(mc_task_dir), "--native")
        assert got["results"][MC_TASK]["acc,none"] == pytest.approx(r["scores"][key], abs=1e-12), r["name"]
        assert r["delta"][key] == pytest.approx(r["scores"][key] - rows[0]["scores"][key])
        if r["kind"] != "candidate":
            assert r["tests"][key]["method"] == "mcnemar"
    # a row's p-value is the paired test of its per-document outcomes against the candidate's (dfsmerge eval A B)
    some = next(r for r in rows if r["kind"] == "source")
    cmp = _eval_json(str(cand_plan), str(out / some["files"][0]), "--tasks", MC_TASK, "--task-search-path",
                     str(mc_task_dir), "--native")
    pair = cmp["paired"][0]
    assert pair["delta"] == pytest.approx(some["delta"][key])  # both: the row minus the candidate
    assert pair["p_value"] == pytest.approx(some["tests"][key]["p_value"])
    assert (pair["n10"], pair["n01"]) == (some["tests"][key]["n10"], some["tests"][key]["n01"])
    assert cand_docs["results"][MC_TASK]["acc,none"] == pytest.approx(cmp["results"][0][MC_TASK]["acc,none"])
    md = (out / "table.md").read_text()
    assert md.count("\n| ") == len(rows) + 1  # header + one line per row
    assert f"{key} {rows[0]['documents'][key]}." in md and rows[0]['documents'][key] > 0  # documents per row
    assert (out / "contribution.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "rows" / "00-candidate" / "recipe.yaml").is_file()


def test_search_report_states_best_vs_start_and_sources(joint_run):
    md = (joint_run / "report" / "report.md").read_text()
    sig = json.loads((joint_run / "report" / "significance.json").read_text())
    run = open_run(joint_run)
    assert sig["best"] == run.best.id and sig["start"] == 0
    s = sig["splits"]["objective"]
    assert s["best"][MC_TASK] == pytest.approx(run.best.objectives[MC_TASK], abs=1e-12)
    against = {a["model"]: a for a in s["against"]}
    assert set(against) == {"start (id 0)", "source m1", "source m2", "source base"}
    assert against["start (id 0)"]["scores"][MC_TASK] == pytest.approx(run.start.objectives[MC_TASK], abs=1e-12)
    assert "## Is the best significantly better?" in md
    for name, a in against.items():
        t = a["tests"][MC_TASK]
        assert f"| {name}" in md and f"p={t['p_value']:.3g}" in md
        assert t["delta"] == pytest.approx(s["best"][MC_TASK] - a["scores"][MC_TASK])


def test_ablate_refuses_a_run_without_task_objectives(make_config, tmp_path, capsys):
    run = tmp_path / "run"
    run_search(load_search_config(make_config("dfs", "random", popsize=4, max_evals=4)), run, progress=False)
    assert main(["ablate", str(run)]) == 2
    assert "no task objective" in capsys.readouterr().err


def test_inspect_significance_rewrites_the_tests_of_the_current_best(joint_run, capsys):
    f = joint_run / "report" / "significance.json"
    f.unlink()
    assert main(["inspect", str(joint_run)]) == 0  # plain inspect loads no model and computes nothing
    md = joint_run / "report" / "report.md"
    assert not f.exists() and "Is the best significantly better?" not in md.read_text()
    assert main(["inspect", str(joint_run), "--significance"]) == 0
    assert json.loads(f.read_text())["best"] == open_run(joint_run).best.id
    assert "Is the best significantly better?" in md.read_text()


def test_contribution_figure_colours_each_step_and_its_legend_entry_by_source_model(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    from dfsmerge.analysis.ablation import AblationRow, Variant, plot_contributions

    figs = []
    monkeypatch.setattr(plt, "close", figs.append)  # keep the figure to read it back
    models = ["merged", "math", "merged", "lang"]
    rows = [AblationRow(Variant("candidate", "the candidate", "candidate", None, None), {"t": 0.5}, {}, {"t": None},
                        ())]
    rows += [AblationRow(Variant(f"drop-{i}", f"step {i}", "drop", None, None, step=i, model=m), {"t": 0.1 * i}, {},
                         {"t": None}, ()) for i, m in enumerate(models)]
    assert plot_contributions(rows, "t", tmp_path / "c.png", {"math": "real:smollm2-fra/math"}) is not None
    ax = figs[0].axes[0]
    bar_colour = {m: to_rgba(p.get_facecolor()) for m, p in zip(models, ax.patches, strict=False)}
    assert len(set(bar_colour.values())) == 3  # one colour per source model
    legend = {t.get_text(): to_rgba(h.get_facecolor()) for t, h in zip(ax.get_legend().get_texts(),
                                                                        ax.get_legend().legend_handles, strict=True)}
    assert legend == {"merged": bar_colour["merged"], "math (real:smollm2-fra/math)": bar_colour["math"],
                      "lang": bar_colour["lang"]}
