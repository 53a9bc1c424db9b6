"""Vocabulary, tokenizer and synthetic tasks of the toy zoo.

Two surface languages share one number system: language E writes digits ``0``–``9``, language B writes them
``a``–``j`` (B digit k is ``chr(ord('a') + k)``). ``+`` and ``-`` are shared (an operator no model has seen
would make the combined task impossible). Every symbol is one token.

A sample is a prompt and an answer; the model sees ``<s> prompt answer </s>`` and is scored on ``answer </s>``.

- Generic tasks (3–6 digits): ``C`` copy, ``R`` reverse, ``S`` sort ascending, ``N`` successor (each digit + 1
  mod 10). Prompt ``C4071=`` -> answer ``4071``.
- Math: ``M`` then two-digit ``a`` and ``b`` with ``+`` or ``-``, result ``(a ± b) mod 100``; every number is
  written least-significant digit first (so carries flow left to right). ``34 + 57 = 91`` is ``M43+75=`` -> ``19``.
  The 20,000 problems are split once (test 2,000 / validation 600 / train 17,400), the same split in every
  language.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
GENERIC_OPS = ("C", "R", "S", "N")
MATH_MARK = "M"
SEP = "="
E_DIGITS = tuple("0123456789")
B_DIGITS = tuple("abcdefghij")
VOCAB: tuple[str, ...] = SPECIALS + GENERIC_OPS + (MATH_MARK, SEP, "+", "-") + E_DIGITS + B_DIGITS
TOKEN_ID: dict[str, int] = {t: i for i, t in enumerate(VOCAB)}
B_TOKEN_IDS: tuple[int, ...] = tuple(TOKEN_ID[d] for d in B_DIGITS)

MATH_SPLIT_SIZES = {"test": 2000, "validation": 600}  # the rest (17,400) is train


def save_tokenizer(out_dir: str | Path) -> None:
    """Save the zoo's ``tokenizers`` tokenizer (one token per symbol, ``<s>`` prepended) to ``out_dir``.

    ``AutoTokenizer.from_pretrained(out_dir)`` loads it; ``tokenizer(prompt).input_ids`` equals :func:`encode`
    of ``prompt`` with ``<s>`` in front, and decoding concatenates symbols with no spaces.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(TOKEN_ID), unk_token=UNK))
    tok.add_special_tokens(list(SPECIALS))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, TOKEN_ID[BOS])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   unk_token=UNK, model_max_length=64)
    fast.save_pretrained(str(out_dir))


def encode(text: str) -> list[int]:
    """Token ids of ``text`` without specials (the tokenizer's pre-tokenization: one id per character)."""
    return [TOKEN_ID[c] for c in text]


def to_lang(digits: str, lang: str, rng: np.random.Generator | None = None) -> str:
    """Write E digits ``digits`` in ``lang``: ``E``, ``B`` or ``X`` (code-switched: each digit B w.p. 0.5)."""
    if lang == "E":
        return digits
    if lang == "B":
        return "".join(B_DIGITS[int(c)] for c in digits)
    if lang == "X":
        flips = rng.random(len(digits)) < 0.5
        return "".join(B_DIGITS[int(c)] if f else c for c, f in zip(digits, flips, strict=True))
    raise ValueError(f"lang={lang!r}; use 'E', 'B' or 'X'")


def generic_answer(op: str, digits: str) -> str:
    """Answer of generic task ``op`` on E digits."""
    if op == "C":
        return digits
    if op == "R":
        return digits[::-1]
    if op == "S":
        return "".join(sorted(digits))
    if op == "N":
        return "".join(str((int(c) + 1) % 10) for c in digits)
    raise ValueError(f"op={op!r}; use one of {GENERIC_OPS}")


def math_problem(index: int) -> tuple[str, str]:
    """Problem ``index`` in [0, 20000) as (prompt digits, answer digits), all E, LSD first."""
    a, rest = divmod(index, 200)
    b, sub = divmod(rest, 2)
    op = "-" if sub else "+"
    result = (a - b) % 100 if sub else (a + b) % 100
    lsd = lambda n: f"{n:02d}"[::-1]  # noqa: E731
    return f"{lsd(a)}{op}{lsd(b)}", lsd(result)


def math_splits(seed: int) -> dict[str, np.ndarray]:
    """The fixed partition of the 20,000 math problems into test / validation / train indices."""
    perm = np.random.default_rng([seed, 7]).permutation(20000)
    n_test, n_val = MATH_SPLIT_SIZES["test"], MATH_SPLIT_SIZES["validation"]
    # shuffled order, so that lm-eval's ``limit`` takes a random subset
    return {"test": perm[:n_test], "validation": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}


@dataclass(frozen=True, slots=True)
class Sample:
    prompt: str
    answer: str


def math_sample(index: int, q_lang: str, a_lang: str) -> Sample:
    """Math problem ``index`` asked in ``q_lang`` and answered in ``a_lang``."""
    q, a = math_problem(index)
    if q_lang == "B":
        q = "".join(B_DIGITS[int(c)] if c.isdigit() else c for c in q)
    return Sample(f"{MATH_MARK}{q}{SEP}", to_lang(a, a_lang))


