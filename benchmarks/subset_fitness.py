"""Fitness from few documents against the full set (issue 26): how well ``subset`` estimates rank and match a search's
candidates, and what a search on the estimate reaches.

Parts (``--parts``):

- ``toy-corr`` / ``real-corr``: a full-set search (toy: configs/toy/<--toy-config>.yaml on zoo_math_b, validation
  split, 300 documents; real: configs/real/dfs.yaml over SmolLM2-135M, ``--real-max-evals`` candidates) that keeps
  every candidate's per-document results (``subset`` with ``fit_generations`` above the search's length: every
  generation is scored in full and recorded in RUN/subset/responses.jsonl; the optimizer sees full scores). Then,
  offline, for each method (anchor, irt, random) and size N: the subset and estimator are fitted exactly as a search
  would fit them (:func:`dfsmerge.objectives.subset.fit_subset` on the full generations before the candidate's: the
  first ``fit_generations``, and every ``refit_every``-th after), every later candidate is estimated from its results
  on the N documents (:func:`~dfsmerge.objectives.subset.estimate`), and the table gives Spearman's rank correlation
  with its full-set score over those candidates, the mean absolute error, and the documents scored per candidate
  (fitting generations included). ``random`` is the mean over ``--random-seeds`` subsets.
- ``real-search``: each finished real search of ``--real-runs`` (full-set runs with recorded responses, e.g.
  benchmarks/real_experts.py --record writes runs/real_experts/ps-s0) rerun from its own config and seed on the
  estimate (``--search-method``, N = ``--search-size``) at equal candidate count: best validation (full set, elite
  rescored), the best's score on the fitness task's test split (exported, ``dfsmerge eval --native`` in the run's
  dtype), documents per candidate (the fitting generation and elite rescoring included).
- ``toy-search``: the same toy search run on the estimate (``--search-method``, N = ``--search-size``) at equal
  candidate count, against the full-set run of ``toy-corr``: the best candidate's validation score (always a full
  score: the elite is rescored), its test score (exported, scored by ``dfsmerge eval``), documents per candidate
  (elite rescoring included).

    python benchmarks/subset_fitness.py [--parts toy-corr,toy-search,real-corr] [--seeds 0,1] [--toy-config joint]
        [--sizes 10,25,50,100] [--fit-generations 1] [--refit-every 10] [--full-below 5] [--workdir runs/subset_fitness]
        [--out benchmarks/results/subset_fitness.md] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import yaml
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_table import ROOT, dfsmerge, score, timed_search  # noqa: E402 - the toy table's CLI helpers, one home

from dfsmerge.objectives.subset import estimate, fit_subset, low_signal  # noqa: E402

RECORD = {"method": "random", "size": 1, "fit_generations": 10 ** 6}  # every generation in full, results recorded


def toy_base(name: str, seed: int, zoo: str) -> tuple[dict, Path]:
    """The toy config for search seed ``seed`` over one zoo (built once, seed 0)."""
    cfg = yaml.safe_load((ROOT / "configs/toy" / f"{name}.yaml").read_text())
    zoo = Path(os.path.expanduser(zoo))
    cfg["zoo_dir"], cfg["seed"], cfg["eval_dtype"] = str(zoo), seed, "float32"
    return cfg, zoo


def real_base(max_evals: int) -> dict:
    cfg = yaml.safe_load((ROOT / "configs/real/dfs.yaml").read_text())
    cfg["task_paths"] = [str(ROOT / "configs/real/tasks")]
    cfg["budget"] = {"max_evals": max_evals}
    return cfg


def with_subset(cfg: dict, subset: dict) -> dict:
    out = json.loads(json.dumps(cfg))
    for o in out["objectives"]:
        o["subset"] = dict(subset)
    return out


def estimate_subset(args) -> tuple[dict, str]:
    """The ``subset`` of the searches on the estimate (toy-search, real-search) and the run-name part that tells
    their settings apart (so a cached run is reused only for the same settings)."""
    sub = {"method": args.search_method, "size": args.search_size, "fit_generations": args.fit_generations,
           "refit_every": args.refit_every, "elite": args.elite, "full_below": args.full_below}
    tag = (f"{args.search_method}{args.search_size}-r{args.refit_every or 0}-fb{args.full_below or 0:g}"
           f"-e{args.elite}")
    return sub, tag


def run(cfg: dict, path: Path, env: dict) -> tuple[float, list[dict]]:
    done = path / "bench.json"
    if done.is_file():
        return json.loads(done.read_text())["wall_s"], [json.loads(x) for x in (path / "evals.jsonl").open()]
    path.parent.mkdir(parents=True, exist_ok=True)
    conf = path.parent / f"{path.name}.yaml"
    conf.write_text(yaml.safe_dump(cfg, sort_keys=False))
    wall, recs = timed_search(conf, path, env=env)
    done.write_text(json.dumps({"wall_s": wall}))
    return wall, recs


def responses(path: Path) -> list[dict]:
    return [json.loads(x) for x in (path / "subset/responses.jsonl").read_text().splitlines()]


def simulate(entries: list[dict], key: str, method: str, size: int, seed: int, fit_generations: int,
             refit_every: int | None, full_below: float | None = None) -> dict:
    """Estimate every candidate of the non-full generations as a search with this schedule would (a generation after
    one whose scores, estimated or full, are :func:`~dfsmerge.objectives.subset.low_signal` is full too)."""
    def scheduled(g):
        g0 = fit_generations - 1
        return g <= g0 or (refit_every is not None and (g - g0) % refit_every == 0)

    fits: dict[int, dict] = {}
    est, truth, n_full, last, prev = [], [], 0, None, []
    for g in sorted({e["generation"] for e in entries}):
        gen = sorted((e for e in entries if e["generation"] == g), key=lambda e: e["key"])
        rs = [np.asarray(e["responses"][key], dtype=np.float64) for e in gen]
        if scheduled(g) or (prev and low_signal(prev, size, full_below)):
            n_full += len(gen)
            last, prev = g, [float(r.mean()) for r in rs]
            continue
        if last not in fits:
            rows = sorted((x for x in entries if x["generation"] <= last), key=lambda x: x["key"])
            fits[last] = fit_subset(method, np.array([x["responses"][key] for x in rows]), size, seed)
        fit = fits[last]
        prev = [estimate(fit, r[fit["positions"]]) for r in rs]
        est.extend(prev)
        truth.extend(float(r.mean()) for r in rs)
    est, truth = np.array(est), np.array(truth)
    n_docs = len(entries[0]["responses"][key])
    rho = float(spearmanr(est, truth)[0]) if len(est) > 2 and truth.std() > 0 else float("nan")
    return {"rho": rho, "mae": float(np.abs(est - truth).mean()) if len(est) else float("nan"),
            "n": len(est), "docs_per_cand": (n_full * n_docs + len(est) * size) / len(entries), "n_docs": n_docs}


def corr_table(label: str, entries: list[dict], key: str, sizes: list[int], args) -> list[str]:
    lines = [f"**{label}** ({len(entries)} distinct candidates, {len(entries[0]['responses'][key])} documents; "
             f"fit on generations < {args.fit_generations}, refit every {args.refit_every or '-'}, full after a "
             f"low-signal generation: full_below {args.full_below or '-'}):", "",
             "| N | anchor: Spearman / MAE | irt: Spearman / MAE | random (mean of "
             f"{args.random_seeds}): Spearman / MAE | candidates estimated | docs per candidate |",
             "|---|---|---|---|---|---|"]
    n_docs = len(entries[0]["responses"][key])
    for size in sizes:
        if size >= n_docs:
            continue
        res = {m: simulate(entries, key, m, size, 0, args.fit_generations, args.refit_every, args.full_below)
               for m in ("anchor", "irt")}
        rnd = [simulate(entries, key, "random", size, s, args.fit_generations, args.refit_every,
                        args.full_below)
               for s in range(args.random_seeds)]
        rr, rm = np.nanmean([r["rho"] for r in rnd]), np.mean([r["mae"] for r in rnd])
        a, i = res["anchor"], res["irt"]
        lines.append(f"| {size} | {a['rho']:.3f} / {100 * a['mae']:.1f} | {i['rho']:.3f} / {100 * i['mae']:.1f} | "
                     f"{rr:.3f} / {100 * rm:.1f} | {a['n']} | {a['docs_per_cand']:.0f} of {n_docs} |")
        print(lines[-1], flush=True)
    return lines + ["", "(MAE in points of the metric, %.)", ""]


def docs_per_candidate(path: Path, recs: list[dict], what: str = "docs") -> float:
    """Mean ``cost[what]`` (``docs`` or ``forward_tokens``) per candidate, the elite's rescoring included."""
    total = sum((r.get("cost") or {}).get(what, 0) for r in recs)
    resc = path / "subset/rescored.jsonl"
    if resc.is_file():
        total += sum(json.loads(x)["cost"].get(what, 0) for x in resc.read_text().splitlines())
    return total / len(recs)


