"""Objective config, direction-aware fitness, the result cache, validation errors and the eval function API."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from objectives_helpers import GEN_TASK, MC_TASK, PPL_TASK

from dfsmerge.errors import ConfigError, DfsmergeError
from dfsmerge.objectives import (
    EvalConfig,
    Evaluator,
    ObjectiveConfig,
    ResultCache,
    candidate_key,
    evaluate_model,
    format_table,
    scalar_fitness,
    to_minimize,
)


def _cfg(task_dir, *objs, **kw) -> EvalConfig:
    return EvalConfig(objectives=tuple(objs), task_paths=(str(task_dir),), batch_size=4, **kw)


class _Counter:
    """Counts top-level forward calls of a module through a forward hook."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.n += 1


# ---- config --------------------------------------------------------------------------------------------------
def test_objective_config_is_frozen_and_normalises_metric():
    o = ObjectiveConfig(name="t", metric="exact_match")
    assert o.metric == "exact_match,none" and o.key == "t/exact_match,none"
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        o.weight = 2.0  # type: ignore[misc]


@pytest.mark.parametrize("bad", [dict(weight=-1.0), dict(weight=0.0), dict(limit=0), dict(limit=-0.5),
                                 dict(type="cost", name="speed"), dict(type="cost", name="hops", direction="maximize"),
                                 dict(unknown_field=1)])
def test_objective_config_rejects(bad):
    with pytest.raises(ValueError):
        ObjectiveConfig(**{"name": "t", **bad})


# ---- fitness -------------------------------------------------------------------------------------------------
def test_to_minimize_is_direction_aware():
    assert to_minimize(0.8, "maximize") == -0.8
    assert to_minimize(12.0, "minimize") == 12.0
    assert to_minimize(float("nan"), "maximize") == math.inf
    objs = [ObjectiveConfig(name="a", weight=2.0), ObjectiveConfig(name="hops", type="cost")]
    assert scalar_fitness({"a": -0.5, "cost/hops": 3.0}, objs) == 2.0
    assert scalar_fitness({"a": math.inf, "cost/hops": 3.0}, objs) == math.inf


def test_higher_is_better_false_is_minimised_without_negative_weight(tiny_model, task_dir):
    model, tok = tiny_model
    ev = Evaluator(_cfg(task_dir, ObjectiveConfig(name=PPL_TASK, metric="word_perplexity", weight=1.0),
                        ObjectiveConfig(name=MC_TASK, split="validation")), tok)
    ppl_key, acc_key = f"{PPL_TASK}/word_perplexity,none", MC_TASK
    assert ev.directions == {ppl_key: "minimize", acc_key: "maximize"}
    r = ev.evaluate(model)
    assert r.values[ppl_key] == r.scores[ppl_key] > 0  # perplexity is minimised as is
    assert r.values[acc_key] == -r.scores[acc_key]  # accuracy is negated
    assert r.fitness == pytest.approx(r.scores[ppl_key] - r.scores[acc_key])
    # a worse (higher-perplexity) model gets a worse (higher) fitness: perturb the head
    worse = type(model)(model.config).eval()
    worse.load_state_dict(model.state_dict())
    with torch.no_grad():
        worse.lm_head.weight.mul_(3.0)
    r2 = ev.evaluate(worse)
    assert (r2.scores[ppl_key] > r.scores[ppl_key]) == (r2.values[ppl_key] > r.values[ppl_key])
    assert r2.scores[ppl_key] != r.scores[ppl_key]


def test_default_metric_is_acc_else_the_tasks_first(tiny_model, task_dir):
    _, tok = tiny_model
    ev = Evaluator(_cfg(task_dir, ObjectiveConfig(name=MC_TASK), ObjectiveConfig(name=GEN_TASK)), tok)
    assert ev.suite.metrics() == {MC_TASK: "acc,none", GEN_TASK: "exact_match,none"}


