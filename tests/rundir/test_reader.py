"""The one run-directory reader: resume, report and export read a run through it and agree (a torn last line, a
corrupt one); ``open_run``'s views equal the files the search wrote; an older format is read, a newer one refused in
one line."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from dfsmerge.errors import CheckpointError, ConfigError
from dfsmerge.rundir.reader import FORMAT, RunFormatError, open_run, read_eval_lines
from dfsmerge.search import load_search_config, run_search

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def finished_run(tiny_models, tmp_path_factory):
    genome = {"mode": "joint", "models": [str(tiny_models["m1"]), str(tiny_models["m2"])],
              "base_model": str(tiny_models["base"]), "layer_granularity": 1,
              "dfs": {"repetitions": 2, "scales": "per_step"}}
    cfg = {"genome": genome, "objectives": [{"type": "cost", "name": "hops"},
                                            {"type": "synthetic", "name": "sphere", "weight": 0.5}],
           "optimizer": {"name": "nsga2", "popsize": 4}, "budget": {"max_evals": 12}}
    run = tmp_path_factory.mktemp("rundir") / "run"
    run_search(load_search_config(cfg), run, progress=False)
    return run


def _copy(run: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(run, dst)
    return dst


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "evals.jsonl").read_text().splitlines()]


def test_views_equal_what_the_search_wrote(finished_run):
    run = open_run(finished_run)
    rows = _lines(finished_run)
    assert run.format == FORMAT and len(run) == len(rows) and not run.torn
    assert [r.id for r in run] == [r["id"] for r in rows]
    assert run.config == yaml.safe_load((finished_run / "config.yaml").read_text())
    best_json = json.loads((finished_run / "best" / "best.json").read_text())
    assert run.best.id == best_json["id"] and run.best.fitness == best_json["fitness"]
    assert run.best.plan.to_dict() == yaml.safe_load((finished_run / "best" / "plan.yaml").read_text())
    assert run.start.id == 0
    pareto_ids = [json.loads(x)["id"] for x in (finished_run / "pareto.jsonl").read_text().splitlines()]
    assert [r.id for r in run.pareto] == pareto_ids
    for k in ("forward_tokens", "docs"):
        assert run.costs.get(k, 0) == pytest.approx(sum((r.get("cost") or {}).get(k, 0) for r in rows))
    assert [r.genome for r in run] == [tuple(r["genome"]) for r in rows]
    assert all(r.to_json() == row for r, row in zip(run, rows, strict=True))
    df = run.to_pandas()
    assert list(df.index) == [r["id"] for r in rows]
    assert df.loc[run.best.id, "fitness"] == run.best.fitness
    assert all(df.loc[r["id"], "cost/hops"] == r["objectives"]["cost/hops"] for r in rows)


def test_resume_report_and_export_agree_on_a_torn_log(finished_run, tmp_path):
    from dfsmerge.export.candidate import load_run_candidate
    from dfsmerge.report import load_evals
    from dfsmerge.search.state import RunDir

    run = _copy(finished_run, tmp_path / "run")
    n = len(_lines(run))
    size = (run / "evals.jsonl").stat().st_size
    with open(run / "evals.jsonl", "a") as f:
        f.write(f'{{"id": {n}, "genome": [0.1')  # a search killed while writing a line
    assert open_run(run).torn and len(open_run(run)) == n
    assert [r["id"] for r in load_evals(run)] == list(range(n))
    last = load_run_candidate(run, n - 1)
    assert last.id == str(n - 1)
    with pytest.raises(ConfigError, match=f"--candidate {n}"):
        load_run_candidate(run, n)
    resumed = RunDir.open(run, resume=True)  # the writer drops the torn bytes before appending again
    assert len(resumed.evals) == n and (run / "evals.jsonl").stat().st_size == size


def test_a_corrupt_complete_line_is_an_error_for_every_reader(finished_run, tmp_path):
    from dfsmerge.export.candidate import load_run_candidate
    from dfsmerge.report import load_evals
    from dfsmerge.search.state import RunDir

    run = _copy(finished_run, tmp_path / "run")
    lines = (run / "evals.jsonl").read_text().splitlines()
    lines[2] = lines[2][:40]
    (run / "evals.jsonl").write_text("\n".join(lines) + "\n")
    for read in (open_run, load_evals, lambda p: RunDir.open(p, resume=True)):
        with pytest.raises(CheckpointError, match="line 3 is not JSON"):
            read(run)
    with pytest.raises(ConfigError, match="line 3 is not JSON"):
        load_run_candidate(run, 0)
    lines = (finished_run / "evals.jsonl").read_text().splitlines()
    (run / "evals.jsonl").write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    with pytest.raises(CheckpointError, match="id=3, expected 2"):
        read_eval_lines(run / "evals.jsonl")


def test_an_older_format_is_read_and_a_newer_one_named(finished_run, tmp_path):
    from dfsmerge.genome import stable_key

    run = _copy(finished_run, tmp_path / "old")
    rows = _lines(run)
    old = [{k: v for k, v in r.items() if k not in ("key", "stage", "generation", "values")} for r in rows]
    (run / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    state = json.loads((run / "state" / "state.json").read_text())
    del state["format"]  # written before the state carried a format: version 0
    (run / "state" / "state.json").write_text(json.dumps(state))
    r0 = open_run(run)
    assert r0.format == 0 and len(r0) == len(rows)
    assert all(r.stage == 1 and r.key == stable_key(row["candidate"]) for r, row in zip(r0, rows, strict=True))
    assert r0.best.id == open_run(finished_run).best.id

    state["format"] = FORMAT + 1
    (run / "state" / "state.json").write_text(json.dumps(state))
    with pytest.raises(RunFormatError) as e:
        open_run(run)
    msg = str(e.value)
    assert "\n" not in msg and f"format {FORMAT + 1}" in msg and "upgrade" in msg


def test_not_a_run_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        open_run(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no evals.jsonl"):
        open_run(tmp_path)


def test_one_evals_reader_in_the_package():
    """Only dfsmerge/rundir/reader.py parses the lines of evals.jsonl: no other module loops over the lines of an
    evals file and ``json.loads`` them; the three earlier readers are gone or delegate."""
    offenders = []
    for path in (ROOT / "dfsmerge").rglob("*.py"):
        if path.name == "reader.py" and path.parent.name == "rundir":
            continue
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "json.loads(" not in line:
                continue
            loop = next((x for x in reversed(lines[max(0, i - 8):i + 1]) if re.match(r"\s*for \w+ in ", x)), "")
            var = re.match(r"\s*for \w+ in (?:open\()?(\w+)", loop)
            source = "".join(x for x in lines[max(0, i - 20):i] if var and re.match(rf"\s*{var[1]} = ", x))
            if "evals" in loop or "evals" in line or "evals" in source:
                offenders.append(f"{path.relative_to(ROOT)}:{i + 1}")
    assert offenders == []
    import inspect

    from dfsmerge.export import candidate
    from dfsmerge.report import report
    from dfsmerge.search.state import RunDir

    assert not hasattr(candidate, "_read_evals")
    assert "RunReader" in inspect.getsource(report.load_evals)
    assert "read_eval_lines" in inspect.getsource(RunDir._load_evals)


def test_import_dfsmerge_stays_light_and_exports_the_api(finished_run):
    import subprocess
    import sys

    code = ("import sys, dfsmerge; assert 'torch' not in sys.modules and 'pandas' not in sys.modules; "
            f"r = dfsmerge.open_run({str(finished_run)!r}); print(len(r), r.best.id, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    n, best, torch_loaded = out.split()
    assert int(n) == len(_lines(finished_run)) and torch_loaded == "False"
    assert int(best) == open_run(finished_run).best.id
    import dfsmerge
    from dfsmerge.runtime.pool import LayerPool

    assert dfsmerge.Pool is LayerPool and math.isfinite(open_run(finished_run).best.fitness)
