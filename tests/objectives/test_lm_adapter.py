"""DfsLM gives lm-eval's own HFLM numbers on the vanilla model, and leaves the caller's RNGs alone."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from objectives_helpers import GEN_TASK, MC_TASK, PPL_TASK, run_lm_eval, strip_stderr

from dfsmerge.objectives.lm_adapter import DfsLM


@pytest.fixture(scope="module")
def hflm_results(tiny_model, task_dir):
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny_model
    return run_lm_eval(HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu"),
                            [MC_TASK, GEN_TASK, PPL_TASK], task_dir)


@pytest.fixture(scope="module")
def dfs_results(tiny_model, task_dir):
    model, tok = tiny_model
    return run_lm_eval(DfsLM(model, tok, batch_size=4), [MC_TASK, GEN_TASK, PPL_TASK], task_dir)


@pytest.mark.parametrize("task", [MC_TASK, GEN_TASK, PPL_TASK])
def test_adapter_equals_hflm(task, hflm_results, dfs_results):
    ref, got = hflm_results["results"][task], dfs_results["results"][task]
    assert strip_stderr(got) == strip_stderr(ref)
    ref_resps = [s["resps"] for s in hflm_results["samples"][task]]
    got_resps = [s["resps"] for s in dfs_results["samples"][task]]
    assert got_resps == ref_resps  # per-document loglikelihoods / generations, bit for bit


def test_generation_matches_independent_reference(dfs_results):
    # the fixture's targets are an unbatched, cache-free greedy reference for even docs and "zz" for odd ones
    samples = sorted(dfs_results["samples"][GEN_TASK], key=lambda s: s["doc_id"])
    expected = [float(s["doc_id"] % 2 == 0 or s["target"] == s["filtered_resps"][0]) for s in samples]
    assert [float(s["exact_match"]) for s in samples] == expected
    assert dfs_results["results"][GEN_TASK]["exact_match,none"] >= 0.5


def test_batch_size_does_not_change_scores(tiny_model, task_dir, dfs_results):
    model, tok = tiny_model
    one = run_lm_eval(DfsLM(model, tok, batch_size=1), [MC_TASK, GEN_TASK], task_dir)
    for task in (MC_TASK, GEN_TASK):
        a = [s["resps"] for s in one["samples"][task]]
        b = [s["resps"] for s in dfs_results["samples"][task]]
        if task == GEN_TASK:
            assert a == b
        else:
            for x, y in zip(a, b, strict=True):
                for (lx, gx), (ly, gy) in zip([r[0] for r in x], [r[0] for r in y], strict=True):
                    assert abs(float(lx) - float(ly)) < 1e-4 and gx == gy


def test_evaluation_does_not_reseed_rngs(tiny_model, task_dir):
    from dfsmerge.objectives import EvalConfig, Evaluator, ObjectiveConfig

    model, tok = tiny_model
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    from dfsmerge.objectives.tasks import simple_evaluate

    out = simple_evaluate(DfsLM(model, tok, batch_size=4), [MC_TASK, GEN_TASK], task_paths=[task_dir], limit=3,
                          bootstrap_iters=0)
    assert set(out["results"]) == {MC_TASK, GEN_TASK}
    cfg = EvalConfig(objectives=(ObjectiveConfig(name=MC_TASK, limit=3),
                                 ObjectiveConfig(name=GEN_TASK, metric="exact_match", limit=3, native=True)),
                     task_paths=(str(task_dir),))
    Evaluator(cfg, tok).evaluate(model)
    assert random.getstate() == states[0]
    after_np = np.random.get_state()
    assert after_np[0] == states[1][0] and np.array_equal(after_np[1], states[1][1]) and after_np[2:] == states[1][2:]
    assert torch.equal(torch.get_rng_state(), states[2])


def test_sampling_task_is_refused(tiny_model):
    from lm_eval.api.instance import Instance

    model, tok = tiny_model
    req = Instance(request_type="generate_until", doc={}, arguments=("1+1=", {"do_sample": True, "until": ["."]}),
                   idx=0)
    from dfsmerge.errors import ConfigError

    with pytest.raises(ConfigError, match="do_sample"):
        DfsLM(model, tok).generate_until([req])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adapter_equals_hflm_on_cuda(tiny_ckpt, task_dir):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_ckpt), dtype=torch.float32).cuda().eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_ckpt))
    ref = run_lm_eval(HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cuda"), [MC_TASK, GEN_TASK],
                           task_dir)
    got = run_lm_eval(DfsLM(model, tok, batch_size=4), [MC_TASK, GEN_TASK], task_dir)
    for task in (MC_TASK, GEN_TASK):
        assert strip_stderr(got["results"][task]) == strip_stderr(ref["results"][task])
