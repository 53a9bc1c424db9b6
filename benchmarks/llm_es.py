"""LLM as evolution strategy (optimizer ``llm``: EvoLLM, arXiv 2402.18381, with LLM-Evo-Merge's sigma rule) against
CMA-ES and random search on the toy zoo, at equal budget.

For each seed and each of configs/toy/ps.yaml and configs/toy/joint.yaml, the same genome, objective (the combined
task's validation split) and evaluation budget are searched three times, changing only the optimizer: ``llm`` (a
local SmolLM2-135M-Instruct by default, or any OpenAI-compatible endpoint), ``cma`` (the config's own settings) and
``random``. Each winner is exported (`dfsmerge export RUN --candidate best`) and scored on the TEST split with
`dfsmerge eval`, as benchmarks/toy_table.py does; wall time is the whole search (LLM time included). When the run
directory holds ``llm.jsonl`` the table also says how many generations got a usable LLM proposal and how many
seconds the LLM calls took. A finished row is kept in ``RUN/bench.json`` and reused by later invocations.

    python benchmarks/llm_es.py [--seeds 0,1] [--configs ps,joint] [--max-evals N | ps=N,joint=M]
                                [--digits 2] [--llm-model real:smollm2-135m] [--backend local|openai] [--base-url URL]
                                [--workdir runs/llm_es] [--out benchmarks/results/llm_es.md] [--threads 1]

Everything runs through the `dfsmerge` command line in subprocesses, as a user would run it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_table import ROOT, SKILLS, dfsmerge, score, timed_search  # noqa: E402 - the toy table's CLI helpers, one home

OPTIMIZERS = ("llm", "cma", "random")
OBJECTIVE = "zoo_math_b"  # what the searches optimise (validation split); scored here on test


def optimizer_section(name: str, base: dict, args: argparse.Namespace, dim: int) -> dict:
    popsize = base.get("popsize")
    if name == "cma":
        return base
    if name == "random":
        return {"name": "random", "popsize": popsize}
    llm = {"name": "llm", "popsize": popsize, "backend": args.backend, "model": args.llm_model,
           "digits": args.digits, "max_tokens": 8 * dim + 16, "max_retries": 1}
    if args.backend == "openai":
        llm.update(base_url=args.base_url, api_key_env=args.api_key_env)
    return llm


def genome_dim(cfg: dict, zoo: Path) -> int:
    from dfsmerge.search import load_search_config
    from dfsmerge.search.space import build_space

    space, _ = build_space(load_search_config({**cfg, "zoo_dir": str(zoo)}))
    return space.dim


def llm_stats(run: Path) -> tuple[str, float | None]:
    """("used/generations", seconds spent in LLM calls) from the run's llm.jsonl, or ("-", None)."""
    log = run / "llm.jsonl"
    if not log.exists():
        return "-", None
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    props = [p for p in recs if p.get("kind") == "proposal" and p["generation"] > 0]
    secs = sum(c["seconds"] for c in recs if c.get("kind") == "call")
    return f"{sum(p['source'] == 'llm' for p in props)}/{len(props)}", secs


def budget_of(spec: str | None, config: str) -> int | None:
    """``--max-evals``: "N" for every config, or "ps=N,joint=M" per config (None: the config's own budget)."""
    if not spec:
        return None
    if "=" not in spec:
        return int(spec)
    per = dict(item.split("=") for item in spec.split(","))
    return int(per[config]) if config in per else None


def run_one(zoo: Path, work: Path, config: str, opt: str, seed: int, args, env: dict) -> dict:
    cfg = yaml.safe_load((ROOT / "configs/toy" / f"{config}.yaml").read_text())
    cfg["optimizer"] = optimizer_section(opt, cfg["optimizer"], args, genome_dim(cfg, zoo))
    if budget_of(args.max_evals, config):
        cfg["budget"] = {"max_evals": budget_of(args.max_evals, config)}
    path = work / f"{config}-{opt}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run = work / f"run-{config}-{opt}"
    done = run / "bench.json"  # this row's result, kept so a rerun (e.g. with more seeds) reuses finished rows
    if done.exists():
        return json.loads(done.read_text())
    wall, evals = timed_search(path, run, "--seed", str(seed), "--zoo-dir", str(zoo), env=env)
    best_val = min(r["fitness"] for r in evals if r["fitness"] is not None)
    out = run / "export"
    dfsmerge("export", str(run), "--candidate", "best", "--out", str(out), "--force", env=env)
    used, llm_s = llm_stats(run)
    row = {"test": score(str(out), zoo, env), "val_fitness": best_val, "evals": len(evals), "wall": wall,
           "llm": used, "llm_s": llm_s}
    done.write_text(json.dumps(row))
    return row


def render(rows: dict[str, dict[int, dict]], seeds: list[int]) -> str:
    head = ["search", f"{SKILLS[OBJECTIVE]} (test)", "math E (test)", "lang. B (test)", "best val. fitness",
            "evals", "wall s", "of which LLM s", "LLM proposals used"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, by_seed in rows.items():
        got = [by_seed[s] for s in seeds if s in by_seed]
        cells = [label,
                 " / ".join(f"{r['test'][OBJECTIVE]:.1f}" for r in got),
                 " / ".join(f"{r['test']['zoo_math_e']:.1f}" for r in got),
                 " / ".join(f"{r['test']['zoo_lang_b']:.1f}" for r in got),
                 " / ".join(f"{r['val_fitness']:.4f}" for r in got),
                 " / ".join(str(r["evals"]) for r in got),
                 " / ".join(f"{r['wall']:.0f}" for r in got),
                 " / ".join("-" if r.get("llm_s") is None else f"{r['llm_s']:.0f}" for r in got),
                 " / ".join(r["llm"] for r in got)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--configs", default="ps,joint")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--max-evals", default=None,
                    help="override the budget, equal for all optimizers: N, or per config as ps=N,joint=M")
    ap.add_argument("--digits", type=int, default=2, help="llm: decimals of the genes in the prompt and answer")
    ap.add_argument("--backend", choices=("local", "openai"), default="local")
    ap.add_argument("--llm-model", default="real:smollm2-135m")
    ap.add_argument("--base-url", default=None, help="openai backend: the endpoint")
    ap.add_argument("--api-key-env", default=None, help="openai backend: variable holding the key (none: no key)")
    ap.add_argument("--workdir", default=str(ROOT / "runs/llm_es"))  # zoos and runs are reused from here
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/llm_es.md"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: dict[str, dict[int, dict]] = {}
    for seed in seeds:
        work = Path(args.workdir) / f"seed{seed}"
        work.mkdir(parents=True, exist_ok=True)
        zoo = work / "zoo"
        dfsmerge("zoo", "build", str(zoo), "--seed", str(seed), "--threads", str(args.threads), "--quiet", env=env)
        for config in args.configs.split(","):
            for opt in args.optimizers.split(","):
                r = run_one(zoo, work, config, opt, seed, args, env)
                label = f"{config.upper()} {opt}"
                rows.setdefault(label, {})[seed] = r
                print(f"seed {seed} | {label:<12} | test {r['test'][OBJECTIVE]:5.1f} | val fitness "
                      f"{r['val_fitness']:.4f} | evals {r['evals']} | {r['wall']:.0f} s | llm {r['llm']}", flush=True)
    table = render(rows, seeds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"Made by `python benchmarks/llm_es.py {' '.join(sys.argv[1:])}` (test split, exact match %, "
                   f"seeds {' / '.join(map(str, seeds))}; validation fitness is what the search minimised).\n\n"
                   f"{table}\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(table)


if __name__ == "__main__":
    main()
