"""Shared prompt prefixes (NativeTask ``share_prompts``): tasks whose documents all start with the same description
and few-shot examples run that prefix once per batch; the scores equal the harness's and the unshared run's, with
far fewer tokens through the model."""

from __future__ import annotations

import json
import random

import pytest
from objectives_helpers import reference_greedy, run_lm_eval, strip_stderr
from objectives_helpers import write_task as _write_task

from dfsmerge.objectives import EvalConfig, ObjectiveConfig, TaskSuite
from dfsmerge.objectives.lm_adapter import DfsLM
from dfsmerge.objectives.native import _common_prefix

MC, GEN = "dfst_shared_mc", "dfst_shared_gen"
UNTIL = ["."]
HEAD = ("description: 'Answer the questions about the letters below, one after another, exactly as in the "
        "examples.\\n\\n'\nnum_fewshot: 3\nfewshot_split: train\nfewshot_config:\n  sampler: first_n\n")


def test_common_prefix():
    assert _common_prefix([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 3, 4, 9]], min_tokens=2) == [1, 2, 3]
    assert _common_prefix([[1, 2, 3], [1, 2, 3, 4]], min_tokens=2) == [1, 2]  # every prompt keeps one of its own
    assert _common_prefix([[1, 2, 3], [1, 7, 3]], min_tokens=2) == []  # shorter than min_tokens
    assert _common_prefix([[5, 6, 7]], min_tokens=2) == [5, 6]
    assert _common_prefix([]) == []
    long = list(range(20))
    assert _common_prefix([long + [1], long + [2]]) == long  # the default minimum (8 tokens)
    assert _common_prefix([long[:7] + [1], long[:7] + [2]]) == []


@pytest.fixture(scope="module")
def shared_tasks(tiny_model, tmp_path_factory):
    model, tok = tiny_model
    d = tmp_path_factory.mktemp("shared_tasks")
    rng = random.Random(1)

    def word(n):
        return "".join(rng.choice("abcdefghij") for _ in range(n))

    def mc_doc():
        return {"question": f"{word(rng.randint(2, 6))} is", "choices": [word(rng.randint(1, 3)) for _ in range(3)],
                "label": rng.randrange(3)}

    _write_task(d, MC, HEAD + "output_type: multiple_choice\nvalidation_split: validation\ntraining_split: train\n"
                "doc_to_text: '{{question}}'\ndoc_to_choice: choices\ndoc_to_target: label\n"
                "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
                {"train": [mc_doc() for _ in range(3)], "validation": [mc_doc() for _ in range(13)]})
    body = (HEAD + "output_type: generate_until\nvalidation_split: validation\ntraining_split: train\n"
            "doc_to_text: '{{q}}='\ndoc_to_target: a\ntarget_delimiter: ''\n"
            f"generation_kwargs:\n  until: {json.dumps(UNTIL)}\n  max_gen_toks: 4\n  do_sample: false\n"
            "metric_list:\n  - metric: exact_match\n")
    train = [{"q": word(3), "a": word(2)} for _ in range(3)]
    val = [{"q": word(rng.randint(2, 5)), "a": "x"} for _ in range(11)]
    _write_task(d, GEN, body, {"train": train, "validation": val})
    # targets: the model's own greedy answer for even documents (so some match), computed on the built prompts
    native = _suite(d, tok, GEN).prepared[0].native
    for i, (doc, g) in enumerate(zip(val, native.gen, strict=True)):
        doc["a"] = reference_greedy(model, tok, g["prompt"], max_new=4, until=UNTIL) if i % 2 == 0 else "zz"
    _write_task(d, GEN, body, {"train": train, "validation": val})
    return d


def _suite(d, tok, name, share=True):
    cfg = EvalConfig(objectives=(ObjectiveConfig(name=name, split="validation", native=True),),
                     task_paths=(str(d),), batch_size=4, share_prompts=share)
    return TaskSuite(cfg, tok)


def _tokens(model):
    seen = []
    h = model.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["input_ids"]).numel()),
                                        with_kwargs=True)
    return seen, h


@pytest.mark.parametrize("name", [MC, GEN])
def test_shared_prompts_give_the_harness_scores_with_fewer_tokens(tiny_model, shared_tasks, name):
    model, tok = tiny_model
    runs = {}
    for share in (True, False):
        native = _suite(shared_tasks, tok, name, share).prepared[0].native
        seen, h = _tokens(model)
        try:
            runs[share] = (native, native.evaluate(model), sum(seen))
        finally:
            h.remove()
    shared, off = runs[True][0], runs[False][0]
    assert len(shared.shared) > 40 and off.shared == []  # description + 3 examples
    assert shared.prefix_fallbacks == 0
    harness = strip_stderr(run_lm_eval(DfsLM(model, tok, batch_size=4), [name], shared_tasks)["results"][name])
    want = {k: v for k, v in harness.items() if "," in k}
    assert runs[True][1] == runs[False][1] == want
    assert runs[True][2] < 0.5 * runs[False][2], (runs[True][2], runs[False][2])
    if name == MC:  # request by request against the adapter
        ref = DfsLM(model, tok, batch_size=4)._loglikelihood_tokens(shared.requests)
        lls = shared._loglikelihoods(model)
        assert max(abs(a[0] - b[0]) for a, b in zip(lls, ref, strict=True)) < 1e-4
        assert [a[1] for a in lls] == [b[1] for b in ref]
    else:
        assert 0 < runs[True][1]["exact_match,none"] < 1


def test_shared_prompts_per_document_positions(tiny_model, shared_tasks):
    # racing scores blocks of documents: a subset scored alone gives those documents' values of the full run
    model, tok = tiny_model
    for name in (MC, GEN):
        native = _suite(shared_tasks, tok, name).prepared[0].native
        full = native.per_doc(model)
        pos = [5, 0, 3]
        part = native.per_doc(model, pos)
        assert part == {m: [v[p] for p in pos] for m, v in full.items()}
