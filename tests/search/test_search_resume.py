"""Resume: a search SIGKILLed at several points (mid-generation, mid-line, around each checkpoint, at the stage
switch of staged mode) and resumed each time writes exactly the evals.jsonl and best candidate of an uninterrupted
run; a finished run continued with a larger budget equals a run given that budget from the start (torchtune's
"2 steps + resume + 2 steps == 4 steps")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from dfsmerge.errors import CheckpointError, ConfigError, OutputExistsError
from dfsmerge.search import load_search_config, run_search
from tests.search.conftest import read_evals, strip_volatile

REPO = Path(__file__).resolve().parents[2]

# Runs the CLI in a process that kills itself with SIGKILL at the k-th call of a RunDir method (before or after
# it does its work; "partial" leaves half an evals.jsonl line first).
KILLER = textwrap.dedent('''
    import os, signal, sys
    from dfsmerge.search import state as S
    where, k = sys.argv[1], int(sys.argv[2])
    n = {"c": 0}
    def kill():
        os.kill(os.getpid(), signal.SIGKILL)
    def wrap(name, before, after):
        orig = getattr(S.RunDir, name)
        def f(self, arg):
            n["c"] += 1
            hit = n["c"] == k
            if hit and before:
                if where == "partial":
                    with open(self.evals_path, "a") as fh:
                        fh.write('{"id": %d, "genome": [0.12' % arg.id)
                        fh.flush(); os.fsync(fh.fileno())
                kill()
            orig(self, arg)
            if hit and after:
                kill()
        setattr(S.RunDir, name, f)
    if where in ("before_append", "after_append", "partial"):
        wrap("append_eval", where != "after_append", where == "after_append")
    else:
        wrap("write_state", where == "before_state", where == "after_state")
    from dfsmerge.cli import main
    sys.exit(main(sys.argv[3:]))
''')

KILLS = [("after_append", 3), ("before_state", 2), ("partial", 3), ("after_state", 4), ("before_append", 6),
         ("after_state", 2)]


def search_with_kills(cfg_path: Path, ref: Path, run: Path, kills, *, timeout: int = 300) -> list[int]:
    """Run the search of ``cfg_path`` uninterrupted into ``ref``; then into ``run`` under the KILLER at each
    ``(where, k)`` of ``kills`` in turn (resuming after the first) and once more to the end. Returns the number of
    evals.jsonl lines seen after each kill."""
    run_search(load_search_config(cfg_path), ref, progress=False)
    killer = run.parent / "killer.py"
    killer.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    seen = []
    for i, (where, k) in enumerate(kills):
        args = [sys.executable, str(killer), where, str(k), "search", str(cfg_path), "--out", str(run), "--quiet"]
        p = subprocess.run(args + (["--resume"] if i else []), env=env, capture_output=True, text=True,
                           timeout=timeout)
        assert p.returncode == -9, f"kill point {where}@{k} was not reached (rc={p.returncode}): {p.stderr[-2000:]}"
        text = (run / "evals.jsonl").read_text() if (run / "evals.jsonl").exists() else ""
        seen.append(text.count("\n"))
    p = subprocess.run([sys.executable, "-m", "dfsmerge.cli", "search", str(cfg_path), "--out", str(run),
                        "--quiet", "--resume"], env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return seen


def test_sigkill_resume_equals_uninterrupted(make_config, tmp_path):
    # model-free objectives keep each of the 8 processes short; the model-scoring path is the same code (Worker)
    cfg_dict = make_config("staged", "cma", popsize=4, max_evals=12,
                           objectives=[{"type": "synthetic", "name": "sphere"},
                                       {"type": "synthetic", "name": "path_length", "weight": 0.1}],
                           stage2={"optimizer": {"name": "cma", "popsize": 3, "sigma0": 0.4}})
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg_dict))
    ref, run = tmp_path / "ref", tmp_path / "run"
    seen = search_with_kills(cfg_path, ref, run, KILLS)
    got, want = read_evals(run), read_evals(ref)
    assert [r["id"] for r in got] == list(range(len(got)))  # no gap, no duplicate
    assert [strip_volatile(r) for r in got] == [strip_volatile(r) for r in want]
    assert len(set(seen)) > 3, f"kills happened at too few distinct points: {seen}"
    assert seen[-1] < len(want)
    best_got = json.loads((run / "best" / "best.json").read_text())
    best_want = json.loads((ref / "best" / "best.json").read_text())
    assert strip_volatile(best_got) == strip_volatile(best_want)
    names = sorted(p.name for p in (ref / "best").iterdir())
    assert sorted(p.name for p in (run / "best").iterdir()) == names
    for name in names:
        if name != "best.json":
            assert (run / "best" / name).read_text() == (ref / "best" / name).read_text(), name


def test_continue_with_larger_budget_equals_one_run(make_config, tmp_path):
    cfg = load_search_config(make_config("joint", "cma", popsize=4, max_evals=8))
    run_search(cfg, tmp_path / "a", progress=False)
    run_search(cfg, tmp_path / "a", resume=True, progress=False, **{"budget.max_evals": 16})
    run_search(cfg.with_overrides(**{"budget.max_evals": 16}), tmp_path / "b", progress=False)
    a, b = read_evals(tmp_path / "a"), read_evals(tmp_path / "b")
    assert len(a) == 16
    assert [strip_volatile(r) for r in a] == [strip_volatile(r) for r in b]


def test_new_run_refuses_nonempty_out_and_resume_checks(make_config, tmp_path):
    cfg = load_search_config(make_config("ps", "random", popsize=4, max_evals=4))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="--resume"):
        run_search(cfg, tmp_path / "x", progress=False)
    with pytest.raises(CheckpointError, match="no search run"):
        run_search(cfg, tmp_path / "y", resume=True, progress=False)
    run_search(cfg, tmp_path / "z", progress=False)
    with pytest.raises(ConfigError, match="seed"):
        run_search(cfg.with_overrides(seed=5), tmp_path / "z", resume=True, progress=False)


def test_cli_refuses_existing_run_with_exit_2(make_config, tmp_path, capsys):
    from dfsmerge.cli import main

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(make_config("ps", "random", popsize=4, max_evals=4)))
    assert main(["search", str(cfg_path), "--out", str(tmp_path / "r"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "best " in out and "report" in out
    assert main(["search", str(cfg_path), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "another --out" in err
    assert main(["search", str(cfg_path), "--out", str(tmp_path / "r"), "--quiet", "--resume", "--max-evals", "8"]) == 0
    assert len(read_evals(tmp_path / "r")) == 8


def test_staged_resume_with_stage2_budget_takes_cli_budget_overrides(make_config, tmp_path):
    """`--resume --max-evals N` (and `--time-limit`) on a staged run whose config has stage2.budget: the CLI writes
    stage2.budget.*, which the config marks resumable, so the run continues instead of being refused."""
    from dfsmerge.cli import main

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(make_config("staged", "random", popsize=4, max_evals=4,
                                                   stage2={"budget": {"max_evals": 4}})))
    run = str(tmp_path / "r")
    assert main(["search", str(cfg_path), "--out", run, "--quiet"]) == 0
    stage2 = lambda: sum(r["stage"] == 2 for r in read_evals(tmp_path / "r"))  # noqa: E731
    assert stage2() == 4
    assert main(["search", str(cfg_path), "--out", run, "--quiet", "--resume", "--max-evals", "8"]) == 0
    assert stage2() == 8
    assert main(["search", str(cfg_path), "--out", run, "--quiet", "--resume", "--max-evals", "12",
                 "--time-limit", "3600"]) == 0
    assert stage2() == 12
    assert sum(r["stage"] == 1 for r in read_evals(tmp_path / "r")) == 4
