"""What a search's candidates cost with prefix reuse and racing off and on, at equal candidate budget (issue 18).

For each config (toy zoo: configs/toy/dfs.yaml, staged.yaml, joint.yaml; real: configs/real/dfs.yaml over
SmolLM2-135M) and seed, the same search runs three times through the `dfsmerge` command line:

- ``plain``: ``prefix_cache: {enabled: false, share_prompts: false}``, no racing;
- ``prefix``: path prefix reuse on (exact: the script checks that every candidate's scores equal plain's);
- ``all``: path prefix reuse, shared prompts (they share fewer than 8 tokens here, so never run on their own: see
  benchmarks/shared_prompts.py) and racing (kl bound, delta 0.05 per generation, 4 blocks) on, and
  ``eval_dtype: bfloat16`` where ``--bf16`` names the config (the real model: ~1.9x faster forward passes on this
  CPU), else ``auto`` (a timing on the first generation decides; the table's dtype column says which). The others
  score in float32.

Every variant uses the same genome, with the DFS log-scales on a grid (``genome.dfs.scale_step``, 0.05) so
neighbouring candidates can share path prefixes at all (with continuous scales no two candidates share a step), and
CMA-ES starting from the genome's own step sizes (no ``sigma0``: about half an indicator flip per candidate, scale
genes 0.05/sqrt(L)), so the first generations stay near the source path, as configs/real/dfs.yaml does.
Reported per run: forward tokens (full-forward equivalents computed, from evals.jsonl's
``cost``), tokens served from the prefix store, documents scored, search wall time (the whole ``dfsmerge search``
process: on the toy zoo ~8-10 s of it are imports, model checks and task preparation, the same in every variant),
eval seconds (the candidates' own scoring time, evals.jsonl's ``cost.seconds`` summed), and the best candidate's score
on the TEST split (the searches optimise the validation split), exported with ``dfsmerge export`` and scored with
``dfsmerge eval`` as benchmarks/toy_table.py does.

    python benchmarks/search_cost.py [--seeds 0,1] [--configs dfs,staged,joint,real] [--max-evals N]
                                     [--real-max-evals 16] [--workdir runs/search_cost] [--threads 1]
                                     [--out benchmarks/results/search_cost.md]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_table import ROOT, dfsmerge, score, timed_search  # noqa: E402 - the toy table's CLI helpers, one home

TOY = {"dfs": "dfs.yaml", "staged": "staged.yaml", "joint": "joint.yaml"}
REAL_TASKS = ("real_arith", "real_capitals")
VARIANTS = ("plain", "prefix", "all")


def variant_config(base: dict, variant: str, *, scale_step: float, bf16: bool) -> dict:
    cfg = json.loads(json.dumps(base))
    dfs = cfg["genome"].setdefault("dfs", {})
    dfs["scale_step"] = scale_step
    for o in (cfg.get("optimizer") or {}, (cfg.get("stage2") or {}).get("optimizer") or {}):
        o.pop("sigma0", None)  # the genome's own start step sizes (DFSGenome.initial_stds): few flips, small scales
    cfg["prefix_cache"] = {"enabled": variant != "plain", "share_prompts": variant == "all"}
    cfg["eval_dtype"] = "float32"
    if variant == "all":
        cfg["racing"] = {"enabled": True, "bound": "kl", "delta": 0.05, "blocks": 4}
        cfg["eval_dtype"] = "bfloat16" if bf16 else "auto"
    return cfg


def run_one(name: str, cfg: dict, run: Path, seed: int, max_evals: int | None, env: dict) -> dict:
    """Run one search (or read the numbers of a finished one from ``RUN/bench.json``: rerunning the table reruns
    only what is missing, and a finished run's wall time is the one measured when it ran)."""
    done = run / "bench.json"
    if done.is_file():
        res = json.loads(done.read_text())
        recs = [json.loads(line) for line in (run / "evals.jsonl").open()]
        return {**res, "dtype": scored_dtype(run, cfg), "scores": [(r["key"], r["objectives"]) for r in recs]}
    run.parent.mkdir(parents=True, exist_ok=True)
    path = run.parent / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    wall, recs = timed_search(path, run, "--seed", str(seed), *(["--max-evals", str(max_evals)] if max_evals else []),
                              env=env)
    cost = [r.get("cost") or {} for r in recs]
    res = {"evals": len(recs), "wall_s": wall,
           "forward_tokens": sum(c.get("forward_tokens", 0) for c in cost),
           "cached_tokens": sum(c.get("cached_tokens", 0) for c in cost),
           "docs": sum(c.get("docs", 0) for c in cost),
           "eval_s": sum(c.get("seconds", 0) for c in cost),
           "stopped": sum(1 for r in recs if (r.get("race") or {}).get("stopped"))}
    done.write_text(json.dumps(res))
    return {**res, "dtype": scored_dtype(run, cfg), "scores": [(r["key"], r["objectives"]) for r in recs]}


def scored_dtype(run: Path, cfg: dict) -> str:
    """The dtype the run's candidates were scored in (``eval_dtype: auto`` decides by a timing, kept in the state)."""
    if cfg.get("eval_dtype", "auto") != "auto":
        return cfg["eval_dtype"]
    state = json.loads((run / "state/state.json").read_text())
    return (state.get("eval_dtype") or {}).get("dtype", cfg.get("dtype", "float32"))


def test_score(name: str, run: Path, zoo: Path | None, env: dict) -> float:
    out = run / "export"
    dfsmerge("export", str(run), "--candidate", "best", "--out", str(out), "--force", env=env)
    if name == "real":
        res = dfsmerge("eval", str(out), "--tasks", ",".join(REAL_TASKS), "--task-search-path",
                       str(ROOT / "configs/real/tasks"), "--split", "test", "--native", "--json", env=env)
        r = json.loads(res[res.index("{"):])["results"]
        return 100.0 * sum(r[t]["exact_match,none" if t == "real_arith" else "acc,none"] for t in REAL_TASKS) / 2
    return score(str(out), zoo, env)["zoo_math_b"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--configs", default="dfs,staged,joint,real")
    ap.add_argument("--max-evals", type=int, default=None, help="toy budget override (default: the configs')")
    ap.add_argument("--real-max-evals", type=int, default=16)
    ap.add_argument("--toy-scale-step", type=float, default=0.05)
    ap.add_argument("--real-scale-step", type=float, default=0.05)
    ap.add_argument("--bf16", default="real", help="configs whose 'all' variant also evaluates in bfloat16")
    ap.add_argument("--workdir", default=str(ROOT / "runs/search_cost"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/search_cost.md"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    work = Path(args.workdir)
    bf16 = set(args.bf16.split(",")) if args.bf16 else set()
    rows = []
    for name in args.configs.split(","):
        seeds = [int(s) for s in args.seeds.split(",")]
        for seed in seeds[:1] if name == "real" else seeds:  # one real search per variant: ~15 s per candidate
            zoo = None
            if name == "real":
                base = yaml.safe_load((ROOT / "configs/real/dfs.yaml").read_text())
                base["task_paths"] = [str(ROOT / "configs/real/tasks")]
                step, budget = args.real_scale_step, args.real_max_evals
            else:
                base = yaml.safe_load((ROOT / "configs/toy" / TOY[name]).read_text())
                zoo = Path(os.path.expanduser(f"~/.cache/dfsmerge/zoo/default-seed{seed}-v2"))
                base["zoo_dir"] = str(zoo)
                step, budget = args.toy_scale_step, args.max_evals
            res = {}
            for v in VARIANTS:
                cfg = variant_config(base, v, scale_step=step, bf16=name in bf16)
                run = work / f"{name}-s{seed}-{v}"
                res[v] = run_one(name, cfg, run, seed, budget, env)
                if "test" not in res[v]:  # kept with the run's numbers: a rerun of the table rescores nothing
                    res[v]["test"] = test_score(name, run, zoo, env)
                    done = json.loads((run / "bench.json").read_text())
                    (run / "bench.json").write_text(json.dumps({**done, "test": res[v]["test"]}))
                print(f"{name} seed {seed} {v}: {json.dumps({k: x for k, x in res[v].items() if k != 'scores'})}",
                      flush=True)
            res["identical"] = res["prefix"]["scores"] == res["plain"]["scores"]
            rows.append((name, seed, res))
    write(rows, args)


def write(rows, args) -> None:
    lines = [f"Made by `python benchmarks/search_cost.py --seeds {args.seeds} --configs {args.configs}"
             f"{f' --max-evals {args.max_evals}' if args.max_evals else ''} --real-max-evals {args.real_max_evals}`"
             f" (1 thread per search; forward tokens are full-forward equivalents; test = the best candidate's "
             "TEST-split score, %).", "",
             "| config | seed | evals | plain: fwd tokens / wall s / eval s / test | prefix: fwd tokens (x fewer) / "
             "wall s / eval s (x less) / test, scores identical | all: fwd tokens (x fewer) / wall s (x less) / eval s "
             "(x less) / test, stopped, dtype | docs all/plain |",
             "|---|---|---|---|---|---|---|"]

    def ratio(x, y):
        return f"{x / y:.2f}x" if y else "-"

    for name, seed, r in rows:
        p, q, a = r["plain"], r["prefix"], r["all"]
        lines.append(
            f"| {name} | {seed} | {p['evals']} | {p['forward_tokens']:.0f} / {p['wall_s']:.0f} / {p['eval_s']:.1f} / "
            f"{p['test']:.1f} | "
            f"{q['forward_tokens']:.0f} ({ratio(p['forward_tokens'], q['forward_tokens'])}) / {q['wall_s']:.0f} / "
            f"{q['eval_s']:.1f} ({ratio(p['eval_s'], q['eval_s'])}) / {q['test']:.1f}, "
            f"{'yes' if r['identical'] else 'NO'} | "
            f"{a['forward_tokens']:.0f} ({ratio(p['forward_tokens'], a['forward_tokens'])}) / {a['wall_s']:.0f} "
            f"({ratio(p['wall_s'], a['wall_s'])}) / {a['eval_s']:.1f} ({ratio(p['eval_s'], a['eval_s'])}) / "
            f"{a['test']:.1f}, {a['stopped']}, {a['dtype']} | "
            f"{a['docs'] / p['docs'] if p['docs'] else 0:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
