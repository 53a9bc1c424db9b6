"""``dfsmerge`` command line: parses arguments and calls the library (no logic lives here).

User errors (:class:`dfsmerge.errors.DfsmergeError`) are printed on one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from dfsmerge.errors import DfsmergeError

_COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {}


def _command(name: str):
    def deco(fn):
        _COMMANDS[name] = fn
        return fn
    return deco


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dfsmerge", description="Evolutionary model merging in parameter and "
                                "data-flow space.")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="run a mergekit YAML recipe")
    m.add_argument("config", help="mergekit YAML recipe")
    m.add_argument("out", help="output directory")
    m.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    m.add_argument("--seed", type=int, default=0, help="seed of the random methods (default 0)")
    m.add_argument("--allow-pickle", action="store_true", help="allow *.bin checkpoints (weights_only=True)")
    m.add_argument("--force", action="store_true", help="replace an existing output directory")
    m.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    m.add_argument("--workers", type=int, default=None, help="tensors merged at once (default 2 on CPU, 1 on CUDA)")
    m.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory the merge may take, e.g. 16GB (default: the machine's); a larger estimate is refused")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    mo = sub.add_parser("moe", help="assemble a mixture of experts from dense models (mergekit-moe's YAML)")
    mo.add_argument("config", help="mergekit-moe YAML")
    mo.add_argument("out", help="output directory")
    mo.add_argument("--seed", type=int, default=0, help="seed of random gates and expert noise (default 0)")
    mo.add_argument("--allow-all-same", action="store_true", help="allow every expert to be the same model")
    mo.add_argument("--force", action="store_true", help="replace an existing output directory")
    mo.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    mo.add_argument("--quiet", action="store_true", help="no progress bar")
    x = sub.add_parser("extract-lora", help="a fine-tune's difference from its base as a PEFT LoRA adapter")
    x.add_argument("finetuned", help="fine-tuned model (directory or hub id)")
    x.add_argument("base", help="its base model")
    x.add_argument("out", help="adapter directory to write")
    x.add_argument("--rank", type=int, required=True, help="largest LoRA rank")
    x.add_argument("--exclude", "-e", action="append", default=[], metavar="REGEX",
                   help="skip modules whose name matches (repeatable)")
    x.add_argument("--include", "-i", action="append", default=[], metavar="REGEX",
                   help="decompose only modules whose name matches (repeatable)")
    x.add_argument("--save-module", action="append", default=[], metavar="NAME",
                   help="save this module at full rank (repeatable)")
    x.add_argument("--embed-lora", action="store_true", help="decompose embeddings instead of saving them whole")
    x.add_argument("--no-distribute-scale", action="store_true", help="singular values all into lora_A")
    x.add_argument("--sv-epsilon", type=float, default=0.0, help="drop singular values not above this")
    x.add_argument("--skip-undecomposable", action="store_true", help="skip norms instead of saving them whole")
    x.add_argument("--lora-bias", action="store_true", help="set PEFT's lora_bias so bias deltas are applied")
    x.add_argument("--device", default="cpu", help="device of the SVDs (default cpu)")
    x.add_argument("--allow-pickle", action="store_true", help="allow *.bin checkpoints (weights_only=True)")
    x.add_argument("--force", action="store_true", help="replace an existing output directory")
    x.add_argument("--quiet", action="store_true", help="no progress bar")
    e = sub.add_parser("eval", help="score a checkpoint, hub id, zoo:<name> or plan file on lm-eval tasks; with "
                       "two or more, also their paired differences (McNemar / paired bootstrap) against the first")
    e.add_argument("model", metavar="MODEL_OR_PLAN", nargs="+")
    e.add_argument("--tasks", required=True, help="comma-separated task names")
    e.add_argument("--task-search-path", action="append", default=[], metavar="DIR",
                   help="directory of custom task YAMLs (repeatable)")
    e.add_argument("--zoo", default=None, metavar="DIR", help="toy zoo: resolves zoo:<name> and adds its tasks")
    e.add_argument("--split", default=None, help="split to score (default: the task's test split)")
    e.add_argument("--limit", type=float, default=None, help="documents per task (or a fraction < 1)")
    e.add_argument("--native", action="store_true", help="the fast native evaluator instead of lm-eval's loop")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--device", default="cpu")
    e.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    e.add_argument("--allow-pickle", action="store_true", help="allow *.bin checkpoints (weights_only=True)")
    e.add_argument("--json", action="store_true", help='print {"results": {task: {metric: value}}}')
    e.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory the model may take, e.g. 16GB (default: the machine's); a larger estimate is refused")
    # lm_eval's own prompt and generation flags (same names and meaning as `lm_eval run`)
    e.add_argument("--apply_chat_template", action="store_true", help="render prompts with the model's chat template")
    e.add_argument("--system_instruction", default=None, help="system message before every prompt")
    e.add_argument("--fewshot_as_multiturn", nargs="?", const=True, default=None,
                   type=lambda x: x.lower() in ("true", "1", "yes"),
                   help="few-shot examples as chat turns (default: on with --apply_chat_template)")
    e.add_argument("--gen_kwargs", nargs="+", default=None, metavar="KEY=VALUE",
                   help="generation overrides: max_gen_toks=N, until=[...], do_sample=False")
    e.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples (default: the task's)")

    a = sub.add_parser("ablate", help="score a run's candidate and its ablations (scales to 1, each step left out, "
                       "repeats removed, PS/DFS parts alone, the sources) with paired tests against it",
                       description="example: dfsmerge ablate runs/demo --split test  (writes runs/demo/ablation/)")
    a.add_argument("run", help="run directory of a `dfsmerge search`")
    a.add_argument("--candidate", default="best", help="best (default) or an id of evals.jsonl")
    a.add_argument("--split", default=None, help="split to score (default: each objective's own)")
    a.add_argument("--out", default=None, help="output directory (default RUN/ablation)")
    a.add_argument("--quiet", action="store_true", help="no progress lines")

    c = sub.add_parser("convert", help="dequantise a GGUF file into a Hugging Face checkpoint directory")
    c.add_argument("gguf", metavar="MODEL.gguf")
    c.add_argument("out", help="output directory")
    c.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the saved weights (default float32)")
    c.add_argument("--force", action="store_true", help="replace an existing output directory")

    from dfsmerge.export.cli import add_export_parser
    from dfsmerge.search.cli import add_inspect_parser, add_search_parser

    add_search_parser(sub)
    add_inspect_parser(sub)
    add_export_parser(sub)

    z = sub.add_parser("zoo", help="the toy zoo: tiny models trained on CPU")
    zsub = z.add_subparsers(dest="zoo_command", required=True)
    zb = zsub.add_parser("build", help="train the toy zoo into DIR (reuses a finished build)")
    zb.add_argument("dir", nargs="?", default=None, help="zoo directory (default: $DFSMERGE_ZOO or the cache)")
    zb.add_argument("--size", default="default",
                    help="tiny (seconds, for tests), default (minutes), or the earlier recipes l0 and round3")
    zb.add_argument("--seed", type=int, default=0)
    zb.add_argument("--threads", type=int, default=None, help="torch CPU threads while training")
    zb.add_argument("--force", action="store_true", help="replace a directory holding something else")
    zb.add_argument("--quiet", action="store_true", help="no progress bar")
    zb.add_argument("--real", default=None, metavar="SET",
                    help="instead of the toy zoo, fine-tune a real base into the math and language experts of SET "
                         "(e.g. smollm2-fra; about an hour on 2 cores, resumable, cached; models real:SET/math, "
                         "real:SET/lang)")
    return p


@_command("export")
def _export(args: argparse.Namespace) -> int:
    from dfsmerge.export.cli import run_export

    return run_export(args)


def _eval_options(args: argparse.Namespace) -> dict:
    """The lm_eval-style prompt/generation flags as ObjectiveConfig fields (checked before any model is loaded)."""
    from pydantic import ValidationError

    from dfsmerge.errors import ConfigError
    from dfsmerge.objectives.config import GenKwargs, ObjectiveConfig

    opts = dict(apply_chat_template=args.apply_chat_template, system_instruction=args.system_instruction,
                fewshot_as_multiturn=args.fewshot_as_multiturn, num_fewshot=args.num_fewshot)
    try:
        opts["gen_kwargs"] = GenKwargs.parse(args.gen_kwargs)
        ObjectiveConfig(name="check", **opts)
    except (ValueError, ValidationError) as e:
        errs = e.errors() if isinstance(e, ValidationError) else [{"loc": (), "msg": str(e)}]
        where = ".".join(str(x) for x in errs[0]["loc"]) or "gen_kwargs"
        raise ConfigError(f"dfsmerge eval: {where}: {errs[0]['msg']} (gen_kwargs takes max_gen_toks, until and "
                          "do_sample=False only)") from None
    return opts


@_command("eval")
def _eval(args: argparse.Namespace) -> int:
    import json

    from dfsmerge.io.dtypes import torch_dtype
    from dfsmerge.objectives import evaluate_model, format_table
    from dfsmerge.runtime.loading import load_model_or_plan

    options = _eval_options(args)
    if len(args.model) > 1 and any(v not in (None, False) for v in options.values()):
        from dfsmerge.errors import ConfigError

        raise ConfigError("dfsmerge eval: --apply_chat_template/--system_instruction/--fewshot_as_multiturn/"
                          "--gen_kwargs/--num_fewshot score one model at a time; give one MODEL, or put the "
                          "settings in the task YAML for a paired comparison")
    if len(args.model) > 1:  # several models: scored on the same documents, paired tests against the first
        from dfsmerge.analysis.experiment import compare

        cmp = compare(args.model, args.tasks, split=args.split, limit=args.limit, native=args.native,
                      task_paths=args.task_search_path, zoo=args.zoo, batch_size=args.batch_size, device=args.device,
                      dtype=args.dtype, allow_pickle=args.allow_pickle)
        print(json.dumps(cmp.to_json(), indent=2) if args.json else cmp.format())
        return 0
    args.model = args.model[0]
    paths = list(args.task_search_path)
    if args.zoo:
        from dfsmerge.zoo import load_zoo

        paths.append(str(load_zoo(args.zoo).task_dir))
    from dfsmerge.io.memory import check_memory, parse_memory
    from dfsmerge.runtime.memory import plan_or_model_estimate

    check_memory(plan_or_model_estimate(args.model, args.dtype), what=f"eval {args.model}", device=args.device,
                 budget=None if args.max_memory is None else parse_memory(args.max_memory))
    model, tokenizer = load_model_or_plan(args.model, device=args.device, dtype=torch_dtype(args.dtype),
                                          allow_pickle=args.allow_pickle, zoo_dir=args.zoo)
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    out = evaluate_model(model, tokenizer, [t.strip() for t in args.tasks.split(",") if t.strip()],
                         task_paths=paths, batch_size=args.batch_size, split=args.split, limit=limit,
                         native=args.native, **options)
    print(json.dumps(out, indent=2) if args.json else format_table(out))
    return 0


@_command("ablate")
def _ablate(args: argparse.Namespace) -> int:
    from dfsmerge.analysis.ablation import run_ablation

    out = run_ablation(args.run, candidate=args.candidate, split=args.split, out=args.out,
                       log=None if args.quiet else print)
    print(f"ablation table: {out / 'table.md'} (also table.json, contribution.png, rows/)")
    return 0


@_command("zoo")
def _zoo(args: argparse.Namespace) -> int:
    from dfsmerge.zoo import build_zoo, default_zoo_dir

    if args.real:
        from dfsmerge.zoo.experts import build_experts

        root = build_experts(args.real, root=args.dir, threads=args.threads, log=(lambda _m: None) if args.quiet
                             else print)
        print(f"experts ready at {root} (real:{args.real}/math, real:{args.real}/lang; tasks in {root}/tasks)")
        return 0
    out = args.dir or default_zoo_dir(args.size, args.seed)
    zoo = build_zoo(out, size=args.size, seed=args.seed, progress=not args.quiet, force=args.force,
                    threads=args.threads, log=None if args.quiet else print)
    print(f"zoo ready at {zoo.root}")
    return 0


@_command("moe")
def _moe(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dfsmerge.tools.moe import build_moe, load_moe_config

    config = load_moe_config(args.config)
    out = build_moe(config, args.out, seed=args.seed, allow_all_same=args.allow_all_same, force=args.force,
                    max_shard_size=args.max_shard_size, progress=not args.quiet,
                    recipe_text=Path(args.config).read_text())
    print(f"mixture of experts written to {out}")
    return 0


@_command("extract-lora")
def _extract_lora(args: argparse.Namespace) -> int:
    from dfsmerge.tools.lora import extract_lora

    out = extract_lora(args.finetuned, args.base, args.out, rank=args.rank, exclude=args.exclude,
                       include=args.include, modules_to_save=args.save_module, embed_lora=args.embed_lora,
                       distribute_scale=not args.no_distribute_scale, sv_epsilon=args.sv_epsilon,
                       skip_undecomposable=args.skip_undecomposable, lora_bias=args.lora_bias, device=args.device,
                       allow_pickle=args.allow_pickle, force=args.force, progress=not args.quiet)
    print(f"LoRA adapter written to {out}")
    return 0


@_command("convert")
def _convert(args: argparse.Namespace) -> int:
    from dfsmerge.io.dtypes import torch_dtype
    from dfsmerge.io.gguf import convert_gguf

    out = convert_gguf(args.gguf, args.out, dtype=torch_dtype(args.dtype), force=args.force)
    print(f"converted checkpoint written to {out}")
    return 0


@_command("merge")
def _merge(args: argparse.Namespace) -> int:
    from dfsmerge.io.memory import parse_memory
    from dfsmerge.recipe.config import load_merge_config
    from dfsmerge.recipe.executor import run_merge

    max_memory = None if args.max_memory is None else parse_memory(args.max_memory)
    config = load_merge_config(args.config)
    out = run_merge(config, args.out, device=args.device, seed=args.seed, allow_pickle=args.allow_pickle,
                    force=args.force, max_shard_size=args.max_shard_size, progress=not args.quiet,
                    workers=args.workers, max_memory=max_memory)
    print(f"merged model written to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = _COMMANDS.get(args.command) or args.handler  # search/inspect bring their own handlers
    try:
        rc = int(handler(args) or 0)
    except DfsmergeError as e:
        print(f"dfsmerge: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dfsmerge: interrupted", file=sys.stderr)
        return 130
    if argv is None and args.command == "search" and rc in (130, 143):  # the process is ours, and paused
        _exit_now(rc)
    return rc


def _exit_now(rc: int) -> None:
    """End the process without the interpreter's teardown. A paused search has written its checkpoint, closed its
    files and released its lock; the teardown's garbage collection over torch's and transformers' objects would
    add seconds (5 to 9 s measured on a loaded 2-core machine) to a pause that should end with its candidate."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
