"""Chat templates and generation settings in objectives, against lm-eval's own ``HFLM`` (what
``lm_eval --model hf --apply_chat_template`` runs) in-process on the real SmolLM2-135M-Instruct: the same per-document
scores through the adapter and the native scorer, with a system instruction, multi-turn few-shot examples and
generation overrides (recorded in the objective config a run writes)."""

from __future__ import annotations

import pytest
import torch
from objectives_helpers import run_lm_eval, write_task

from dfsmerge.errors import ConfigError
from dfsmerge.objectives import evaluate_model
from dfsmerge.objectives.config import EvalConfig, GenKwargs, ObjectiveConfig

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("one_torch_thread")]
SYSTEM = "You answer with one word."
GEN = GenKwargs(max_gen_toks=6, until=("\n", "."), do_sample=False)

_MC = [("The sky on a clear day is", ["blue", "green", "red"], 0), ("Two plus two is", ["three", "four", "five"], 1),
       ("The capital of France is", ["Berlin", "Madrid", "Paris"], 2), ("Ice is frozen", ["water", "sand", "air"], 0),
       ("A cat says", ["woof", "meow", "moo"], 1), ("The sun rises in the", ["west", "north", "east"], 2)]
_GEN = [("What is the capital of Italy?", "Rome"), ("What colour is grass?", "Green"),
        ("What is 3 + 4?", "7"), ("Which animal barks?", "Dog"), ("What is the opposite of hot?", "Cold")]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat_tasks")
    mc = [{"q": q, "choices": c, "label": y} for q, c, y in _MC]
    write_task(d, "chat_mc", "output_type: multiple_choice\ntest_split: test\nfewshot_split: train\n"
               "doc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
               "metric_list:\n  - metric: acc\n", {"test": mc[2:], "train": mc[:2]})
    gen = [{"q": q, "a": a} for q, a in _GEN]
    write_task(d, "chat_gen", "output_type: generate_until\ntest_split: test\nfewshot_split: train\n"
               "doc_to_text: 'Q: {{q}}\\nA:'\ndoc_to_target: ' {{a}}'\ntarget_delimiter: ''\n"
               "generation_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: 32\n  do_sample: false\n"
               "metric_list:\n  - metric: exact_match\n", {"test": gen[2:], "train": gen[:2]})
    return d


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dfsmerge.io.realmodels import real_model_dir

    path = real_model_dir("smollm2-135m")
    return (AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(str(path)))


@pytest.fixture(scope="module")
def oracle(smol, task_dir):
    """lm-eval's HFLM with --apply_chat_template --system_instruction --fewshot_as_multiturn --num_fewshot 2 and
    the generation overrides (``--gen_kwargs``): per-document values per task."""
    from lm_eval.models.huggingface import HFLM

    model, tok = smol
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    out = run_lm_eval(lm, ["chat_mc", "chat_gen"], task_dir, apply_chat_template=True, system_instruction=SYSTEM,
                      fewshot_as_multiturn=True, num_fewshot=2, gen_kwargs=GEN.as_task_kwargs())
    per = {}
    for task, metric in (("chat_mc", "acc"), ("chat_gen", "exact_match")):
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        per[task] = [float(s[metric]) for s in samples]
        per[f"{task}/resps"] = [s["resps"] for s in samples]
        context = samples[0]["arguments"][0][0]  # (context, continuation or gen_kwargs) of the first request
        assert context.startswith("<|im_start|>system\n" + SYSTEM), context[:80]  # chat prompts reached lm-eval
    return per


@pytest.mark.parametrize("native", [False, True], ids=["adapter", "native"])
def test_chat_objective_scores_as_lm_eval_hf(smol, task_dir, oracle, native):
    model, tok = smol
    objs = [ObjectiveConfig(name=name, native=native, num_fewshot=2, apply_chat_template=True,
                            system_instruction=SYSTEM, gen_kwargs=GEN if name == "chat_gen" else None)
            for name in ("chat_mc", "chat_gen")]
    cfg = EvalConfig(objectives=tuple(objs), task_paths=(str(task_dir),), batch_size=4)
    out = evaluate_model(model, tok, cfg, per_document=True)
    assert out["per_document"]["chat_mc"] == oracle["chat_mc"]
    assert out["per_document"]["chat_gen"] == oracle["chat_gen"]
    if not native:  # the adapter's raw responses through lm-eval: the same generations, the same loglikelihoods
        from dfsmerge.objectives.lm_adapter import DfsLM
        from dfsmerge.objectives.lm_eval_compat import evaluate_task_samples
        from dfsmerge.objectives.tasks import prepare_tasks

        for p in prepare_tasks(cfg, tok).prepared:
            (samples,) = evaluate_task_samples(DfsLM(model, tok, batch_size=4), {p.task.task_name: p.task},
                                               limit=None, **p.objective.chat_args).values()
            got = [s["resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
            want = oracle[f"{p.task.task_name}/resps"]
            if p.task.OUTPUT_TYPE == "generate_until":
                assert got == want
            else:
                flat = [(r[0][0], w[0][0]) for g, o in zip(got, want, strict=True) for r, w in zip(g, o, strict=True)]
                assert max(abs(a - b) for a, b in flat) < 1e-4, flat
    # a run records its resolved config as YAML (SearchConfig.to_dict: model_dump(mode="json")): the prompt options
    # and generation overrides survive it
    import yaml

    assert EvalConfig(**yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json")))) == cfg


def test_chat_prompts_differ_from_plain(smol, task_dir):
    """The option reaches the prompts: without the chat template the native prompts carry no chat markup."""
    from dfsmerge.objectives.tasks import prepare_tasks

    _, tok = smol
    plain, chat = (prepare_tasks(EvalConfig(objectives=(ObjectiveConfig(name="chat_gen", native=True,
                                                                        apply_chat_template=c),),
                                            task_paths=(str(task_dir),)), tok) for c in (False, True))
    first = [tok.decode(s.prepared[0].native.gen[0]["prompt"]) for s in (plain, chat)]
    assert "<|im_start|>" not in first[0] and "<|im_start|>user" in first[1]


def test_gen_kwargs_rejected_on_non_generation_task(smol, task_dir):
    _, tok = smol
    with pytest.raises(ConfigError, match=r"objectives\[chat_mc\]\.gen_kwargs.*generate_until"):
        evaluate_model(None, tok, [ObjectiveConfig(name="chat_mc", gen_kwargs=GEN)], task_paths=[str(task_dir)])