def generic_sample(rng: np.random.Generator, in_lang: str, out_lang: str) -> tuple[Sample, tuple[str, str]]:
    """One random generic sample; also returns its language-free key (op, E digits) for held-out checks."""
    op = GENERIC_OPS[int(rng.integers(len(GENERIC_OPS)))]
    n = int(rng.integers(3, 7))
    digits = "".join(str(int(d)) for d in rng.integers(0, 10, size=n))
    sample = Sample(f"{op}{to_lang(digits, in_lang, rng)}{SEP}", to_lang(generic_answer(op, digits), out_lang))
    return sample, (op, digits)


# --- evaluation tasks ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One evaluation task: math (``kind='math'``) or generic (``kind='generic'``) in given languages."""

    name: str
    kind: str
    q_lang: str
    a_lang: str
    skill: str
    combined: bool
    description: str


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("zoo_math_e", "math", "E", "E", "math", False, "two-digit a±b mod 100 asked and answered in E"),
    TaskSpec("zoo_lang_b", "generic", "B", "B", "language", False,
             "generic tasks (copy, reverse, sort, successor) asked and answered in B: the language expert's skill"),
    TaskSpec("zoo_math_b", "math", "B", "E", "math+language", True,
             "the combined task: math asked in B digits, answered in E digits (the paper's Japanese math)"),
    TaskSpec("zoo_math_bb", "math", "B", "B", "math+language-out", False,
             "math asked and answered in B (no source was ever taught to answer math in B)"),
    TaskSpec("zoo_generic_e", "generic", "E", "E", "generic", False, "generic tasks in E: the base's skill"),
    TaskSpec("zoo_read_b", "generic", "B", "E", "reading-b", False,
             "generic tasks asked in B, answered in E: reading B without writing it"),
)}
COMBINED_TASK = "zoo_math_b"


def generic_heldout(seed: int, sizes: dict[str, int]) -> dict[str, list[tuple[str, str]]]:
    """Held-out generic (op, E digits) keys per split, distinct across splits; never used in training."""
    rng = np.random.default_rng([seed, 11])
    seen: set[tuple[str, str]] = set()
    out: dict[str, list[tuple[str, str]]] = {}
    for split in ("test", "validation", "train"):
        keys: list[tuple[str, str]] = []
        while len(keys) < sizes[split]:
            _, key = generic_sample(rng, "E", "E")
            if key not in seen:
                seen.add(key)
                keys.append(key)
        out[split] = keys
    return out


def task_samples(spec: TaskSpec, math_idx: dict[str, np.ndarray],
                 generic_keys: dict[str, list[tuple[str, str]]]) -> dict[str, list[Sample]]:
    """Samples of ``spec`` per split. Generic tasks share one key set; B inputs are written fully in B."""
    out: dict[str, list[Sample]] = {}
    for split in ("train", "validation", "test"):
        if spec.kind == "math":
            out[split] = [math_sample(int(i), spec.q_lang, spec.a_lang) for i in math_idx[split]]
        else:
            out[split] = [Sample(f"{op}{to_lang(d, spec.q_lang)}{SEP}",
                                 to_lang(generic_answer(op, d), spec.a_lang)) for op, d in generic_keys[split]]
    return out


def write_jsonl(path: Path, samples: list[Sample]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps({"prompt": s.prompt, "answer": s.answer}) + "\n")


def read_jsonl(path: str | Path) -> list[Sample]:
    """Samples of a zoo JSONL file."""
    with open(path, encoding="utf-8") as f:
        return [Sample(**json.loads(line)) for line in f if line.strip()]


def task_yaml(spec: TaskSpec, data_files: dict[str, Path], *, max_gen_toks: int = 8) -> str:
    """lm-eval task YAML of ``spec`` over local JSONL ``data_files`` (absolute paths), greedy exact match."""
    files = "\n".join(f"    {split}: {json.dumps(str(data_files[split]))}" for split in ("train", "validation", "test"))
    return f"""# dfsmerge toy zoo task: {spec.description}
task: {spec.name}
dataset_path: json
dataset_kwargs:
  data_files:
{files}
output_type: generate_until
training_split: train
validation_split: validation
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
fewshot_delimiter: ""
generation_kwargs:
  until: ["{EOS}"]
  do_sample: false
  max_gen_toks: {max_gen_toks}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
num_fewshot: 0
metadata:
  version: 1.0
"""


# --- training mixtures ----------------------------------------------------------------------------------------


def training_stream(mixture: str, rng: np.random.Generator, math_train: np.ndarray,
                    heldout: set[tuple[str, str]]) -> Iterator[Sample]:
    """Endless training samples of one mixture (see ``train.PHASES``); held-out generic keys are skipped."""

    def generic(in_lang: str, out_lang: str) -> Sample:
        while True:
            sample, key = generic_sample(rng, in_lang, out_lang)
            if key not in heldout:
                return sample

    while True:
        u = rng.random()
        if mixture == "base":  # generic tasks in E only
            yield generic("E", "E")
        elif mixture == "math":  # 90% math in E, 10% generic E replay
            if u < 0.9:
                yield math_sample(int(math_train[rng.integers(len(math_train))]), "E", "E")
            else:
                yield generic("E", "E")
        elif mixture == "lang1":  # answers in E; inputs 40% B, 40% code-switched, 20% E
            yield generic("B" if u < 0.4 else "X" if u < 0.8 else "E", "E")
        elif mixture == "lang2":  # 60% B-in/B-out, 40% E-in/E-out
            yield generic("B", "B") if u < 0.6 else generic("E", "E")
        else:
            raise ValueError(f"mixture={mixture!r}; use base, math, lang1 or lang2")
