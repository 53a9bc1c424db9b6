"""``dfsmerge search`` and ``dfsmerge inspect``: argument parsing and calls into the library (no logic here).

``dfsmerge/cli.py`` adds both sub-commands (each sets ``handler=`` via ``set_defaults``) and dispatches
``args.handler(args)``.
"""

from __future__ import annotations

import argparse
import logging
import sys


def add_search_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``search`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser("search", help="evolve a merge (PS, DFS, staged or joint) and write a run directory",
                              description="Run an explicit, checkpointed evolutionary search. Flags override the "
                              "config file; a killed run continues with --resume.")
    p.add_argument("config", help="search config YAML (dfsmerge form, or a mergekit-evolve config)")
    p.add_argument("--out", required=True, help="run directory (new and empty unless --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--seed", type=int, default=None, help="override seed")
    p.add_argument("--max-evals", type=int, default=None,
                   help="override budget.max_evals (and stage2.budget.max_evals)")
    p.add_argument("--max-generations", type=int, default=None,
                   help="override budget.max_generations (and stage2.budget.max_generations)")
    p.add_argument("--time-limit", type=float, default=None, help="override budget.time_limit (and stage2's; seconds)")
    p.add_argument("--backend", choices=("local", "ray"), default=None, help="override backend")
    p.add_argument("--address", default=None, help="Ray cluster address (with --backend ray)")
    p.add_argument("--workers", type=int, default=None, help="Ray actors (default: one per GPU, else per CPU)")
    p.add_argument("--device", default=None, help="override device (cpu, cuda, cuda:N, auto)")
    p.add_argument("--task-path", action="append", default=None,
                   help="extra lm-eval task directory (repeatable; mergekit-evolve's --task-search-path)")
    p.add_argument("--zoo-dir", default=None, help="toy zoo directory for zoo:<name> models")
    p.add_argument("--quiet", action="store_true", help="no progress bar; one log line per generation")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory a worker may hold, e.g. 16GB (default: the machine's); a larger estimate is refused")
    p.set_defaults(handler=search_command)
    return p


def add_inspect_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``inspect`` subcommand (re-draws ``RUN/report`` and prints the summary)."""
    p = subparsers.add_parser("inspect", help="write the report of a search run (also while it runs)")
    p.add_argument("run", help="run directory of `dfsmerge search`")
    p.add_argument("--significance", action="store_true",
                   help="rescore the best, the start and each source and report paired tests (loads the models)")
    p.set_defaults(handler=inspect_command)
    return p


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
