"""The real SmolLM2-135M-Instruct (dfsmerge.io.realmodels, from its PyPI wheel): what one search candidate costs, and
a DFS search from the source at a fixed budget.

1. Per-candidate evaluation, fp32 and bf16: dfsmerge's native evaluator on the stitched identity plan (what a
   search pays per candidate) against lm-eval's own ``HFLM`` on vanilla transformers, same documents (the
   validation splits of configs/real's two tasks); seconds per candidate, documents/s, scores, ratio. Plus raw
   forward throughput (tokens/s) of the stitched model and the vanilla model on the same batches.
2. ``dfsmerge search configs/real/dfs.yaml`` at its budget (or ``--max-evals``), then the best exported and
   scored on both splits beside the source.

    python benchmarks/real_model.py                      # both parts (about 15 min on one core)
    python benchmarks/real_model.py --skip-search        # part 1 only
    python benchmarks/real_model.py --max-evals 16 --threads 1

Run from the repository root (the task files' data paths are relative to it). Threads are pinned (--threads);
ratios are measured within one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["real_arith", "real_capitals"]
TASK_DIR = ROOT / "configs" / "real" / "tasks"


def _scores(res: dict) -> dict[str, float]:
    return {t: round(float(next(v for k, v in m.items() if "," in k and "stderr" not in k)), 4)
            for t, m in res["results"].items()}


def _hflm_eval(path: Path, dtype: str, split: str) -> tuple[dict, float]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(path), dtype=dtype, batch_size=16, device="cpu")
    task_dir = Path(tempfile.mkdtemp(prefix="real_tasks_"))  # the shipped YAMLs scoring `split` (lm-eval's test)
    for t in TASKS:
        text = (TASK_DIR / f"{t}.yaml").read_text().replace("test_split: test", f"test_split: {split}")
        (task_dir / f"{t}.yaml").write_text(text.replace('"configs/real/tasks/', f'"{TASK_DIR}/'))
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=tm, random_seed=None, numpy_random_seed=None,
                                  torch_random_seed=None, bootstrap_iters=0, verbosity="ERROR")
    return res, time.perf_counter() - t0


def _native_eval(model, tok, split: str) -> tuple[dict, float]:
    from dfsmerge.objectives import evaluate_model

    evaluate_model(model, tok, TASKS, task_paths=[str(TASK_DIR)], split=split, native=True, limit=2)  # warm-up
    t0 = time.perf_counter()
    res = evaluate_model(model, tok, TASKS, task_paths=[str(TASK_DIR)], split=split, native=True)
    return res, time.perf_counter() - t0


def _forward_tps(model, batches: list[torch.Tensor], reps: int = 2) -> float:
    with torch.no_grad():
        model(batches[0][:1, :8])
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for b in batches:
                model(b)
            best = min(best, time.perf_counter() - t0)
    return sum(b.numel() for b in batches) / best


def part1(smol: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dfsmerge.genome.plan import LayerRef, PathPlan, Step
    from dfsmerge.runtime.pool import LayerPool
    from dfsmerge.runtime.stitched import StitchedModel

    tok = AutoTokenizer.from_pretrained(str(smol))
    docs = [json.loads(line)["prompt"] for line in (TASK_DIR / "real_arith_validation.jsonl").read_text().splitlines()]
    ids = [tok(d, return_tensors="pt").input_ids for d in docs[:32]]
    L = min(x.shape[1] for x in ids)
    batches = [torch.cat([x[:, :L] for x in ids[i:i + 8]]) for i in range(0, 32, 8)]  # (8, L) each
    print("| dtype | runner | s / candidate | docs / s | forward tokens / s | scores |")
    print("|---|---|---|---|---|---|")
    n_docs = sum(len((TASK_DIR / f"{t}_validation.jsonl").read_text().splitlines()) for t in TASKS)
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        pool = LayerPool({"S": str(smol)}, dtype=dtype)
        n = pool.num_layers("S")
        plan = PathPlan(tuple(Step(LayerRef("S", i), 1.0) for i in range(n)), models={"S": str(smol)}, base="S")
        stitched = StitchedModel.from_pool(pool, plan)
        vanilla = AutoModelForCausalLM.from_pretrained(str(smol), dtype=dtype).eval()
        res_n, t_n = _native_eval(stitched, tok, "validation")
        res_h, t_h = _hflm_eval(smol, name, "validation")
        tps_s, tps_v = _forward_tps(stitched, batches), _forward_tps(vanilla, batches)
        print(f"| {name} | dfsmerge native, stitched plan | {t_n:.1f} | {n_docs / t_n:.2f} | {tps_s:.0f} | "
              f"{_scores(res_n)} |")
        print(f"| {name} | lm-eval HFLM, vanilla transformers | {t_h:.1f} | {n_docs / t_h:.2f} | {tps_v:.0f} | "
              f"{_scores(res_h)} |")
        print(f"| {name} | ratio (vanilla / dfsmerge time) | {t_h / t_n:.2f}x | | {tps_s / tps_v:.2f}x | |",
              flush=True)
        del pool, stitched, vanilla


def _cli(*args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "dfsmerge.cli", *args], capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        sys.exit(res.stderr[-3000:])
    return res.stdout


def part2(smol: Path, max_evals: int | None) -> None:
    run = Path(tempfile.mkdtemp(prefix="real_dfs_")) / "run"
    t0 = time.perf_counter()
    _cli("search", "configs/real/dfs.yaml", "--out", str(run), "--quiet",
         *(["--max-evals", str(max_evals)] if max_evals else []))
    wall = time.perf_counter() - t0
    evals = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
    first = [r for r in evals if r["generation"] == 0]
    src = first[0]["objectives"]
    half = sum(all(r["objectives"].get(k, 0) >= 0.5 * v for k, v in src.items()) for r in first)
    _cli("export", str(run), "--candidate", "best", "--out", str(run / "model"))
    best = json.loads((run / "best" / "best.json").read_text()) if (run / "best" / "best.json").is_file() else {}
    print(f"\nDFS search: {len(evals)} candidates in {wall:.0f} s ({wall / len(evals):.1f} s each); candidate 0 = "
          f"the source: {src}; {half}/{len(first)} of generation 0 keep at least half of every source score; "
          f"best: id {best.get('id')}, path length {len(best.get('candidate', {}).get('path', {}).get('path', []))}")
    print("| model | split | " + " | ".join(TASKS) + " |")
    print("|---|---|" + "---|" * len(TASKS))
    for label, ref in (("source", str(smol)), ("search best (folded export)", str(run / "model"))):
        for split in ("validation", "test"):
            out = _cli("eval", ref, "--tasks", ",".join(TASKS), "--task-search-path", str(TASK_DIR), "--split",
                       split, "--native", "--json")
            res = _scores(json.loads(out[out.index("{"):]))
            print(f"| {label} | {split} | " + " | ".join(f"{res[t]:.3f}" for t in TASKS) + " |", flush=True)
    print(f"run directory: {run}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-evals", type=int, default=None, help="search budget (default: the config's)")
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--skip-eval", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import os

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from dfsmerge.io.realmodels import real_model_dir

    smol = real_model_dir("smollm2-135m")
    print(f"SmolLM2-135M-Instruct at {smol}; torch threads {args.threads}\n")
    if not args.skip_eval:
        part1(smol)
    if not args.skip_search:
        part2(smol, args.max_evals)


if __name__ == "__main__":
    main()
