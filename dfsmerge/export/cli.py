"""``dfsmerge export``: argument parsing for the lead's CLI (no logic here).

Usage::

    dfsmerge export --plan PLAN.yaml --out DIR [--format folded|compact|gguf] [--quant f32|f16|bf16|q8_0] [--force]
    dfsmerge export RUN_DIR --candidate best|ID --out DIR [--format folded|compact|gguf] [--force]

Wire it with ``add_export_parser(subparsers)``; the parser's ``func`` default is :func:`run_export`.
"""

from __future__ import annotations

import argparse

from dfsmerge.errors import ConfigError


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``export`` sub-command to an ``argparse`` sub-parsers object and return its parser."""
    p = subparsers.add_parser("export", help="export a layer path or a search candidate as a Hugging Face model")
    p.add_argument("run_dir", nargs="?", help="a search run directory (with --candidate)")
    p.add_argument("--plan", help="a plan YAML (models, base, optional embed, path) to export instead of a run "
                                  "candidate; relative model paths resolve against the cwd, then the plan's folder. "
                                  "A model mapped to '@ps' is a run candidate's PS merge: export those with RUN_DIR")
    p.add_argument("--candidate", default="best", help="best (default) or an id of RUN_DIR/evals.jsonl")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", choices=("folded", "compact", "gguf"), default="folded",
                   help="folded: plain checkpoint, scales folded into weights (default); compact: unique layers + "
                        "path, needs trust_remote_code=True; gguf: one llama.cpp file + Ollama Modelfile")
    p.add_argument("--quant", choices=("f32", "f16", "bf16", "q8_0"), default=None,
                   help="GGUF tensor type of the matrices (--format gguf; default f32)")
    p.add_argument("--dtype", default=None, help="output dtype (default: the base model's)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    p.add_argument("--allow-pickle", action="store_true", help="allow *.bin sources (weights_only=True)")
    p.add_argument("--seed", type=int, default=0, help="seed of the PS merge's random methods (default 0)")
    p.set_defaults(func=run_export)
    return p


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
