"""The handlers of ``dfsmerge search`` and ``dfsmerge inspect``: calls into the library (no logic here).

``dfsmerge/cli.py`` parses both subcommands and dispatches to these handlers (``set_defaults(handler=...)``).
"""

from __future__ import annotations

import argparse
import logging
import sys


class _StderrHandler(logging.StreamHandler):
    """A handler writing to the current ``sys.stderr``, not the one it was made with (in one process the command
    may run many times while ``sys.stderr`` is replaced, as under pytest's capture; a closed stream would print
    a logging traceback)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("dfsmerge.search")
    if not logger.handlers:
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(h)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def search_command(args: argparse.Namespace) -> int:
    """Handler of ``dfsmerge search``; prints where the best model, plan and report are."""
    from dfsmerge.rundir.lock import check_unlocked

    check_unlocked(args.out)  # a second writer is refused at once, before the config and torch are loaded
    from dfsmerge.search.config import load_search_config
    from dfsmerge.search.loop import run_search

    _setup_logging(args.quiet)
    config = load_search_config(args.config)
    task_paths = tuple(config.task_paths) + tuple(args.task_path or ())
    budget = {"max_evals": args.max_evals, "max_generations": args.max_generations, "time_limit": args.time_limit}
    stage2_budget = config.stage2 is not None and config.stage2.budget is not None
    overrides = {**{f"budget.{k}": v for k, v in budget.items()},
                 **({f"stage2.budget.{k}": v for k, v in budget.items()} if stage2_budget else {}),
                 "seed": args.seed, "backend": args.backend, "ray_address": args.address, "num_workers": args.workers,
                 "device": args.device, "zoo_dir": args.zoo_dir,
                 "task_paths": list(task_paths) if args.task_path else None}
    from dfsmerge.io.memory import parse_memory
    from dfsmerge.search.signals import SearchPaused

    max_memory = None if args.max_memory is None else parse_memory(args.max_memory)
    try:
        result = run_search(config, args.out, resume=args.resume, progress=not args.quiet, address=args.address,
                            max_memory=max_memory, **overrides)
    except SearchPaused as e:
        print(f"dfsmerge: search paused ({e.signame}) after {e.n_evals} evaluations; resume with: "
              f"{resume_command(args)}", file=sys.stderr)
        return 128 + e.signum
    print(f"search finished: {result.n_evals} evaluations in {result.run_dir} ({result.stop_reason})")
    if result.best is not None and "report" in result.outputs:  # is the best better than the start and sources?
        from dfsmerge.analysis.ablation import run_significance
        from dfsmerge.io.diskspace import guard_disk_full
        from dfsmerge.report import write_report
        from dfsmerge.search.state import DISK_FULL_FIX

        with guard_disk_full(result.outputs["report"], None, fix=DISK_FULL_FIX):  # the resume writes it again
            write_report(result.run_dir, significance=run_significance)  # rescoring the best, start and sources once
    if result.best is not None:
        from dfsmerge.report import describe_best

        print(f"best {describe_best(result.best)} (eval id {result.best['id']})")
    for name in ("plan", "recipe", "mergekit", "pareto", "report"):
        if name in result.outputs:
            print(f"  {name}: {result.outputs[name]}")
    if result.best is not None:
        print(f"export the best model with `dfsmerge export` (it reads {result.run_dir}/best and evals.jsonl)")
    else:
        print("no candidate succeeded; see the errors in evals.jsonl")
    return 0


def resume_command(args: argparse.Namespace) -> str:
    """The ``dfsmerge search`` command line that continues the run of ``args`` (the same flags, plus --resume)."""
    import shlex

    words = ["dfsmerge", "search", args.config, "--out", args.out]
    for flag in ("seed", "max_evals", "max_generations", "time_limit", "backend", "address", "workers", "device",
                 "zoo_dir", "max_memory"):
        if getattr(args, flag, None) is not None:
            words += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    for path in args.task_path or ():
        words += ["--task-path", path]
    words += ["--quiet"] * bool(args.quiet) + ["--resume"]
    return shlex.join(words)


def inspect_command(args: argparse.Namespace) -> int:
    """Handler of ``dfsmerge inspect``."""
    from dfsmerge.analysis.ablation import run_significance
    from dfsmerge.report import describe_best, load_evals, summarize, write_report

    out = write_report(args.run, significance=run_significance if args.significance else None)
    s = summarize(load_evals(args.run))
    best = s["best"]
    print(f"{s['n']} evaluations ({s['failed']} failed, {s['infeasible']} infeasible, {s['cached']} cached) in "
          f"{s['generations']} generations")
    if best is not None:
        print(f"best {describe_best(best)} (eval id {best['id']}; minimised fitness {best['fitness']:.6g})")
    print(f"report: {out / 'report.md'}")
    return 0
