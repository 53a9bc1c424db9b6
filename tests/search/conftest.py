"""Fixtures of the search tests: three tiny Llama checkpoints (a base and two perturbed fine-tunes, 2 layers) and a
config builder. Objectives are cheap: cost objectives (need the pool, no forward pass) and synthetic ones."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from dfsmerge.zoo.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("search_models")
    base = make_tiny_checkpoint("llama", root / "base", seed=0, num_layers=2, hidden=16)
    return {"base": base,
            "m1": make_tiny_checkpoint("llama", root / "m1", seed=1, like=base, delta_std=0.2),
            "m2": make_tiny_checkpoint("llama", root / "m2", seed=2, like=base, delta_std=0.2)}


@pytest.fixture
def make_config(tiny_models):
    """``make_config(mode, optimizer, objectives=..., **top_level)`` -> config dict over the tiny models."""

    def make(mode: str = "ps", optimizer: str = "cma", *, objectives=None, popsize: int = 4, max_evals: int = 8,
             dfs: dict | None = None, **extra):
        genome = {"mode": mode, "models": [str(tiny_models["m1"]), str(tiny_models["m2"])],
                  "base_model": str(tiny_models["base"]), "layer_granularity": 1,
                  "dfs": dfs or {"repetitions": 2}}
        objectives = objectives or [{"type": "cost", "name": "hops"},
                                    {"type": "synthetic", "name": "sphere", "weight": 0.5}]
        return {"genome": genome, "objectives": objectives, "optimizer": {"name": optimizer, "popsize": popsize},
                "budget": {"max_evals": max_evals}, **extra}

    return make


def read_evals(run: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(run) / "evals.jsonl").read_text().splitlines()]


VOLATILE = {"time", "timings", "cost"}  # cost is measured work (a fresh process starts with an empty prefix
# store), not a result


def strip_volatile(rec: dict) -> dict:
    """An evals.jsonl record without what differs between two equal runs (wall times, measured cost)."""
    return {k: v for k, v in rec.items() if k not in VOLATILE}


def stable_evals(run: Path) -> list[dict]:
    """``run``'s records as two equal runs write them alike (:func:`strip_volatile`)."""
    return [strip_volatile(r) for r in read_evals(run)]


MC_TASK = "dfss_mc"


@pytest.fixture(scope="session")
def mc_task_dir(tmp_path_factory) -> Path:
    """One small multiple-choice lm-eval task over local JSONL (validation split only) in the tiny vocabulary."""
    import json
    import random

    d = tmp_path_factory.mktemp("search_tasks")
    rng = random.Random(0)

    def word(n):
        return "".join(rng.choice("abcdefghij") for _ in range(n))

    docs = [{"question": f"q: {word(rng.randint(3, 8))} is", "choices": [word(rng.randint(1, 3)) for _ in range(3)],
             "label": rng.randrange(3)} for _ in range(10)]
    data = d / f"{MC_TASK}_validation.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in docs))
    (d / f"{MC_TASK}.yaml").write_text(
        f"task: {MC_TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {data}\n"
        "output_type: multiple_choice\nvalidation_split: validation\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: choices\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    return d
