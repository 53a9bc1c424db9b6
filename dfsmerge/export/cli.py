"""The handler of ``dfsmerge export``: a call into the library (no logic here).

``dfsmerge/cli.py`` parses the subcommand and dispatches to :func:`run_export` (``set_defaults(handler=...)``).
"""

from __future__ import annotations

import argparse

from dfsmerge.errors import ConfigError


def run_export(args: argparse.Namespace) -> int:
    """Handler of ``dfsmerge export``; prints the output path. Raises DfsmergeError subclasses for user errors."""
    from dfsmerge.export import export_candidate, export_plan

    common = dict(format=args.format, dtype=args.dtype, force=args.force, max_shard_size=args.max_shard_size,
                  allow_pickle=args.allow_pickle)
    if args.quant is not None:
        if args.format != "gguf":
            raise ConfigError(f"--quant {args.quant} applies to --format gguf only (got --format {args.format})")
        common["quant"] = args.quant
    if (args.plan is None) == (args.run_dir is None):
        raise ConfigError("dfsmerge export: give either --plan PLAN.yaml or a RUN_DIR (with --candidate), not "
                          f"{'both' if args.plan else 'neither'}")
    if args.plan is not None:
        out = export_plan(args.plan, args.out, **common)
    else:
        out = export_candidate(args.run_dir, args.candidate, args.out, ps_seed=args.seed, **common)
    print(f"exported {args.format} model to {out}")
    return 0
