"""The paper's table on real weights: SmolLM2 experts, multilingual math, unsearched merges, Layer Swapping and
the four searches (PS, DFS, staged, joint), every row on the test split.

    python benchmarks/real_experts.py                       # everything (experts reused once built)
    python benchmarks/real_experts.py --stages sources      # just the experts' and the base's rows
    python benchmarks/real_experts.py --seeds 0 --modes ps  # one search

Steps (each reuses what an earlier invocation finished; results under --out, models and runs under --work):

1. ``dfsmerge zoo build --real SET``: data, tasks and the two experts (dfsmerge.zoo.experts).
2. sources: the base and both experts.
3. baselines: task arithmetic, TIES and DARE-TIES at their usual defaults (configs/real/experts/recipes/).
4. layer swap: split points chosen on the validation split by the searches' own fitness (a grid of ten; greedy
   generation on a few validation documents cannot tell them apart: the math expert writes 0.6% of French answers
   right), the chosen recipe written to --out/layer_swap.yaml and scored on test.
5. searches: ``dfsmerge search configs/real/experts/MODE.yaml --seed S`` (resumable), the best exported.

Scores: English math and target-language math (the combined task) by greedy generation through lm-eval (our
adapter), exact match of the number after ``####``, ``max_gen_toks`` 400; a response is counted *truncated* when it
has no ``####`` line and filled the generation budget. The target-language reading task and the search's fitness
(each calculator step of the gold worked answer, teacher-forced, greedy-correct: ``mgsm_L_steps``) by
the native scorer. Paired tests (exact McNemar) of the best searched model
against the best source and against Layer Swapping, on the combined task's test documents.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
CONFIGS = ROOT / "configs" / "real" / "experts"
MODES = ("ps", "dfs", "dfs-mathfirst", "staged", "joint")  # configs/real/experts/<mode>.yaml
SWAP_GRID = ((1, 1, 0), (2, 1, 0), (2, 2, 1), (4, 2, 0), (4, 2, 1), (6, 3, 0), (6, 3, 1), (6, 3, 2), (8, 4, 2),
             (10, 4, 2))  # (bottom, top, transition) of 30 layers; the paper's best sit near 4-7 / 2-3 / 1-2 of 32


def _log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def _run(cmd: list[str]) -> None:
    _log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _set_refs(text: str, name: str) -> str:
    return text.replace("real:smollm2-fra/", f"real:{name}/")


def score(model_dir: str, tasks_dir: Path, target: str, *, split: str, limit: int | None, batch_size: int,
          dtype: str = "bfloat16", english: bool = True) -> dict:
    """Per-document results of one model: generation tasks through lm-eval with their raw responses, the rest
    native. ``{task: {"score": mean, "docs": [value...], "truncated": [bool...], "heldout": [bool...]}}``."""
    import torch

    from dfsmerge.objectives import evaluate_model
    from dfsmerge.objectives.lm_adapter import DfsLM
    from dfsmerge.objectives.tasks import simple_evaluate
    from dfsmerge.runtime.loading import load_model_or_plan
    from dfsmerge.zoo.mgsm import MAX_GEN_TOKS

    model, tok = load_model_or_plan(model_dir, dtype=getattr(torch, dtype))
    out: dict[str, dict] = {}
    # generation: our adapter with finished rows dropped from the batch (the same responses, half the time)
    gen = (["mgsm_eng"] if english else []) + [f"mgsm_{target}"] if split == "test" else [f"mgsm_{target}"]
    paths = [str(tasks_dir)] if split == "test" else [str(_validation_tasks(tasks_dir, gen))]
    lm = DfsLM(model, tok, batch_size=batch_size, max_gen_toks=MAX_GEN_TOKS, compact_batches=True)
    names = gen if split == "test" else [f"{t}_val" for t in gen]
    res = simple_evaluate(lm, names, task_paths=paths, limit=limit, log_samples=True)
    for t, name in zip(gen, names, strict=True):
        samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
        docs = [float(s["exact_match"]) for s in samples]
        raw = [s["resps"][0][0] if isinstance(s["resps"][0], list) else s["resps"][0] for s in samples]
        trunc = [("####" not in r) and len(tok(r, add_special_tokens=False)["input_ids"]) >= MAX_GEN_TOKS - 2
                 for r in raw]
        out[t] = {"score": sum(docs) / len(docs), "docs": docs, "truncated": trunc,
                  "heldout": [bool(s["doc"]["heldout"]) for s in samples]}
    if split != "test":
        return out
    rest = [f"lang_{target}", f"mgsm_{target}_steps", "mgsm_eng_steps"]
    r = evaluate_model(model, tok, rest, task_paths=[str(tasks_dir)], split=split, limit=limit, native=True,
                       per_document=True, batch_size=batch_size)
    for t in rest:
        docs = r["per_document"][t]
        out[t] = {"score": sum(docs) / len(docs), "docs": docs}
    return out


def _validation_tasks(tasks_dir: Path, names: list[str]) -> Path:
    """``NAME_val`` copies of generation tasks that read the validation data as their default (test) split."""
    d = tasks_dir.parent / "tasks_val"
    d.mkdir(exist_ok=True)
    for name in names:
        text = (tasks_dir / f"{name}.yaml").read_text().replace(f"task: {name}\n", f"task: {name}_val\n")
        text = text.replace(f"{name}_test.jsonl", f"{name}_validation.jsonl")
        (d / f"{name}_val.yaml").write_text(text)
    return d


def cached_score(name: str, model_dir: str, args, tasks_dir: Path, *, split: str = "test",
                 limit: int | None = None, english: bool | None = None) -> dict | None:
    """``english``: score English math too (default ``--no-english`` decides; the sources always do). None: not
    scored yet under ``--table-only``."""
    path = Path(args.out) / "scores" / f"{name}.{split}{'' if limit is None else f'.limit{limit}'}.json"
    if path.is_file():
        return json.loads(path.read_text())
    if args.table_only:
        _log(f"{name}: not scored yet ({path.name}); left out of the table (run without --table-only)")
        return None
    t0 = time.time()
    res = score(model_dir, tasks_dir, args.target, split=split, limit=limit, batch_size=args.batch_size,
                dtype=args.dtype, english=args.english if english is None else english)
    res["_seconds"] = round(time.time() - t0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res))
    _log(f"{name} ({split}): " + ", ".join(f"{t} {v['score']:.3f}" for t, v in res.items() if t[0] != "_")
         + f" in {res['_seconds']:.0f} s")
    return res


def fitness(name: str, model_dir: str, args, tasks_dir: Path) -> float | None:
    """The searches' fitness of one model: ``mgsm_TARGET_steps`` on the validation split, ``--fitness-limit`` rows,
    native, in ``--dtype`` (cached in --out/scores/NAME.fitness.json; None: not scored yet under ``--table-only``)."""
    path = Path(args.out) / "scores" / f"{name}.fitness.limit{args.fitness_limit}.{args.dtype}.json"
    if path.is_file():
        return json.loads(path.read_text())["score"]
    if args.table_only:
        _log(f"{name}: no fitness yet ({path.name}); run without --table-only")
        return None
    import torch

    from dfsmerge.objectives import evaluate_model
    from dfsmerge.runtime.loading import load_model_or_plan

    t0 = time.time()
    model, tok = load_model_or_plan(model_dir, dtype=getattr(torch, args.dtype))
    task = f"mgsm_{args.target}_steps"
    r = evaluate_model(model, tok, [task], task_paths=[str(tasks_dir)], split="validation", limit=args.fitness_limit,
                       native=True, per_document=True, batch_size=args.batch_size)
    docs = r["per_document"][task]
    res = {"score": sum(docs) / len(docs), "docs": docs, "_seconds": round(time.time() - t0, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res))
    _log(f"{name}: fitness {100 * res['score']:.1f} in {res['_seconds']:.0f} s")
    return res["score"]


def merged(name: str, recipe_text: str, work: Path) -> str:
    import yaml

    from dfsmerge.recipe.config import load_merge_config
    from dfsmerge.recipe.executor import run_merge

    out = work / "models" / name
    if not (out / "config.json").is_file():
        run_merge(load_merge_config(yaml.safe_load(recipe_text)), out, force=True)
    return str(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--set", default="smollm2-fra", help="expert set (dfsmerge.zoo.experts.EXPERT_SETS; tiny: a "
                   "few-step set, to try this script)")
    p.add_argument("--stages", default="sources,baselines,swap,search,rank",
                   help="comma-separated: language (the math expert per language, on validation), sources, "
                        "baselines, swap, search, rank (how the fitness ranks a search's candidates against greedy "
                        "generation)")
    p.add_argument("--rank-run", default="joint-s0", help="the search run (under --work) the rank stage reads")
    p.add_argument("--rank-candidates", type=int, default=8, help="candidates of --rank-run the rank stage scores")
    p.add_argument("--rank-limit", type=int, default=48, help="validation documents per candidate (rank stage)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--max-evals", type=int, default=None, help="override the search configs' budget.max_evals "
                   "(a finished or paused run continues to it with --resume)")
    p.add_argument("--record", action="store_true", help="searches keep every candidate's per-document fitness "
                   "(RUN/subset/responses.jsonl, all documents scored) for benchmarks/subset_fitness.py --real-run; "
                   "not in staged mode")
    p.add_argument("--fitness-limit", type=int, default=96, help="validation rows of the fitness (as the search "
                   "configs' limit) on which the layer-swap split points are chosen")
    p.add_argument("--swap-limit", type=int, default=40, help="validation documents per language (language stage)")
    p.add_argument("--limit", type=int, default=None, help="test documents per task (default: all)")
    p.add_argument("--no-english", dest="english", action="store_false", help="merged models: leave English math "
                   "(greedy generation, half of a row's time) unscored; the sources always have it")
    p.add_argument("--table-only", action="store_true", help="remake the table from the cached scores: no search, "
                   "no scoring; a row not scored yet is left out (with a line saying so)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16", help="scoring dtype (bfloat16: what eval_dtype auto picks for "
                   "SmolLM2 on a CPU with native bf16; float32 is 1.5x slower)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "real_experts"))
    p.add_argument("--work", default=str(ROOT / "runs" / "real_experts"))
    args = p.parse_args()
    import torch

    from dfsmerge.zoo.experts import EXPERT_SETS, build_experts, tiny_set
    from dfsmerge.zoo.layer_swap import LayerSwap, layer_swap_recipe

    torch.set_num_threads(args.threads)
    stages = set(args.stages.split(","))
    spec = tiny_set() if args.set == "tiny" else EXPERT_SETS[args.set]  # tiny: a smoke run of this script
    args.target = spec.target
    work, out = Path(args.work), Path(args.out)
    t0 = time.time()
    roles = ("math",) if stages <= {"language"} else ("math", "lang")  # the language choice needs math alone
    root = build_experts(spec, roles=roles, threads=args.threads, log=print)
    _log(f"experts ready in {time.time() - t0:.0f} s: {root}")
    tasks_dir = root / "tasks"
    rows: dict[str, dict] = {}
    timing: dict[str, float] = {}
    sources = {"base": _resolve(spec.base),
               "math expert": str(root / "math"), "language expert": str(root / "lang")}
    if "language" in stages:  # the measurement behind the target language: the math expert's skill per language
        from dfsmerge.objectives import evaluate_model
        from dfsmerge.runtime.loading import load_model_or_plan

        model, tok = load_model_or_plan(str(root / "math"))
        lines = ["| language | math expert, validation exact match (%) |", "|---|---|"]
        for lang in spec.split.languages:
            r = evaluate_model(model, tok, [f"mgsm_{lang}"], task_paths=[str(tasks_dir)], split="validation",
                               limit=args.swap_limit, batch_size=args.batch_size)
            v = next(iter(r["results"][f"mgsm_{lang}"].values()))
            lines.append(f"| {lang} | {100 * v:.1f} |")
            _log(lines[-1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "language_choice.md").write_text(
            f"# The target language: the math expert's greedy worked answers, {args.swap_limit} validation documents "
            f"per language ({args.dtype})\n\n" + "\n".join(lines) + "\n")
    if "sources" in stages:
        for name, d in sources.items():
            rows[name] = cached_score(name.replace(" ", "_"), d, args, tasks_dir, limit=args.limit, english=True)
    if "baselines" in stages:
        for name in ("task_arithmetic", "ties", "dare_ties"):
            d = "" if args.table_only else merged(
                name, _set_refs((CONFIGS / "recipes" / f"{name}.yaml").read_text(), spec.name), work)
            rows[name.replace("_", " ")] = cached_score(name, d, args, tasks_dir, limit=args.limit)
    if "swap" in stages:
        import yaml

        lines = [f"| bottom / top / transition (of 30) | fitness: {args.target} steps, validation |", "|---|---|"]
        for name, d in sources.items():  # the sources' fitness, the bar the grid is read against
            v = fitness(name.replace(" ", "_"), d, args, tasks_dir)
            lines.append(f"| {name} (source) | {'-' if v is None else f'{100 * v:.1f}'} |")
        best = None
        for b, t, tr in SWAP_GRID:
            swap = LayerSwap(30, b, t, tr)
            recipe = layer_swap_recipe(swap, math=str(root / "math"), lang=str(root / "lang"))
            d = "" if args.table_only else merged(f"swap_{b}_{t}_{tr}", yaml.safe_dump(recipe), work)
            val = fitness(f"swap_{b}_{t}_{tr}", d, args, tasks_dir)
            if val is None:
                continue
            lines.append(f"| {b} / {t} / {tr} | {100 * val:.1f} |")
            if best is None or val > best[0]:
                best = (val, swap, d)
        if best is not None:
            val, swap, d = best
    if "swap" in stages and best is not None and not args.table_only:
        (out / "layer_swap_grid.md").write_text(
            f"# Layer Swapping split points, chosen on the search's fitness (validation, {args.fitness_limit} rows of "
            f"mgsm_{args.target}_steps, {args.dtype})\n\n" + "\n".join(lines) + "\n")
        (out / "layer_swap.yaml").write_text(
            f"# chosen on validation (the search's fitness, {args.fitness_limit} rows of mgsm_{args.target}_steps: "
            f"{100 * val:.1f}) among {SWAP_GRID}: bottom {swap.bottom}, top {swap.top}, transition {swap.transition}\n"
            + yaml.safe_dump(layer_swap_recipe(swap, math=f"real:{spec.name}/math", lang=f"real:{spec.name}/lang"),
                             sort_keys=False, default_flow_style=None))
    if "swap" in stages and best is not None:
        rows[f"layer swap ({swap.bottom}/{swap.top}/{swap.transition})"] = cached_score(
            "layer_swap", d, args, tasks_dir, limit=args.limit)
    if "search" in stages:
        for mode in args.modes.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                if args.table_only:  # its cached test score, or nothing
                    r = cached_score(f"{mode}-s{seed}", "", args, tasks_dir, limit=args.limit)
                    if r is not None:
                        rows[f"{mode} search (seed {seed})"] = r
                    continue
                run = work / f"{mode}-s{seed}"
                cfg = work / f"{mode}.yaml"
                cfg.parent.mkdir(parents=True, exist_ok=True)
                text = _set_refs((CONFIGS / f"{mode}.yaml").read_text(), spec.name)
                if args.record and mode != "staged":
                    import yaml
                    from subset_fitness import RECORD, with_subset

                    text = yaml.safe_dump(with_subset(yaml.safe_load(text), RECORD), sort_keys=False)
                cfg.write_text(text)
                t1 = time.time()
                resume = ["--resume"] if (run / "evals.jsonl").is_file() else []
                budget = ["--max-evals", str(args.max_evals)] if args.max_evals else []
                want = args.max_evals or yaml_budget(cfg)
                done = (run / "evals.jsonl").read_text().count("\n") if resume else 0
                if not (resume and (run / "best" / "best.json").is_file() and want and done >= want):
                    _run(["dfsmerge", "search", str(cfg), "--out", str(run), "--seed", str(seed), "--quiet", *resume,
                          *budget])
                    timing[f"{mode}-s{seed}"] = round(time.time() - t1, 1)  # a finished run is not timed again
                model = work / "models" / f"{mode}-s{seed}"
                if not (model / "config.json").is_file():
                    _run(["dfsmerge", "export", str(run), "--candidate", "best", "--out", str(model), "--force"])
                rows[f"{mode} search (seed {seed})"] = cached_score(f"{mode}-s{seed}", str(model), args, tasks_dir,
                                                                     limit=args.limit)
    if "rank" in stages:
        rank_candidates(work / args.rank_run, args, tasks_dir, work, out)
    write_table({k: v for k, v in rows.items() if v is not None}, timing, args, out)
    return 0


def rank_candidates(run: Path, args, tasks_dir: Path, work: Path, out: Path) -> None:
    """The fitness against the paper's metric over one search's candidates: ``--rank-candidates`` scored candidates
    spread evenly over the run's fitness order (best and worst included), each exported and scored on the combined
    task's validation split by greedy generation (``--rank-limit`` documents) and by the fitness task; Spearman's
    rho between the two (scipy) goes to ``rank.md``."""
    from scipy.stats import spearmanr

    from dfsmerge.rundir.reader import open_run

    recs = sorted((r for r in open_run(run).candidates if r.ok and not r.cached), key=lambda r: r.fitness)
    if len(recs) < 3:
        _log(f"rank: {run} has {len(recs)} scored candidates; run its search first")
        return
    k = min(args.rank_candidates, len(recs))
    picks = sorted({round(i * (len(recs) - 1) / (k - 1)) for i in range(k)})
    lines = ["| candidate | fitness (search, validation) | greedy exact match (validation) |", "|---|---|---|"]
    fit, gen = [], []
    for i in picks:
        r = recs[i]
        model = work / "models" / f"{run.name}-c{r.id}"
        if not (model / "config.json").is_file():
            _run(["dfsmerge", "export", str(run), "--candidate", str(r.id), "--out", str(model), "--force"])
        v = cached_score(f"{run.name}-c{r.id}", str(model), args, tasks_dir, split="validation", limit=args.rank_limit)
        fitness = next(iter(r.objectives.values()))
        fit.append(fitness)
        gen.append(v[f"mgsm_{args.target}"]["score"])
        lines.append(f"| {r.id} | {100 * fitness:.1f} | {100 * gen[-1]:.1f} |")
    rho = spearmanr(fit, gen)
    text = "\n".join([f"# Fitness vs greedy generation over {len(picks)} candidates of {run.name}", "", *lines, "",
                      f"Spearman rho = {rho.statistic:.2f} (p = {rho.pvalue:.3f})"]) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "rank.md").write_text(text)
    print(text)


def yaml_budget(cfg: Path) -> int | None:
    """A search config's ``budget.max_evals`` (None when it has none)."""
    import yaml

    return (yaml.safe_load(cfg.read_text()).get("budget") or {}).get("max_evals")


