"""The native evaluator gives the adapter's numbers (and forwards fewer times)."""

from __future__ import annotations

import pytest
from objectives_helpers import GEN_TASK, MC_TASK, PPL_TASK

from dfsmerge.errors import ConfigError
from dfsmerge.objectives import EvalConfig, ObjectiveConfig, TaskSuite
from dfsmerge.objectives.lm_adapter import DfsLM
from dfsmerge.objectives.native import NativeTask


def _suite(task_dir, tok, objectives):
    return TaskSuite(EvalConfig(objectives=tuple(objectives), task_paths=(str(task_dir),), batch_size=4), tok)


@pytest.fixture(scope="module")
def harness_scores(tiny_model, task_dir):
    model, tok = tiny_model
    suite = _suite(task_dir, tok, [ObjectiveConfig(name=MC_TASK, split="validation"),
                                   ObjectiveConfig(name=GEN_TASK, metric="exact_match")])
    return suite.evaluate(model, tok)


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_native_multiple_choice_equals_adapter(tiny_model, task_dir, harness_scores, prefix_cache):
    model, tok = tiny_model
    suite = _suite(task_dir, tok, [ObjectiveConfig(name=MC_TASK, split="validation", native=True)])
    native = suite.prepared[0].native
    native.prefix_cache = prefix_cache
    got = native.evaluate(model)
    assert got == {k: v for k, v in harness_scores[MC_TASK].items()}
    # per-request loglikelihoods against the adapter's, request by request
    ref = DfsLM(model, tok, batch_size=4)._loglikelihood_tokens(native.requests)
    lls = native._loglikelihoods(model)
    diffs = [abs(a[0] - b[0]) for a, b in zip(lls, ref, strict=True)]
    assert max(diffs) < 1e-4, f"max diff {max(diffs)}, mean {sum(diffs) / len(diffs)}"
    assert [a[1] for a in lls] == [b[1] for b in ref]


def test_prefix_cache_runs_each_prompt_once(tiny_model, task_dir):
    model, tok = tiny_model
    suite = _suite(task_dir, tok, [ObjectiveConfig(name=MC_TASK, split="validation", native=True)])
    native = suite.prepared[0].native
    n_docs, n_req = len(native.docs), len(native.requests)
    assert native.shared == []  # BOS "q: " is too short to be run on its own
    native.evaluate(model)
    cached = native.forward_calls
    # a prefill and a continuation pass per batch of 4 documents, versus one pass per 4 (ctx + choice) rows
    assert cached <= 2 * -(-n_docs // 4) < -(-n_req // 4) and native.prefix_fallbacks == 0


def test_native_exact_match_equals_adapter(tiny_model, task_dir, harness_scores):
    model, tok = tiny_model
    suite = _suite(task_dir, tok, [ObjectiveConfig(name=GEN_TASK, metric="exact_match", native=True)])
    got = suite.prepared[0].native.evaluate(model)
    assert got == harness_scores[GEN_TASK]
    assert got["exact_match,none"] >= 0.5  # even docs' targets are the reference greedy output


def test_native_greedy_fallback_equals_teacher_forcing(tiny_model, task_dir):
    model, tok = tiny_model
    suite = _suite(task_dir, tok, [ObjectiveConfig(name=GEN_TASK, metric="exact_match", native=True)])
    native = suite.prepared[0].native
    assert all(g["target"] is not None for g in native.gen)  # the fixture tokenizer round-trips
    calls = native.scorer.forward_calls
    fast = native._exact_matches(model)
    fast_calls = native.scorer.forward_calls - calls
    for g in native.gen:
        g["target"] = None  # force greedy decoding for every doc
    calls = native.scorer.forward_calls
    slow = native._exact_matches(model)
    assert fast == slow and any(fast) and not all(fast)
    assert fast_calls < native.scorer.forward_calls - calls


def test_native_refuses_what_it_cannot_do(tiny_model, task_dir):
    _, tok = tiny_model
    with pytest.raises(ConfigError, match="native: false"):
        _suite(task_dir, tok, [ObjectiveConfig(name=PPL_TASK, metric="word_perplexity", native=True)])


def test_native_refuses_exact_match_options(tiny_model, task_dir):
    _, tok = tiny_model
    suite = _suite(task_dir, tok, [ObjectiveConfig(name=GEN_TASK, metric="exact_match")])
    task = suite.prepared[0].task
    task._metric_fn_kwargs["exact_match"] = {"ignore_case": True}
    with pytest.raises(ConfigError, match="exact_match options"):
        NativeTask(task, limit=None, tokenizer=tok)


def test_native_truncates_like_the_adapter(tiny_model, task_dir):
    """With a short context window every path must left-truncate as HFLM does (MC falls back to plain scoring)."""
    from dfsmerge.objectives.tasks import simple_evaluate

    model, tok = tiny_model
    suite = _suite(task_dir, tok, [ObjectiveConfig(name=MC_TASK, split="validation", native=True),
                                   ObjectiveConfig(name=GEN_TASK, metric="exact_match", native=True)])
    mc, gen = suite.prepared[0].native, suite.prepared[1].native
    for native in (mc, gen):
        native.scorer.max_length = 8
    lm = DfsLM(model, tok, batch_size=4, max_length=8)
    ref = lm._loglikelihood_tokens(mc.requests)
    lls = mc._loglikelihoods(model)
    assert any(len(c) + len(x) > 9 for _, c, x in mc.requests)  # truncation really happens
    assert max(abs(a[0] - b[0]) for a, b in zip(lls, ref, strict=True)) < 1e-4
    assert [a[1] for a in lls] == [b[1] for b in ref]
    out = simple_evaluate(lm, [GEN_TASK], task_paths=[task_dir], bootstrap_iters=0, log_samples=False)
    assert gen.evaluate(model) == {"exact_match,none": out["results"][GEN_TASK]["exact_match,none"]}
