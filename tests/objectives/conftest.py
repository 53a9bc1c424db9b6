"""Fixtures: one tiny random Llama checkpoint and three small lm-eval tasks over local JSONL (multiple choice,
generate_until exact match, and a loglikelihood_rolling perplexity task whose metric is lower-is-better)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from objectives_helpers import GEN_MAX_TOKS, GEN_TASK, GEN_UNTIL, MC_TASK, PPL_TASK, reference_greedy
from objectives_helpers import write_task as _write_task


def _save_round_trip_tokenizer(out_dir: Path) -> None:
    """The tiny character vocabulary with ``<s>`` prepended and a decoder that joins tokens without spaces (as the
    toy zoo's), so BOS handling is exercised and decode(encode(text)) == text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from dfsmerge.zoo.tiny import _VOCAB

    vocab = {t: i for i, t in enumerate(_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>"])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(out_dir))


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every objectives test runs on one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from dfsmerge.zoo.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "tiny", seed=3, num_layers=2)
    _save_round_trip_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_ckpt), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_ckpt))


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory, tiny_model) -> Path:
    """Three tasks; the generate task's targets are the reference greedy output for even docs (so some match)."""
    model, tok = tiny_model
    d = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    letters = "abcdefghij"

    def word(n):
        return "".join(rng.choice(letters) for _ in range(n))

    mc = [{"question": f"q: {word(rng.randint(3, 9))} is", "choices": [word(rng.randint(1, 4)) for _ in range(4)],
           "label": rng.randrange(4)} for _ in range(14)]
    _write_task(d, MC_TASK, "output_type: multiple_choice\nvalidation_split: validation\ntest_split: test\n"
                "doc_to_text: '{{question}}'\ndoc_to_choice: choices\ndoc_to_target: label\n"
                "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
                {"validation": mc, "test": mc[:4]})

    gen = []
    for i in range(12):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        q = f"{a}+{b}="
        ref = reference_greedy(model, tok, q, max_new=GEN_MAX_TOKS, until=GEN_UNTIL)
        gen.append({"q": q, "a": ref if i % 2 == 0 else "zz"})
    _write_task(d, GEN_TASK, "output_type: generate_until\nvalidation_split: validation\n"
                "doc_to_text: '{{q}}'\ndoc_to_target: a\n"
                f"generation_kwargs:\n  until: {json.dumps(GEN_UNTIL)}\n  max_gen_toks: {GEN_MAX_TOKS}\n"
                "  do_sample: false\nmetric_list:\n  - metric: exact_match\n",
                {"validation": gen})

    ppl = [{"text": " ".join(word(rng.randint(2, 6)) for _ in range(rng.randint(2, 5)))} for _ in range(6)]
    _write_task(d, PPL_TASK, "output_type: loglikelihood_rolling\nvalidation_split: validation\n"
                "doc_to_text: ''\ndoc_to_target: text\nmetric_list:\n  - metric: word_perplexity\n",
                {"validation": ppl})
    _write_task(d, "dfst_empty", "output_type: multiple_choice\nvalidation_split: validation\n"
                "doc_to_text: '{{question}}'\ndoc_to_choice: choices\ndoc_to_target: label\n",
                {"validation": []})
    return d