def _resolve(ref: str) -> str:
    from dfsmerge.io.reader import resolve_model_path

    return str(resolve_model_path(ref))


def write_table(rows: dict[str, dict], timing: dict[str, float], args, out: Path) -> None:
    from dfsmerge.report.significance import paired_test

    t = args.target
    comb = f"mgsm_{t}"
    lines = [f"| model | English math | {t} math (combined) | held-out templates / seen | truncated | "
             f"{t} reading | fitness: {t} / English steps (test) |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        c = r[comb]
        held = [v for v, h in zip(c["docs"], c["heldout"], strict=True) if h]
        seen = [v for v, h in zip(c["docs"], c["heldout"], strict=True) if not h]
        trunc = sum(c["truncated"]) / len(c["truncated"])
        eng = f"{100 * r['mgsm_eng']['score']:.1f}" if "mgsm_eng" in r else "not scored"
        lines.append(f"| {name} | {eng} | {100 * c['score']:.1f} | "
                     f"{100 * sum(held) / max(1, len(held)):.1f} / {100 * sum(seen) / max(1, len(seen)):.1f} | "
                     f"{100 * trunc:.1f}% | {100 * r[f'lang_{t}']['score']:.1f} | "
                     f"{100 * r[f'mgsm_{t}_steps']['score']:.1f} / {100 * r['mgsm_eng_steps']['score']:.1f} |")
    searched = {k: v for k, v in rows.items() if "search" in k}
    srcs = {k: v for k, v in rows.items() if k in ("base", "math expert", "language expert")}
    notes = []
    if searched and srcs:
        best_s = max(searched, key=lambda k: searched[k][comb]["score"])
        best_src = max(srcs, key=lambda k: srcs[k][comb]["score"])
        for other in [best_src, *(k for k in rows if k.startswith("layer swap"))]:
            pt = paired_test(searched[best_s][comb]["docs"], rows[other][comb]["docs"])
            notes.append(f"- {best_s} vs {other} on {comb} test: {pt.describe()}")
    text = "\n".join([f"# Real experts ({args.set}), test split", "", *lines, "", *notes, "",
                      "Search wall times (s): " + json.dumps(timing)]) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    (out / "table.json").write_text(json.dumps({k: {t2: v2["score"] for t2, v2 in v.items() if t2[0] != "_"}
                                                for k, v in rows.items()}, indent=1))
    print(text)


if __name__ == "__main__":
    sys.exit(main())
