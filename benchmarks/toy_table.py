"""The paper-style results table (Sakana AI, arXiv 2403.13187, Table 1) on the toy zoo.

For each seed: builds the default zoo, scores every source, the unsearched merges (task arithmetic with unit
weights, TIES and DARE-TIES at weight 1 / density 0.5, and three hand frankenmerges: a passthrough layer stack
(half and half), the language expert's embedding in front of the math expert's blocks and head, and the language
expert's embedding and first layer in front of the math expert's other layers), and the searched models (PS,
DFS, PS+DFS staged and joint with CMA-ES, random search at the PS budget, and PS for the multi-task objective).
Searched winners are exported
as folded Hugging Face checkpoints (`dfsmerge export RUN --candidate best`) and every row is scored on the TEST
split through `dfsmerge eval`, so the table is about models anyone can load. Searches score on the validation split.

    python benchmarks/toy_table.py [--seeds 0,1] [--max-evals N] [--workdir runs/toy_table]
                                   [--out benchmarks/results/toy_table.md] [--threads 1]

Everything runs through the `dfsmerge` command line in subprocesses, as a user would run it.
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
SKILLS = {"zoo_math_e": "math (E)", "zoo_lang_b": "language (B)", "zoo_math_b": "combined: math in B"}
SEARCHES = {  # row label -> config under configs/toy/
    "PS (CMA-ES)": "ps.yaml",
    "DFS (CMA-ES)": "dfs.yaml",
    "PS+DFS staged (CMA-ES)": "staged.yaml",
    "PS+DFS joint (CMA-ES)": "joint.yaml",
    "PS random search": "random.yaml",
    "PS for the multi-task objective (CMA-ES)": "multitask.yaml",
}


def dfsmerge(*args: str, env: dict) -> str:
    cmd = [sys.executable, "-m", "dfsmerge.cli", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"failed: dfsmerge {' '.join(args)}\n{res.stderr[-4000:]}")
    return res.stdout


def score(model: str, zoo: Path, env: dict) -> dict[str, float]:
    out = dfsmerge("eval", model, "--zoo", str(zoo), "--tasks", ",".join(SKILLS), "--split", "test", "--native",
                   "--batch-size", "64", "--json", env=env)
    res = json.loads(out[out.index("{"):])["results"]
    return {t: 100.0 * res[t]["exact_match,none"] for t in SKILLS}


def merge_row(zoo: Path, work: Path, method: str, env: dict) -> Path:
    import yaml

    params = {"weight": 1.0} if method == "task_arithmetic" else {"weight": 1.0, "density": 0.5}
    recipe = {"merge_method": method, "base_model": str(zoo / "models/base"), "dtype": "float32",
              "models": [{"model": str(zoo / f"models/{m}"), "parameters": params} for m in ("math", "language")]}
    path = work / f"{method}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = work / f"merged-{method}"
    dfsmerge("merge", str(path), str(out), "--force", "--quiet", env=env)
    return out


def stack_row(zoo: Path, work: Path, env: dict, split: int | None = None) -> Path:
    """A mergekit-style passthrough frankenmerge: the language expert's layers [0, split), the math expert's
    [split, n) (mergekit takes the embedding from the first slice's model, the final norm and head from the last's).
    ``split`` defaults to half the layers."""
    import yaml

    n = json.loads((zoo / "models/math/config.json").read_text())["num_hidden_layers"]
    split = n // 2 if split is None else split
    recipe = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(zoo / "models/language"), "layer_range": [0, split]}]},
        {"sources": [{"model": str(zoo / "models/math"), "layer_range": [split, n]}]}]}
    (work / f"stack{split}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = work / f"stack{split}"
    dfsmerge("merge", str(work / f"stack{split}.yaml"), str(out), "--force", "--quiet", env=env)
    return out


def frankenmerge_row(zoo: Path, work: Path, env: dict) -> Path:
    """The language expert's embedding in front of the math expert's blocks, norm and head."""
    import yaml

    n = json.loads((zoo / "models/math/config.json").read_text())["num_hidden_layers"]
    plan = {"models": {"math": str(zoo / "models/math"), "language": str(zoo / "models/language")},
            "base": "math", "embed": "language",
            "path": [{"model": "math", "layer": i, "scale": 1.0} for i in range(n)]}
    (work / "frankenmerge.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    out = work / "frankenmerge"
    dfsmerge("export", "--plan", str(work / "frankenmerge.yaml"), "--out", str(out), "--force", env=env)
    return out


def timed_search(config: Path, run: Path, *extra: str, env: dict) -> tuple[float, list[dict]]:
    """`dfsmerge search CONFIG --out RUN --quiet EXTRA...` (``--resume`` when RUN already holds evaluations):
    its wall seconds and the run's evals.jsonl lines."""
    args = ["search", str(config), "--out", str(run), "--quiet", *extra]
    if (run / "evals.jsonl").exists():
        args.append("--resume")
    t0 = time.perf_counter()
    dfsmerge(*args, env=env)
    wall = time.perf_counter() - t0
    return wall, [json.loads(line) for line in (run / "evals.jsonl").open()]


