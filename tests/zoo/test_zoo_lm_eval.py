"""The zoo's task YAMLs run in lm-eval, and lm-eval sees the prompts exactly as training did."""

from __future__ import annotations

import pytest
import torch

from dfsmerge.zoo import TASKS
from dfsmerge.zoo.tasks import VOCAB, Sample
from dfsmerge.zoo.train import make_batch


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _greedy_text(model, prompt: str, max_new: int = 8) -> str:
    """Reference greedy decoding from the training-format prompt, one unpadded sequence, no cache."""
    ids = make_batch([Sample(prompt, "")])[0][0, :-1].tolist()  # <s> prompt (drop the closing </s>)
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == model.config.eos_token_id:
                break
            out.append(nxt)
    return "".join(VOCAB[i] for i in out if i >= 4)  # lm-eval decodes with skip_special_tokens=True


def test_task_manager_loads_every_zoo_task(tiny_zoo):
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(tiny_zoo.task_dir), include_defaults=False)
    assert set(TASKS) <= set(tm.all_tasks)
    assert set(tiny_zoo.tasks) == set(TASKS)


@pytest.fixture(scope="module")
def noisy_language_model(tiny_zoo, tmp_path_factory):
    """The tiny language expert with a noisy head: the tiny zoo's models stop at once, this one writes varied
    strings of varied lengths, so comparing generations is a real check."""
    from transformers import AutoModelForCausalLM

    from dfsmerge.zoo.tasks import save_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_zoo.model_path("language"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn(model.lm_head.weight.shape, generator=gen))
    out = tmp_path_factory.mktemp("noisy") / "language-noisy"
    model.save_pretrained(out)
    save_tokenizer(out)
    return out


@pytest.mark.parametrize("which", ["zoo", "noisy"])
def test_simple_evaluate_agrees_with_reference_greedy(tiny_zoo, noisy_language_model, which):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(tiny_zoo.task_dir), include_defaults=False)
    path = tiny_zoo.model_path("language") if which == "zoo" else noisy_language_model
    lm = HFLM(pretrained=str(path), device="cpu", batch_size=4)  # batches of 4: left padding is exercised
    names = ["zoo_math_b", "zoo_lang_b"]
    out = lm_eval.simple_evaluate(model=lm, tasks=names, limit=6, task_manager=tm, random_seed=None,
                                  numpy_random_seed=None, torch_random_seed=None, log_samples=True,
                                  bootstrap_iters=0)
    model = lm.model.eval()
    for name in names:
        samples = out["samples"][name]
        assert len(samples) == 6
        for s in samples:
            context = s["arguments"][0][0]
            assert context == s["doc"]["prompt"]
            ids, _ = lm.tok_batch_encode([context])
            assert ids[0].tolist() == make_batch([Sample(context, "")])[0][0, :-1].tolist()
            assert s["resps"][0][0] == _greedy_text(model, context), (name, s["doc"])
            assert s["exact_match"] == float(s["resps"][0][0] == s["doc"]["answer"])
        mean = sum(s["exact_match"] for s in samples) / len(samples)
        assert out["results"][name]["exact_match,none"] == pytest.approx(mean)
    if which == "noisy":
        resps = {s["resps"][0][0] for name in names for s in out["samples"][name]}
        assert len(resps) > 3, resps  # the comparison above was not between empty strings
