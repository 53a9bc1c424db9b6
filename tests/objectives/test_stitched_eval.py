"""Done-when of issue 5: for an identity plan, the adapter over the runtime's StitchedModel gives lm-eval HFLM's
numbers on the vanilla model (multiple choice and generate_until), and the native evaluator gives the adapter's;
the native path also scores a non-trivial (repeated-layer, scaled) path like the adapter."""

from __future__ import annotations

import pytest
from objectives_helpers import GEN_TASK, MC_TASK, run_lm_eval, strip_stderr

from dfsmerge.objectives import EvalConfig, ObjectiveConfig, TaskSuite
from dfsmerge.objectives.lm_adapter import DfsLM
from dfsmerge.runtime.stitched import StitchedModel

pytest.importorskip("dfsmerge.runtime.pool")


@pytest.fixture(scope="module")
def pool(tiny_ckpt):
    from dfsmerge.runtime.pool import LayerPool

    return LayerPool({"A": str(tiny_ckpt)})


def _identity(pool):
    from dfsmerge.genome.plan import PathPlan

    return StitchedModel.from_pool(pool, PathPlan.identity("A", 2)).eval()


def test_identity_plan_adapter_equals_hflm_on_vanilla(pool, tiny_model, task_dir):
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny_model
    ref = run_lm_eval(HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu"), [MC_TASK, GEN_TASK],
                           task_dir)
    got = run_lm_eval(DfsLM(_identity(pool), tok, batch_size=4), [MC_TASK, GEN_TASK], task_dir)
    for task in (MC_TASK, GEN_TASK):
        assert strip_stderr(got["results"][task]) == strip_stderr(ref["results"][task])
    gen_ref = [s["resps"] for s in ref["samples"][GEN_TASK]]
    assert [s["resps"] for s in got["samples"][GEN_TASK]] == gen_ref
    for a, b in zip(got["samples"][MC_TASK], ref["samples"][MC_TASK], strict=True):
        for (la, ga), (lb, gb) in zip([r[0] for r in a["resps"]], [r[0] for r in b["resps"]], strict=True):
            assert abs(float(la) - float(lb)) < 1e-4 and ga == gb


@pytest.mark.parametrize("path", ["identity", "repeat"])
def test_native_equals_adapter_on_stitched(pool, tiny_model, task_dir, path):
    from dfsmerge.genome.plan import LayerRef, PathPlan, Step

    _, tok = tiny_model
    if path == "identity":
        model = _identity(pool)
    else:
        plan = PathPlan((Step(LayerRef("A", 0)), Step(LayerRef("A", 1), 0.8), Step(LayerRef("A", 1), 1.1)),
                        models={"A": "A"}, base="A")
        model = StitchedModel.from_pool(pool, plan).eval()
    objs = [ObjectiveConfig(name=MC_TASK, split="validation"), ObjectiveConfig(name=GEN_TASK)]
    cfg = EvalConfig(objectives=tuple(objs), task_paths=(str(task_dir),), batch_size=4)
    harness = TaskSuite(cfg, tok).evaluate(model, tok)
    native_cfg = cfg.model_copy(update={"objectives": tuple(o.model_copy(update={"native": True}) for o in objs)})
    native_suite = TaskSuite(native_cfg, tok)
    assert native_suite.evaluate(model, tok) == harness
    mc = native_suite.prepared[0].native
    assert mc.forward_calls > 0 and mc.prefix_fallbacks == 0  # the prefix cache worked on the stitched cache
