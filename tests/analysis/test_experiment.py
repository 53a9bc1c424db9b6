"""The notebook helpers: ``evaluate`` is ``dfsmerge eval``; per-document outcomes average to the score on both the
native and the lm-eval path (and agree between them); ``compare`` tests on those outcomes; ``load_plan`` reads a plan
file or a candidate directory."""

from __future__ import annotations

import numpy as np
import pytest

from dfsmerge.analysis.experiment import compare, evaluate, load_plan
from dfsmerge.errors import ConfigError
from dfsmerge.genome.plan import PathPlan
from dfsmerge.report.significance import paired_test
from tests.search.conftest import MC_TASK


@pytest.fixture(scope="module")
def plan_file(tiny_models, tmp_path_factory):
    plan = PathPlan.from_dict({"models": {"m1": str(tiny_models["m1"]), "m2": str(tiny_models["m2"])}, "base": "m1",
                               "path": [{"model": "m1", "layer": 0, "scale": 1.0},
                                        {"model": "m2", "layer": 1, "scale": 0.8},
                                        {"model": "m1", "layer": 1, "scale": 1.1}]})
    d = tmp_path_factory.mktemp("plans") / "cand"
    d.mkdir()
    plan.save(d / "plan.yaml")
    return d / "plan.yaml"


@pytest.mark.parametrize("native", [True, False])
def test_per_document_outcomes_average_to_the_score(plan_file, mc_task_dir, native):
    out = evaluate(plan_file, MC_TASK, task_paths=[mc_task_dir], native=native, per_document=True)
    docs = out["per_document"][MC_TASK]
    assert len(docs) == 10 and set(docs) <= {0.0, 1.0}
    assert np.mean(docs) == pytest.approx(out["results"][MC_TASK]["acc,none"], abs=1e-12)
    plain = evaluate(plan_file, MC_TASK, task_paths=[mc_task_dir], native=native)
    assert plain["results"] == out["results"]  # asking for the documents changes no score


def test_native_and_lm_eval_per_document_outcomes_agree(plan_file, mc_task_dir):
    a = evaluate(plan_file, MC_TASK, task_paths=[mc_task_dir], native=True, per_document=True)["per_document"]
    b = evaluate(plan_file, MC_TASK, task_paths=[mc_task_dir], native=False, per_document=True)["per_document"]
    assert a == b


def test_compare_tests_the_per_document_outcomes(plan_file, tiny_models, mc_task_dir):
    cmp = compare([plan_file.parent, tiny_models["m2"]], [MC_TASK], task_paths=[mc_task_dir], native=True)
    a = evaluate(plan_file, MC_TASK, task_paths=[mc_task_dir], native=True, per_document=True)
    b = evaluate(tiny_models["m2"], MC_TASK, task_paths=[mc_task_dir], native=True, per_document=True)
    want = paired_test(b["per_document"][MC_TASK], a["per_document"][MC_TASK])
    assert cmp.tests[(1, MC_TASK)] == want
    assert "paired differences against" in cmp.format() and cmp.to_json()["paired"][0]["p_value"] == want.p_value
    with pytest.raises(ConfigError, match="two or more"):
        compare([plan_file], [MC_TASK], task_paths=[mc_task_dir])


def test_load_plan_and_evaluate_a_plan_object(plan_file, mc_task_dir, tmp_path):
    plan = load_plan(plan_file.parent)
    assert plan == load_plan(plan_file) == PathPlan.load(plan_file)
    by_object = evaluate(plan, MC_TASK, task_paths=[mc_task_dir], native=True)
    assert by_object == evaluate(plan_file, MC_TASK, task_paths=[mc_task_dir], native=True)
    with pytest.raises(ConfigError, match="neither a plan file"):
        load_plan(tmp_path)
    import torch

    with pytest.raises(ConfigError, match="tokenizer"):
        evaluate(torch.nn.Linear(2, 2), MC_TASK)