def toy_test(path: Path, zoo: Path, env: dict) -> float:
    done = json.loads((path / "bench.json").read_text())
    if "test" not in done:
        out = path / "export"
        dfsmerge("export", str(path), "--candidate", "best", "--out", str(out), "--force", env=env)
        done["test"] = score(str(out), zoo, env)["zoo_math_b"]
        (path / "bench.json").write_text(json.dumps(done))
    return done["test"]


def real_test(path: Path, cfg: dict, env: dict) -> float:
    """The best candidate of run ``path`` on its fitness task's test split (%), exported once and cached in
    ``path/bench_test.json``."""
    done = path / "bench_test.json"
    if done.is_file():
        return json.loads(done.read_text())["test"]
    key = cfg["objectives"][0]["name"]
    out = path / "export"
    if not (out / "config.json").is_file():
        dfsmerge("export", str(path), "--candidate", "best", "--out", str(out), "--force", env=env)
    from dfsmerge.objectives.tasks import task_dirs

    res = dfsmerge("eval", str(out), "--tasks", key, *(a for t in task_dirs(cfg.get("task_paths") or [])
                                                       for a in ("--task-search-path", t)),
                   "--split", "test", "--native", "--dtype", str(cfg.get("eval_dtype") or "float32"), "--json",
                   env=env)
    val = 100.0 * next(iter(json.loads(res[res.index("{"):])["results"][key].values()))
    done.write_text(json.dumps({"test": val}))
    return val