def test_two_metrics_of_one_task_score_it_once(tiny_model, task_dir):
    model, tok = tiny_model
    ev = Evaluator(_cfg(task_dir, ObjectiveConfig(name=MC_TASK, split="validation", native=True),
                        ObjectiveConfig(name=MC_TASK, split="validation", native=True, metric="acc_norm")), tok)
    counter = _Counter(model)
    try:
        r = ev.evaluate(model)
    finally:
        counter.handle.remove()
    assert counter.n == ev.suite.prepared[0].native.forward_calls  # the second objective ran nothing
    assert r.scores == {MC_TASK + "/acc_norm,none": r.results[MC_TASK]["acc_norm,none"],
                        MC_TASK: r.results[MC_TASK]["acc,none"]}
    with pytest.raises(ConfigError, match="different split"):
        Evaluator(_cfg(task_dir, ObjectiveConfig(name=MC_TASK, split="validation"), ObjectiveConfig(name=MC_TASK)),
                  tok)


def test_explicit_direction_overrides_task(tiny_model, task_dir):
    _, tok = tiny_model
    ev = Evaluator(_cfg(task_dir, ObjectiveConfig(name=MC_TASK, direction="minimize")), tok)
    assert ev.directions[MC_TASK] == "minimize"


# ---- cache ---------------------------------------------------------------------------------------------------
def test_duplicate_candidate_costs_no_forward(tiny_model, task_dir):
    model, tok = tiny_model
    ev = Evaluator(_cfg(task_dir, ObjectiveConfig(name=MC_TASK, limit=3),
                        ObjectiveConfig(name=GEN_TASK, metric="exact_match", limit=3, native=True),
                        ObjectiveConfig(name="hops", type="cost")), tok)
    counter = _Counter(model)
    try:
        a = ev.evaluate(model, key=candidate_key({"path": [0, 1], "scales": [1.0, 0.5]}))
        first = counter.n
        b = ev.evaluate(model, key=candidate_key({"scales": [1.0, 0.5], "path": [0, 1]}))  # same decoded candidate
        assert first > 0 and counter.n == first and b is a
        ev.evaluate(model, key=candidate_key({"path": [0, 1], "scales": [1.0, 0.25]}))  # a different one
        assert counter.n > first
        assert (ev.cache.hits, ev.cache.misses) == (1, 2)
    finally:
        counter.handle.remove()


def test_result_cache_eviction_and_keys():
    cache = ResultCache(max_entries=2)
    for k in "abc":
        cache.get_or_compute(k, lambda k=k: k.upper())
    assert "a" not in cache and len(cache) == 2 and cache.get("c") == "C"
    assert candidate_key({"x": 1.0, "y": [1, 2]}) == candidate_key({"y": [1, 2], "x": 1.0})
    assert candidate_key({"x": 1.0}) != candidate_key({"x": 1.0000001})


# ---- validation ----------------------------------------------------------------------------------------------
def test_unknown_task_names_close_match(tiny_model, task_dir):
    _, tok = tiny_model
    with pytest.raises(ConfigError, match=r"'dfst_mcq'.*did you mean dfst_mc"):
        Evaluator(_cfg(task_dir, ObjectiveConfig(name="dfst_mcq"), builtin_tasks=False), tok)


@pytest.mark.parametrize("obj, match", [
    (ObjectiveConfig(name=MC_TASK, metric="exact_match"), r"metric='exact_match,none' is not produced.*acc,none"),
    (ObjectiveConfig(name=GEN_TASK, metric="acc"), r"acc,none.*not produced.*exact_match,none"),
    (ObjectiveConfig(name="dfst_empty"), r"dfst_empty_validation.jsonl are empty"),
    (ObjectiveConfig(name=MC_TASK, split="train"), r"split"),
])
def test_bad_objectives_fail_before_search(tiny_model, task_dir, obj, match):
    _, tok = tiny_model
    with pytest.raises(DfsmergeError, match=match):
        Evaluator(_cfg(task_dir, obj), tok)


@pytest.mark.parametrize("generation, match", [
    ("do_sample: true", "do_sample"),  # sampling
    ("do_sample: false\n  repetition_penalty: 1.3", "repetition_penalty"),  # an option that changes greedy output
])
def test_non_greedy_generation_task_is_rejected_up_front(generation, match, tiny_model, task_dir, tmp_path):
    _, tok = tiny_model
    src = (Path(task_dir) / f"{GEN_TASK}.yaml").read_text()
    (tmp_path / "t.yaml").write_text(src.replace(f"task: {GEN_TASK}", "task: dfst_nongreedy")
                                     .replace("do_sample: false", generation))
    cfg = EvalConfig(objectives=(ObjectiveConfig(name="dfst_nongreedy", metric="exact_match"),),
                     task_paths=(str(tmp_path),))
    with pytest.raises(ConfigError, match=match):
        Evaluator(cfg, tok)


