"""Nested loglikelihood requests (a worked answer's calculator steps, each step's request a prefix of the next
one's): the native evaluator scores a whole chain from one forward pass over its longest member, with the harness's
numbers, request by request."""

from __future__ import annotations

import random

import pytest
from objectives_helpers import reference_greedy, run_lm_eval, strip_stderr
from objectives_helpers import write_task as _write_task

from dfsmerge.objectives import EvalConfig, ObjectiveConfig, TaskSuite
from dfsmerge.objectives.lm_adapter import DfsLM
from dfsmerge.objectives.native import _nested

NAME = "dfst_nested"


def test_nested_groups_chains_by_their_longest_member():
    reqs = [(None, [1, 2], [3]), (None, [1, 2, 3, 4], [5]), (None, [1, 2, 3], [4, 5, 6]), (None, [7], [8]),
            (None, [1, 2], [9]), (None, [7], [8])]
    # 0 = [1,2,3] and 1 = [1,2,3,4,5] extend into 2 = [1,2,3,4,5,6]; 4 = [1,2,9] and 3/5 (equal) stand alone
    assert _nested(reqs, list(range(6))) == {2: [1, 0]}
    assert _nested(reqs, [0, 3, 4]) == {}
    assert _nested([], []) == {}


@pytest.fixture(scope="module")
def nested_task(tiny_model, tmp_path_factory):
    model, tok = tiny_model
    d = tmp_path_factory.mktemp("nested_task")
    rng = random.Random(3)

    def word() -> str:
        return "".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 4)))

    rows = []
    for q in range(6):  # six "questions" of 2-4 steps; even steps' targets are the model's own greedy text
        text = " ".join(word() for _ in range(rng.randint(2, 5)))
        for k in range(rng.randint(2, 4)):
            ctx = text + " <<"
            target = reference_greedy(model, tok, ctx, max_new=2, until=[]) if k % 2 == 0 else word() + ">>"
            rows.append({"context": ctx, "target": target})
            text = ctx + target + " " + word()
    rows += [{"context": word() + " <<", "target": word() + ">>"} for _ in range(4)]  # no chain
    _write_task(d, NAME, "output_type: loglikelihood\nvalidation_split: validation\ndoc_to_text: '{{context}}'\n"
                "doc_to_target: '{{target}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n"
                "  - metric: perplexity\n", {"validation": rows})
    return d


def _tokens(model):
    seen = []
    h = model.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["input_ids"]).numel()),
                                        with_kwargs=True)
    return seen, h


def test_nested_requests_give_the_harness_scores_with_fewer_tokens(tiny_model, nested_task):
    model, tok = tiny_model
    cfg = EvalConfig(objectives=(ObjectiveConfig(name=NAME, split="validation", native=True),),
                     task_paths=(str(nested_task),), batch_size=4)
    native = TaskSuite(cfg, tok).prepared[0].native
    chains = _nested(native.requests, list(range(len(native.requests))))
    assert len(chains) == 6 and sum(len(v) for v in chains.values()) >= 6
    seen, h = _tokens(model)
    try:
        lls = native._loglikelihoods(model)
        scores = native.evaluate(model)
    finally:
        h.remove()
    ref = DfsLM(model, tok, batch_size=4)._loglikelihood_tokens(native.requests)
    assert max(abs(a[0] - b[0]) for a, b in zip(lls, ref, strict=True)) < 1e-4
    assert [a[1] for a in lls] == [b[1] for b in ref]
    assert 0 < sum(a[1] for a in lls) < len(lls)  # some steps greedy-correct, some not
    harness = strip_stderr(run_lm_eval(DfsLM(model, tok, batch_size=4), [NAME], nested_task)["results"][NAME])
    assert scores["acc,none"] == harness["acc,none"]
    assert scores["perplexity,none"] == pytest.approx(harness["perplexity,none"], rel=1e-4)
    chained_tokens = sum(len(r[1]) + len(r[2]) - 1 for r in native.requests)
    assert sum(seen) < 2 * chained_tokens / 2  # both evaluations together: fewer tokens than one pass per request