def real_search(args, work: Path, env: dict) -> list[str]:
    """``real-search``: each run of ``--real-runs`` against the same search on the estimate."""
    rows = []
    for full in (Path(r) for r in args.real_runs.split(",") if r):
        cfg = yaml.safe_load((full / "config.yaml").read_text())
        key = cfg["objectives"][0]["name"]
        recs_f = [json.loads(x) for x in (full / "evals.jsonl").open()]
        sub, tag = estimate_subset(args)
        base = dict(cfg, budget={"max_evals": len(recs_f)})
        est = work / f"real-{full.name}-{tag}"
        wall_e, recs_e = run(with_subset(base, sub), est, env)
        bench = full / "bench.json"  # a run made elsewhere: from its first candidate's start to its last's end
        wall_f = (json.loads(bench.read_text())["wall_s"] if bench.is_file()
                  else recs_f[-1]["time"] - recs_f[0]["time"] + recs_f[0]["timings"]["total_s"])
        for label, path, recs, wall in (("full set", full, recs_f, wall_f),
                                        (f"{args.search_method} N={args.search_size}", est, recs_e, wall_e)):
            best = json.loads((path / "best/best.json").read_text())
            rows.append((full.name, label, len(recs), 100 * best["objectives"][key], real_test(path, cfg, env),
                         docs_per_candidate(path, recs), docs_per_candidate(path, recs, "forward_tokens"), wall))
            print(rows[-1], flush=True)
    if not rows:
        return []
    return ["**Real search on the estimate vs on the full set** (equal candidate count; validation = the best's "
            "full-set score, test = its score on the fitness task's test split, %):", "",
            "| run | fitness | evals | best validation | best test | docs per candidate | forward tokens per "
            "candidate | wall s |", "|---|---|---|---|---|---|---|---|",
            *(f"| {r} | {lab} | {n} | {v:.1f} | {t:.1f} | {d:.1f} | {f:.0f} | {w:.0f} |"
              for r, lab, n, v, t, d, f, w in rows),
            "", "Wall times are of runs made at different times on a shared 2-core machine (not comparable); the "
            "documents and forward tokens are the cost measure.", ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="toy-corr,toy-search,real-corr")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--toy-config", default="joint")
    ap.add_argument("--zoo", default="~/.cache/dfsmerge/zoo/default-seed0-v2", help="the toy zoo (one, for every seed)")
    ap.add_argument("--sizes", default="10,25,50,100")
    ap.add_argument("--fit-generations", type=int, default=1)
    ap.add_argument("--refit-every", type=int, default=10)
    ap.add_argument("--full-below", type=float, default=5.0, help="subset.full_below (0: never)")
    ap.add_argument("--random-seeds", type=int, default=10)
    ap.add_argument("--search-method", default="anchor")
    ap.add_argument("--search-size", type=int, default=50)
    ap.add_argument("--real-max-evals", type=int, default=24)
    ap.add_argument("--real-run", default=None, help="real-corr on this finished run instead of a new DFS search: a "
                    "search that recorded every candidate's per-document results (e.g. benchmarks/real_experts.py "
                    "--record writes runs/real_experts/MODE-sS)")
    ap.add_argument("--real-runs", default="", help="real-search: comma-separated finished full-set runs")
    ap.add_argument("--elite", type=int, default=3, help="subset.elite of the searches on the estimate")
    ap.add_argument("--max-evals", type=int, default=None, help="toy budget override (default: the config's)")
    ap.add_argument("--workdir", default=str(ROOT / "runs/subset_fitness"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/subset_fitness.md"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    args.refit_every = args.refit_every or None
    args.full_below = args.full_below or None
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    work, parts = Path(args.workdir), set(args.parts.split(","))
    sizes = [int(s) for s in args.sizes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    lines = [f"Made by `python benchmarks/subset_fitness.py {' '.join(sys.argv[1:])}` (1 thread per search).", ""]
    search_rows = []
    for seed in seeds:
        if not parts & {"toy-corr", "toy-search"}:
            break
        base, zoo = toy_base(args.toy_config, seed, args.zoo)
        if args.max_evals:
            base["budget"] = {"max_evals": args.max_evals}
        full = work / f"toy-{args.toy_config}-s{seed}-full"
        wall_f, recs_f = run(with_subset(base, RECORD), full, env)
        print(f"toy seed {seed} full run: {len(recs_f)} evals in {wall_f:.0f} s", flush=True)
        if "toy-corr" in parts:
            lines += corr_table(f"toy {args.toy_config}, seed {seed}, zoo_math_b", responses(full),
                                "zoo_math_b", sizes, args)
        if "toy-search" in parts:
            sub, tag = estimate_subset(args)
            est = work / f"toy-{args.toy_config}-s{seed}-{tag}"
            wall_e, recs_e = run(with_subset(base, sub), est, env)
            for label, path, recs, wall in (("full set", full, recs_f, wall_f),
                                            (f"{args.search_method} N={args.search_size}", est, recs_e, wall_e)):
                best = json.loads((path / "best/best.json").read_text())
                search_rows.append((seed, label, len(recs), 100 * best["objectives"]["zoo_math_b"],
                                    toy_test(path, zoo, env), docs_per_candidate(path, recs), wall))
                print(search_rows[-1], flush=True)
    if search_rows:
        lines += [f"**Search on the estimate vs on the full set** (toy {args.toy_config}, equal candidate count; "
                  "validation = the best's full-set score, test = its test-split score, %):", "",
                  "| seed | fitness | evals | best validation | best test | docs per candidate | wall s |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {s} | {lab} | {n} | {v:.1f} | {t:.1f} | {d:.0f} | {w:.0f} |"
                  for s, lab, n, v, t, d, w in search_rows]
        lines.append("")
    if "real-search" in parts:
        lines += real_search(args, work, env)
    if "real-corr" in parts and args.real_run:
        full = Path(args.real_run)
        cfg = yaml.safe_load((full / "config.yaml").read_text())
        key = cfg["objectives"][0]["name"]
        models = [m["model"] if isinstance(m, dict) else str(m) for m in cfg["genome"]["models"]]
        lines += corr_table(f"real: {full.name} ({cfg['genome']['mode']} over {', '.join(models)}), "
                            f"{key}", responses(full), key, sizes, args)
    elif "real-corr" in parts:
        full = work / "real-full"
        wall, recs = run(with_subset(real_base(args.real_max_evals), RECORD), full, env)
        print(f"real full run: {len(recs)} evals in {wall:.0f} s", flush=True)
        lines += corr_table("real SmolLM2-135M DFS, real_arith", responses(full), "real_arith",
                            sizes, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
