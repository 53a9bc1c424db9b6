"""Evaluation speed: documents per second of one candidate evaluation on the toy zoo's tasks, three ways.

  harness/simple_evaluate  lm_eval.simple_evaluate over DfsLM per candidate (what mergekit-evolve does: tasks and
                           datasets are rebuilt every call)
  harness/prepared         DfsLM through lm_eval.evaluator.evaluate over tasks loaded once (dfsmerge's lm-eval path)
  native                   dfsmerge's native evaluator (teacher-forced exact match, prefix-cached choices)

and checks that the three give the same scores. Target: native >= 3x harness/prepared.

    python benchmarks/eval_speed.py                         # zoo at $DFSMERGE_ZOO / ~/.cache, else a tiny zoo
    python benchmarks/eval_speed.py --zoo DIR --model math --limit 300 --device cuda

With no finished zoo found it builds the ``tiny`` zoo (seconds; barely trained models, so most answers are wrong
and generation stops early) and says so; a trained ``default`` zoo is the representative setting.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _zoo(args):
    from dfsmerge.zoo.build import build_zoo, default_zoo_dir, is_zoo, load_zoo

    if args.zoo:
        return load_zoo(args.zoo), f"zoo at {args.zoo}"
    root = default_zoo_dir()
    if is_zoo(root):
        return load_zoo(root), f"zoo at {root}"
    tmp = Path(tempfile.mkdtemp(prefix="dfs_eval_speed_")) / "zoo"
    print(f"no finished zoo at {root}: building the tiny zoo in {tmp} (barely trained models)", flush=True)
    return build_zoo(tmp, size="tiny", progress=False), f"TINY zoo built at {tmp} (not representative)"


def _time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", help="zoo directory (default: $DFSMERGE_ZOO or ~/.cache/dfsmerge/zoo/default-seed0-v2)")
    p.add_argument("--model", default="math", help="zoo model to score (default: math)")
    p.add_argument("--tasks", default="zoo_math_e,zoo_math_b,zoo_generic_e", help="comma-separated zoo tasks")
    p.add_argument("--split", default="validation")
    p.add_argument("--limit", type=int, default=200, help="documents per task")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed evaluations per method (median reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: steadier timings on a shared machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dfsmerge.objectives import EvalConfig, ObjectiveConfig, TaskSuite
    from dfsmerge.objectives.lm_adapter import DfsLM
    from dfsmerge.objectives.tasks import simple_evaluate

    zoo, where = _zoo(args)
    path = zoo.model_path(args.model)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(args.device).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    tasks = [t for t in args.tasks.split(",") if t]
    objs = tuple(ObjectiveConfig(name=t, split=args.split, limit=args.limit, metric="exact_match") for t in tasks)
    cfg = EvalConfig(objectives=objs, task_paths=(str(zoo.task_dir),), batch_size=args.batch_size,
                     builtin_tasks=False)
    t0 = time.perf_counter()
    harness = TaskSuite(cfg, tok)
    native = TaskSuite(cfg.model_copy(update={"objectives": tuple(o.model_copy(update={"native": True})
                                                                  for o in objs)}), tok)
    prep_s = time.perf_counter() - t0
    n_docs = sum(min(args.limit, p.n_docs) for p in harness.prepared)

    lm = DfsLM(model, tok, batch_size=args.batch_size, max_gen_toks=cfg.max_gen_toks)

    def via_simple_evaluate():
        out = {}
        for t in tasks:  # scores the task's default split (test): the same number of documents, timing only
            res = simple_evaluate(lm, [t], task_paths=[zoo.task_dir], limit=args.limit, bootstrap_iters=0,
                                  log_samples=False, verbosity="ERROR")["results"][t]
            out[t] = {k: float(v) for k, v in res.items() if k == "exact_match,none"}
        return out

    print(f"{where}; model {args.model!r} on {args.device}, torch threads {torch.get_num_threads()}; "
          f"tasks {', '.join(tasks)} ({args.split}, {args.limit} docs each, {n_docs} in all); "
          f"batch {args.batch_size}; task preparation (once per search) {prep_s:.2f} s", flush=True)
    harness.evaluate(model, tok, lm=lm)  # warm-up (allocator, lazy imports)
    native.evaluate(model, tok)
    t_simple, _ = _time(via_simple_evaluate, 1)
    t_harness, s_harness = _time(lambda: harness.evaluate(model, tok, lm=lm), args.repeats)
    t_native, s_native = _time(lambda: native.evaluate(model, tok), args.repeats)

    rows = [("harness/simple_evaluate", t_simple, n_docs), ("harness/prepared", t_harness, n_docs),
            ("native", t_native, n_docs)]
    print(f"{'method':<26}{'s/eval':>10}{'docs/s':>12}")
    for name, t, n in rows:
        print(f"{name:<26}{t:>10.3f}{n / t:>12.1f}")
    ratio = t_harness / t_native
    print(f"native / harness-prepared speed ratio: {ratio:.1f}x (target >= 3x)  "
          f"native / simple_evaluate: {t_simple / t_native:.1f}x")
    print("scores (exact_match):", {t: s_native[t]["exact_match,none"] for t in tasks})
    same = s_native == s_harness
    print("native scores equal harness scores:", same)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
