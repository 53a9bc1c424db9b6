"""eval_dtype: the dtype candidates are scored in. ``auto`` proposes bfloat16 by a rule from the hardware and model A
(no timing), keeps it only when the first candidates score alike in both dtypes, saves the choice in the state and
keeps it on resume: reruns of the same search choose alike."""

from __future__ import annotations

import json

import pytest
import torch

from dfsmerge.objectives.evaluator import EvalResult
from dfsmerge.search import eval_dtype as ed
from dfsmerge.search import load_search_config, run_search
from dfsmerge.search.backends import LocalBackend
from tests.search.conftest import MC_TASK, read_evals, stable_evals

TOY = {"model_type": "llama", "hidden_size": 64, "vocab_size": 64}  # the toy zoo's shape
SMOL = {"model_type": "llama", "hidden_size": 576, "vocab_size": 49152}  # SmolLM2-135M's


@pytest.mark.parametrize(("cfg", "native", "want"), [
    (TOY, True, "float32"),  # measured 0.99x (0.75-0.78x in the toy searches)
    (SMOL, True, "bfloat16"),  # measured 1.9x
    (SMOL, False, "float32"),  # emulated bfloat16
    ({"hidden_size": ed.BF16_MIN_HIDDEN, "vocab_size": 64}, True, "bfloat16"),
    ({"hidden_size": 64, "vocab_size": ed.BF16_MIN_HEAD // 64}, True, "bfloat16"),  # a large head
    ({"text_config": SMOL}, True, "bfloat16"),  # a multimodal wrapper's text model
    ({}, True, "float32"),  # unreadable config: no proposal
])
def test_rule_on_cpu(cfg, native, want):
    got = [ed.bf16_rule("float32", "cpu", cfg, native_bf16=native) for _ in range(5)]
    assert all(g == got[0] for g in got)  # five reruns, one answer
    assert got[0]["dtype"] == want and not got[0]["measured"] and got[0]["rule"]


def test_rule_on_cuda_and_16_bit_searches():
    assert ed.bf16_rule("float32", "cuda", TOY, cuda_bf16=True)["dtype"] == "bfloat16"
    assert ed.bf16_rule("float32", "cuda", SMOL, cuda_bf16=False)["dtype"] == "float32"
    assert ed.bf16_rule("float16", "cpu", SMOL, native_bf16=True)["dtype"] == "float16"


def test_rule_reads_this_machine_the_same_way_five_times():
    ed.cpu_has_native_bf16.cache_clear()
    got = []
    for _ in range(5):
        ed.cpu_has_native_bf16.cache_clear()  # read /proc/cpuinfo again each time
        got.append(ed.bf16_rule("float32", "cpu", SMOL))
    assert all(g == got[0] for g in got)


def _res(score, error=None):
    return EvalResult(results={}, scores={"a": score}, values={"a": -score}, fitness=-score, error=error)


@pytest.mark.parametrize(("fast_scores", "want"), [
    ((0.5, 0.7, 0.2), "bfloat16"),  # identical scores
    ((0.51, 0.69, 0.2), "bfloat16"),  # within 0.02
    ((0.5, 0.74, 0.2), "float32"),  # one score off by 0.04
])
def test_scores_must_agree(fast_scores, want):
    proposal = ed.bf16_rule("float32", "cpu", SMOL, native_bf16=True)
    got = ed.verify_scores(proposal, "float32", [_res(s) for s in (0.5, 0.7, 0.2)], [_res(s) for s in fast_scores])
    assert got["dtype"] == want and got["proposed"] == "bfloat16" and got["candidates"] == 3


def test_a_failure_in_one_dtype_only_keeps_the_base():
    proposal = ed.bf16_rule("float32", "cpu", SMOL, native_bf16=True)
    got = ed.verify_scores(proposal, "float32", [_res(0.5), _res(0.7)],
                           [_res(0.5), _res(float("nan"), error="RuntimeError: bf16")])
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


def test_auto_reruns_choose_alike_and_equal_the_explicit_run_of_their_choice(mc_search, tmp_path):
    cfg = load_search_config(mc_search())
    names = [f"auto{i}" for i in range(1, 6)]  # five reruns of the same search
    for name in names:
        run_search(cfg, tmp_path / name, progress=False)
    choice = _state(tmp_path / "auto1")["eval_dtype"]
    assert all(_state(tmp_path / name)["eval_dtype"] == choice for name in names)
    # the tiny models are 16 wide: the rule keeps float32 without scoring anything twice
    assert choice["dtype"] == "float32" and not choice["measured"]
    assert stable_evals(tmp_path / "auto1") == stable_evals(tmp_path / "auto2")
    run_search(load_search_config(mc_search(eval_dtype="float32")), tmp_path / "fixed", progress=False)
    assert stable_evals(tmp_path / "auto1") == stable_evals(tmp_path / "fixed")


def _force_bf16(monkeypatch):
    monkeypatch.setattr(ed, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(ed, "BF16_MIN_HIDDEN", 0)  # the tiny models count as wide
    monkeypatch.setattr(ed, "EVAL_DTYPE_MAX_SCORE_DIFF", float("inf"))  # any scores agree


def test_bfloat16_choice_is_checked_used_and_kept_on_resume(mc_search, tmp_path, monkeypatch):
    _force_bf16(monkeypatch)
    cfg = load_search_config(mc_search())
    backend = LocalBackend(cfg)
    run_search(cfg, tmp_path / "run", progress=False, backend=backend)
    choice = _state(tmp_path / "run")["eval_dtype"]
    assert choice["dtype"] == "bfloat16" and choice["candidates"] == ed.EVAL_DTYPE_CHECK_CANDIDATES
    assert backend.worker.runtime.pool.dtype == torch.bfloat16
    run_search(cfg, tmp_path / "rerun", progress=False)
    assert _state(tmp_path / "rerun")["eval_dtype"] == choice
    monkeypatch.undo()  # a resumed run reads the choice from the state, it does not decide again
    backend = LocalBackend(cfg)
    run_search(cfg, tmp_path / "run", progress=False, backend=backend, resume=True, **{"budget.max_evals": 12})
    assert _state(tmp_path / "run")["eval_dtype"] == choice
    assert backend.worker.runtime.pool.dtype == torch.bfloat16
    assert len(read_evals(tmp_path / "run")) == 12


def test_disagreeing_scores_keep_float32(mc_search, tmp_path, monkeypatch):
    _force_bf16(monkeypatch)
    monkeypatch.setattr(ed, "EVAL_DTYPE_MAX_SCORE_DIFF", -1.0)  # nothing agrees
    run_search(load_search_config(mc_search()), tmp_path / "run", progress=False)
    choice = _state(tmp_path / "run")["eval_dtype"]
    assert choice["dtype"] == "float32" and choice["proposed"] == "bfloat16"
