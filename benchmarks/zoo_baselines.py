"""Exact match of every toy-zoo source and of unsearched merges, on the test split (the rows of issue 8's table
that need no search).

    python benchmarks/zoo_baselines.py                      # default zoo, seed 0 (built if missing)
    python benchmarks/zoo_baselines.py --zoo DIR --seed 1 --lm-eval-check 200

Merges are written inline in plain torch (mergekit semantics, mergekit 0.1.5 defaults):
- task arithmetic (Ilharco et al. 2023, arXiv 2212.04089): base + sum of deltas, unit weights;
- TIES (Yadav et al. 2023, arXiv 2306.01708): per-tensor top-50% magnitude trim, sign election by the sum of the
  trimmed deltas, mean of the agreeing deltas (normalize), unit weights;
- DARE-TIES (Yu et al. 2024, arXiv 2311.03099): random keep with p = 0.5, L1-norm rescale, TIES sign election,
  sum of agreeing deltas (no normalize), unit weights; fixed generator seed;
- a hand hybrid: the math expert with the language expert's input embedding (what reads B).
Scores are teacher-forced exact match (equal to greedy exact match); ``--lm-eval-check N`` also scores the experts
through ``lm_eval.simple_evaluate`` on the first N test documents and prints both.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dfsmerge.zoo import build_zoo, default_zoo_dir
from dfsmerge.zoo.tasks import read_jsonl
from dfsmerge.zoo.train import exact_match


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def task_arithmetic(base, experts):
    return {k: base[k] + sum(e[k] - base[k] for e in experts) for k in base}


def _ties_like(base, experts, sparsify, normalize: bool):
    out = {}
    for k, b in base.items():
        deltas = torch.stack([sparsify(e[k] - b) for e in experts])  # (K, *shape)
        elected = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)  # sign election by total mass
        agree = deltas.sign() == elected  # (K, *shape)
        mixed = (deltas * agree).sum(0)
        if normalize:
            mixed = mixed / agree.sum(0).clamp(min=1)  # unit weights: mean over agreeing models
        out[k] = b + mixed
    return out


def _magnitude(density: float):
    def trim(delta: torch.Tensor) -> torch.Tensor:
        k = max(1, int(density * delta.numel()))
        mask = torch.zeros(delta.numel())
        mask[torch.argsort(delta.abs().reshape(-1), descending=True)[:k]] = 1.0
        return delta * mask.reshape(delta.shape)
    return trim


def _dare(density: float, gen: torch.Generator):
    def drop(delta: torch.Tensor) -> torch.Tensor:
        kept = delta * torch.bernoulli(torch.full(delta.shape, density), generator=gen)
        before, after = delta.abs().sum(), kept.abs().sum()
        return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)  # L1 rescale
    return drop


def ties(base, experts, density=0.5):
    return _ties_like(base, experts, _magnitude(density), normalize=True)


def dare_ties(base, experts, density=0.5, seed=0):
    return _ties_like(base, experts, _dare(density, torch.Generator().manual_seed(seed)), normalize=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", type=Path, default=None)
    ap.add_argument("--size", default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="test")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--lm-eval-check", type=int, default=0, metavar="N")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    zoo = build_zoo(args.zoo or default_zoo_dir(args.size, args.seed), size=args.size, seed=args.seed)
    from transformers import AutoModelForCausalLM

    sd = {n: _load(zoo.model_path(n)) for n in ("base", "math", "language")}
    experts = [sd["math"], sd["language"]]
    hybrid = dict(sd["math"])
    hybrid["model.embed_tokens.weight"] = sd["language"]["model.embed_tokens.weight"]
    rows = {"base": sd["base"], "math expert": sd["math"], "language expert": sd["language"],
            "task arithmetic (weights 1)": task_arithmetic(sd["base"], experts),
            "TIES (density 0.5, weights 1)": ties(sd["base"], experts),
            "DARE-TIES (density 0.5, weights 1)": dare_ties(sd["base"], experts, seed=args.seed),
            "hand hybrid: language embedding + math blocks/head": hybrid}
    names = list(zoo.tasks)
    data = {n: read_jsonl(zoo.tasks[n].data_files[args.split]) for n in names}
    model = AutoModelForCausalLM.from_pretrained(zoo.model_path("base")).eval()

    print(f"zoo {zoo.root} (size {zoo.size}, seed {zoo.seed}); exact match % on the {args.split} split; "
          f"combined task: {zoo.combined_task}\n")
    print("| model | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    t0 = time.perf_counter()
    for label, weights in rows.items():
        model.load_state_dict(weights)
        scores = [100.0 * float(exact_match(model, data[n]).mean()) for n in names]
        print(f"| {label} | " + " | ".join(f"{s:.1f}" for s in scores) + " |")
    print(f"\nscored {len(rows)} models x {len(names)} tasks in {time.perf_counter() - t0:.1f} s")

    if args.lm_eval_check:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        tm = TaskManager(include_path=str(zoo.task_dir), include_defaults=False)
        n = args.lm_eval_check
        for mname, tasks in (("math", ["zoo_math_e", "zoo_math_b"]), ("language", ["zoo_lang_b", "zoo_math_b"])):
            lm = HFLM(pretrained=str(zoo.model_path(mname)), device="cpu", batch_size=64)
            res = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=n, task_manager=tm, random_seed=None,
                                          numpy_random_seed=None, torch_random_seed=None, bootstrap_iters=0,
                                          log_samples=True)
            for t in tasks:
                ours = exact_match(lm.model.eval(), data[t][:n])
                theirs = [s["exact_match"] for s in sorted(res["samples"][t], key=lambda s: s["doc_id"])]
                agree = sum(int(a) == int(b) for a, b in zip(ours, theirs, strict=True))
                print(f"lm-eval check {mname}/{t} (first {n} {args.split} docs): lm-eval "
                      f"{100 * res['results'][t]['exact_match,none']:.1f}%, ours {100 * ours.mean():.1f}%, "
                      f"per-sample agreement {agree}/{n}")


if __name__ == "__main__":
    main()
