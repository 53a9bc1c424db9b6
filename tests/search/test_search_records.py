"""The loop's typed records: an evaluation record (a line of evals.jsonl) and the loop state (state.json) each
round-trip through JSON; a real run's lines read back into records that write the same lines; the worker returns an
EvalResult whose fitness is scalar_fitness's; one candidate key."""

from __future__ import annotations

import json
import math

import numpy as np

from dfsmerge.objectives import EvalResult, candidate_key, scalar_fitness
from dfsmerge.search import load_search_config, run_search
from dfsmerge.search.state import EvalRecord, LoopState, RunDir
from dfsmerge.search.worker import Worker
from tests.search.conftest import read_evals


def _through_text(rec: EvalRecord) -> EvalRecord:
    return EvalRecord.from_json(json.loads(json.dumps(rec.to_json(), allow_nan=False)))


def test_eval_record_round_trips_through_json():
    ok = EvalRecord(id=3, generation=1, stage=2, genome=(0.1, -2.5e-17, 1.0), candidate={"ps": None, "path": None},
                    key="ab" * 16, objectives={"a": 0.25, "b": 3.0}, values={"a": -0.25, "b": 3.0}, fitness=2.75,
                    timings={"total_s": 0.5}, time=1.7e9)
    failed = EvalRecord(id=4, generation=1, stage=2, genome=(0.3,), candidate={"ps": None, "path": None},
                        key="cd" * 16, objectives={"a": None, "b": None}, values={"a": math.inf, "b": math.inf},
                        fitness=math.inf, error="ValueError: x", traceback="Traceback ...")
    infeasible = EvalRecord(id=5, generation=2, stage=1, genome=(0.0,), candidate={"ps": None, "path": None,
                                                                                    "infeasible": "empty path"},
                            key="ef" * 16, objectives={"a": None}, values={"a": math.inf}, fitness=math.inf,
                            error="infeasible: empty path", infeasible=True, cached=True)
    for rec in (ok, failed, infeasible):
        assert _through_text(rec) == rec
    line = failed.to_json()
    assert line["fitness"] is None and line["values"] == {"a": None, "b": None} and "infeasible" not in line
    assert "traceback" not in ok.to_json() and infeasible.to_json()["infeasible"] is True


def test_loop_state_round_trips_through_state_json(tmp_path):
    run = RunDir.open(tmp_path / "run", resume=False)
    assert run.read_state() is None
    st = LoopState(stage=2, stage_offset=8, generation_offset=3, fixed_ps=(0.5, 1e-300, -3.0), phase="asked",
                   elapsed_s=12.5, optimizer={"kind": "cma", "x": [1.0, math.inf], "blob": b"\x00\x01"},
                   rng={"python": "(3, (1, 2), None)", "numpy": ["MT19937", [1, 2], 0, 0, 0.0], "torch": b"\xff"})
    run.write_state(st)
    assert run.read_state() == st
    assert LoopState.from_json(LoopState().to_json()) == LoopState()


def test_a_runs_lines_read_back_into_records_that_write_them_again(make_config, tmp_path):
    cfg = load_search_config(make_config("joint", "random", max_evals=6,
                                         objectives=[{"type": "synthetic", "name": "sphere"},
                                                     {"type": "synthetic", "name": "path_length", "weight": 0.1}]))
    run_search(cfg, tmp_path / "run", progress=False)
    lines = read_evals(tmp_path / "run")
    assert len(lines) >= 6
    for line in lines:
        assert EvalRecord.from_json(line).to_json() == line
    loaded = RunDir.open(tmp_path / "run", resume=True).evals
    assert [r.to_json() for r in loaded] == lines


def test_worker_returns_an_eval_result_with_scalar_fitness(make_config):
    cfg = load_search_config(make_config("ps", objectives=[{"type": "synthetic", "name": "sphere", "weight": 0.5},
                                                           {"type": "synthetic", "name": "path_length"}]))
    w = Worker(cfg)
    x = w.space.initial()
    res = w.evaluate(x)
    assert isinstance(res, EvalResult) and res.error is None
    assert res.fitness == scalar_fitness(res.values, cfg.objectives)
    lo, hi = w.space.bounds
    u = (x - lo) / (hi - lo)
    assert math.isclose(res.scores["synthetic/sphere"], float(np.sum((u - 0.3) ** 2)), rel_tol=1e-12)


def test_one_candidate_key(make_config):
    cfg = load_search_config(make_config("joint"))
    w = Worker(cfg)
    x = w.space.initial()
    cand, again = w.space.decode(x), w.space.decode(x.copy())
    assert cand.key() == again.key() == candidate_key(cand)
    assert cand.key(x) == again.key(x.copy()) != cand.key()  # the genome itself, for synthetic objectives
    other = x.copy()
    other[0] += 0.25
    assert w.space.decode(other).key() != cand.key()


def test_mode_table_is_the_one_home_of_modes(make_config):
    from typing import get_args

    from dfsmerge.genome import MODE_TABLE, Mode
    from dfsmerge.search import config as search_config

    assert search_config.Mode is Mode and set(get_args(Mode)) == set(MODE_TABLE)
    for mode, spec in MODE_TABLE.items():
        w = Worker(load_search_config(make_config(mode)))
        for stage in range(1, spec.stages + 1):
            space = w.space.with_stage(stage, w.space.ps.decode(w.space.ps.initial()) if stage == 2 else None)
            assert tuple(p is not None for p in space.parts) == spec.parts(stage)
        assert (w.space.dfs is not None and w.space.dfs.model_a == "merged") == spec.merged_is_model_a