def search_row(zoo: Path, work: Path, config: str, seed: int, max_evals: int | None, env: dict
               ) -> tuple[Path, int, float]:
    run = work / f"run-{Path(config).stem}"
    extra = ["--seed", str(seed), "--zoo-dir", str(zoo)] + (["--max-evals", str(max_evals)] if max_evals else [])
    wall, evals = timed_search(ROOT / "configs/toy" / config, run, *extra, env=env)
    n_evals = len(evals)
    out = run / "export"
    dfsmerge("export", str(run), "--candidate", "best", "--out", str(out), "--force", env=env)
    return out, n_evals, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--max-evals", type=int, default=None, help="override every search's budget")
    ap.add_argument("--workdir", default=str(ROOT / "runs/toy_table"))  # zoos and runs are reused from here
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/toy_table.md"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default=None, help="comma-separated row groups: sources,merges,searches")
    ap.add_argument("--combine", default=None, metavar="A.json,B.json",
                    help="only render the rows of earlier runs (e.g. one process per seed) into --out")
    args = ap.parse_args()
    if args.combine:
        rows: dict[str, dict[int, dict]] = {}
        for f in args.combine.split(","):
            for label, by_seed in json.loads(Path(f).read_text()).items():
                rows.setdefault(label, {}).update({int(k): v for k, v in by_seed.items()})
        seeds = sorted({s for by_seed in rows.values() for s in by_seed})
        write(rows, seeds, args.out, f"python benchmarks/toy_table.py --combine {args.combine}")
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    groups = set((args.only or "sources,merges,searches").split(","))
    rows: dict[str, dict[int, dict]] = {}

    def add(label: str, seed: int, scores: dict, evals: int | str, wall: float | None) -> None:
        rows.setdefault(label, {})[seed] = {"scores": scores, "evals": evals, "wall": wall}
        s = " ".join(f"{v:6.1f}" for v in scores.values())
        print(f"seed {seed} | {label:<34} | {s} | evals {evals} | {'' if wall is None else f'{wall:.0f} s'}",
              flush=True)

    for seed in [int(s) for s in args.seeds.split(",")]:
        work = Path(args.workdir) / f"seed{seed}"
        work.mkdir(parents=True, exist_ok=True)
        zoo = work / "zoo"
        t0 = time.perf_counter()
        dfsmerge("zoo", "build", str(zoo), "--seed", str(seed), "--threads", str(args.threads), "--quiet",
                 env=env)
        print(f"seed {seed}: zoo ready in {time.perf_counter() - t0:.0f} s at {zoo}", flush=True)
        if "sources" in groups:
            for name in ("base", "math", "language"):
                add(f"source: {name}", seed, score(str(zoo / f"models/{name}"), zoo, env), "-", None)
        if "merges" in groups:
            for label, method in (("task arithmetic, unit weights", "task_arithmetic"),
                                  ("TIES (w 1, density 0.5)", "ties"), ("DARE-TIES (w 1, density 0.5)", "dare_ties")):
                add(label, seed, score(str(merge_row(zoo, work, method, env)), zoo, env), 1, None)
            add("hand frankenmerge: layer stack (lang. 1st half, math 2nd)", seed,
                score(str(stack_row(zoo, work, env)), zoo, env), 1, None)
            add("hand frankenmerge: lang. embedding + layer 0, math layers 1-", seed,
                score(str(stack_row(zoo, work, env, split=1)), zoo, env), 1, None)
            add("hand frankenmerge: lang. embedding + math blocks", seed,
                score(str(frankenmerge_row(zoo, work, env)), zoo, env), 1, None)
        if "searches" in groups:
            for label, config in SEARCHES.items():
                model, n, wall = search_row(zoo, work, config, seed, args.max_evals, env)
                add(label, seed, score(str(model), zoo, env), n, wall)
    write(rows, [int(s) for s in args.seeds.split(",")], args.out,
          "python benchmarks/toy_table.py " + " ".join(sys.argv[1:]))


def write(rows: dict[str, dict[int, dict]], seeds: list[int], out: str, cmd: str) -> None:
    table = render(rows, seeds)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"Made by `{cmd.strip()}` (test split, exact match %, seeds "
                    f"{' / '.join(map(str, seeds))}).\n\n{table}\n")
    path.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(table)


def render(rows: dict[str, dict[int, dict]], seeds: list[int]) -> str:
    head = ["model"] + list(SKILLS.values()) + ["multi-task (mean of math E, lang. B)", "evals", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, by_seed in rows.items():
        cells = [label]
        for task in SKILLS:
            cells.append(" / ".join(f"{by_seed[s]['scores'][task]:.1f}" for s in seeds if s in by_seed))
        cells.append(" / ".join(f"{(by_seed[s]['scores']['zoo_math_e'] + by_seed[s]['scores']['zoo_lang_b']) / 2:.1f}"
                                for s in seeds if s in by_seed))
        cells.append(" / ".join(str(by_seed[s]["evals"]) for s in seeds if s in by_seed))
        cells.append(" / ".join("-" if by_seed[s]["wall"] is None else f"{by_seed[s]['wall']:.0f}"
                                for s in seeds if s in by_seed))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