def test_benchmark_test_split_needs_flag(tiny_model, tmp_path):
    """A built-in lm-eval task (arc_easy, whose YAML lives in lm-eval's package) on its test split is refused
    before any download; with the flag the guard lets it through (and loading then fails offline, later)."""
    import lm_eval.tasks

    _, tok = tiny_model
    arc_dir = str(Path(lm_eval.tasks.__file__).parent / "arc")
    with pytest.raises(ConfigError, match="allow_benchmark_test_split"):
        Evaluator(EvalConfig(objectives=(ObjectiveConfig(name="arc_easy"),), task_paths=(arc_dir,)), tok)
    with pytest.raises(ConfigError, match="allow_benchmark_test_split"):
        Evaluator(EvalConfig(objectives=(ObjectiveConfig(name="arc_easy", split="test"),), task_paths=(arc_dir,)),
                  tok)


def test_missing_task_path_is_named(tiny_model, tmp_path):
    _, tok = tiny_model
    with pytest.raises(ConfigError, match="not a directory"):
        Evaluator(EvalConfig(objectives=(ObjectiveConfig(name="x"),), task_paths=(str(tmp_path / "nope"),)), tok)


# ---- function API --------------------------------------------------------------------------------------------
def test_evaluate_model_shape_and_table(tiny_model, task_dir):
    model, tok = tiny_model
    out = evaluate_model(model, tok, [MC_TASK, GEN_TASK], task_paths=[str(task_dir)], split="validation")
    assert set(out) == {"results"} and set(out["results"]) == {MC_TASK, GEN_TASK}
    assert {"acc,none", "acc_norm,none"} <= set(out["results"][MC_TASK])
    assert set(out["results"][GEN_TASK]) == {"exact_match,none"}
    table = format_table(out)
    assert MC_TASK in table and "exact_match,none" in table and len(table.splitlines()) == 2 + 3
    native = evaluate_model(model, tok, [MC_TASK, GEN_TASK], task_paths=[str(task_dir)], split="validation",
                            native=True)
    assert native == out


def test_no_task_paths_and_no_builtins_is_a_clean_error():
    from dfsmerge.errors import ConfigError
    from dfsmerge.objectives.tasks import make_task_manager

    with pytest.raises(ConfigError, match="'zoo_math_b' is not a known lm-eval task"):
        make_task_manager(["zoo_math_b"], (), builtin_tasks=False)


@pytest.mark.parametrize("native", [False, True])
def test_no_third_party_progress_bar(tiny_model, tmp_path, capfd, native):
    """lm-eval draws a bar whenever a task builds its requests, and ``datasets`` one per split it prepares from a
    JSONL file it has not seen; dfsmerge's evaluation shows neither (a search builds requests for every candidate).
    Both are theirs again outside dfsmerge's calls."""
    import uuid

    import datasets.utils.logging as ds_logging
    import lm_eval.api.task as lm_task
    from objectives_helpers import write_task

    model, tok = tiny_model
    fresh = uuid.uuid4().hex  # new file contents: datasets prepares (and would draw) the splits anew
    docs = [{"question": f"q{i} {fresh}", "choices": ["a", "b"], "label": i % 2} for i in range(6)]
    write_task(tmp_path, "dfst_fresh", "output_type: multiple_choice\nvalidation_split: validation\n"
               "doc_to_text: '{{question}}'\ndoc_to_choice: choices\ndoc_to_target: label\n"
               "metric_list:\n  - metric: acc\n", {"validation": docs})
    drawn, ds_bars = lm_task.tqdm, ds_logging.is_progress_bar_enabled()
    capfd.readouterr()
    r = evaluate_model(model, tok, ["dfst_fresh"], task_paths=[str(tmp_path)], split="validation", native=native)
    assert 0.0 <= r["results"]["dfst_fresh"]["acc,none"] <= 1.0
    err = capfd.readouterr().err
    assert "it/s" not in err and "%|" not in err and "examples/s" not in err, err
    assert lm_task.tqdm is drawn and ds_logging.is_progress_bar_enabled() == ds_bars
