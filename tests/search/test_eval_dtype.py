"""eval_dtype: the dtype candidates are scored in; ``auto`` measures speed and score agreement on the first
generation's first candidates, saves the choice in the state and keeps it on resume."""

from __future__ import annotations

import json

import pytest
import torch

from dfsmerge.objectives.evaluator import EvalResult
from dfsmerge.search import load_search_config, run_search
from dfsmerge.search import loop as loop_mod
from dfsmerge.search.backends import LocalBackend
from dfsmerge.search.loop import choose_eval_dtype
from tests.search.conftest import MC_TASK, read_evals


def _res(t, score, error=None):
    return EvalResult(results={}, scores={"a": score}, values={"a": -score}, fitness=-score, error=error,
                      timings={"eval_s": t})


@pytest.mark.parametrize(("fast_times", "fast_scores", "want"), [
    ((1.0, 1.0, 1.0), (0.5, 0.7, 0.2), "bfloat16"),  # 2x faster, identical scores
    ((1.0, 1.0, 1.0), (0.51, 0.69, 0.2), "bfloat16"),  # within 0.02
    ((1.0, 1.0, 1.0), (0.5, 0.74, 0.2), "float32"),  # one score off by 0.04
    ((1.9, 1.7, 1.8), (0.5, 0.7, 0.2), "float32"),  # only 1.1x faster
    ((3.0, 1.0, 1.0), (0.5, 0.7, 0.2), "float32"),  # slower on one candidate: the smallest ratio decides
])
def test_choice_rule(fast_times, fast_scores, want):
    base = [_res(2.0, 0.5), _res(2.0, 0.7), _res(2.0, 0.2)]
    fast = [_res(t, s) for t, s in zip(fast_times, fast_scores, strict=True)]
    got = choose_eval_dtype("float32", "bfloat16", base, fast)
    assert got["dtype"] == want and got["measured"] and got["candidates"] == 3


def test_a_failure_in_one_dtype_only_keeps_the_base():
    base = [_res(2.0, 0.5), _res(2.0, 0.7)]
    fast = [_res(1.0, 0.5), _res(1.0, float("nan"), error="RuntimeError: bf16")]
    got = choose_eval_dtype("float32", "bfloat16", base, fast)
    assert got["dtype"] == "float32" and got["max_score_diff"] is None


@pytest.fixture
def mc_search(make_config, mc_task_dir):
    def make(**extra):
        return make_config("dfs", "cma", popsize=4, max_evals=8, task_paths=[str(mc_task_dir)],
                           objectives=[{"name": MC_TASK, "split": "validation", "native": True}],
                           dfs={"repetitions": 2, "max_length": 4}, **extra)
    return make


def _state(run):
    return json.loads((run / "state" / "state.json").read_text())


def _plain(recs):
    return [{k: v for k, v in r.items() if k not in ("time", "timings", "cost")} for r in recs]


def test_auto_measures_once_and_equals_the_explicit_run_of_its_choice(mc_search, tmp_path):
    run_search(load_search_config(mc_search()), tmp_path / "auto", progress=False)
    choice = _state(tmp_path / "auto")["eval_dtype"]
    assert choice["measured"] and choice["candidates"] == 3 and choice["dtype"] in ("float32", "bfloat16")
    run_search(load_search_config(mc_search(eval_dtype=choice["dtype"])), tmp_path / "fixed", progress=False)
    assert _plain(read_evals(tmp_path / "auto")) == _plain(read_evals(tmp_path / "fixed"))


def test_bfloat16_choice_is_used_and_kept_on_resume(mc_search, tmp_path, monkeypatch):
    monkeypatch.setattr(loop_mod, "EVAL_DTYPE_MIN_SPEEDUP", 0.0)  # force the choice: any speed and score will do
    monkeypatch.setattr(loop_mod, "EVAL_DTYPE_MAX_SCORE_DIFF", float("inf"))
    cfg = load_search_config(mc_search())
    backend = LocalBackend(cfg)
    run_search(cfg, tmp_path / "run", progress=False, backend=backend)
    assert _state(tmp_path / "run")["eval_dtype"]["dtype"] == "bfloat16"
    assert backend.worker.runtime.pool.dtype == torch.bfloat16
    monkeypatch.undo()  # a resumed run reads the choice from the state, it does not measure again
    backend = LocalBackend(cfg)
    run_search(cfg, tmp_path / "run", progress=False, backend=backend, resume=True, **{"budget.max_evals": 12})
    assert _state(tmp_path / "run")["eval_dtype"]["dtype"] == "bfloat16"
    assert backend.worker.runtime.pool.dtype == torch.bfloat16
    assert len(read_evals(tmp_path / "run")) == 12
