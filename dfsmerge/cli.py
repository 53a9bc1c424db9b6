"""``dfsmerge`` command line: parses arguments and calls the library (no logic lives here).

User errors (:class:`dfsmerge.errors.DfsmergeError`) are printed on one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable, Sequence

from dfsmerge.errors import DfsmergeError


def _shared_options() -> dict[str, argparse.ArgumentParser]:
    """The options several subcommands take, each defined once as an argparse parent parser."""
    def parent(*flags: str, **kwargs) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(add_help=False)
        p.add_argument(*flags, **kwargs)
        return p

    return {
        "quiet": parent("--quiet", action="store_true", help="no progress bar or progress lines"),
        "force": parent("--force", action="store_true", help="replace what the output directory holds"),
        "allow_pickle": parent("--allow-pickle", action="store_true",
                               help="allow *.bin checkpoints (loaded with weights_only=True)"),
        "max_shard_size": parent("--max-shard-size", default="5GB", help="largest output shard (default 5GB)"),
        "max_memory": parent("--max-memory", default=None, metavar="SIZE",
                             help="memory it may take (a search: each worker), e.g. 16GB (default: the machine's); "
                                  "a larger estimate is refused"),
        "seed": parent("--seed", type=int, default=0, help="seed of every random draw (default 0)"),
        "device": parent("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)"),
    }


def _add(sub, name: str, handler: Callable[[argparse.Namespace], int | None], *, help: str, examples: Sequence[str],
         description: str | None = None, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """A subcommand's parser: its ``handler`` (how :func:`main` dispatches), its shared options, and a help that
    ends with examples."""
    description = description or f"{help[:1].upper()}{help[1:]}."
    p = sub.add_parser(name, help=help, description=textwrap.fill(description, 100),
                       parents=list(parents), formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n" + "\n".join(f"  {e}" for e in examples))
    p.set_defaults(handler=handler)
    return p


def build_parser() -> argparse.ArgumentParser:
    from dfsmerge.export.cli import run_export
    from dfsmerge.search.cli import inspect_command, search_command

    o = _shared_options()
    p = argparse.ArgumentParser(prog="dfsmerge", description="Evolutionary model merging in parameter and "
                                "data-flow space.", formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  ./scripts/demo\n  dfsmerge search configs/toy/joint.yaml --out "
                                "runs/toy_joint\n\n`dfsmerge COMMAND --help` shows a command's options and examples.")
    sub = p.add_subparsers(dest="command", required=True)

    m = _add(sub, "merge", _merge, help="run a mergekit YAML recipe",
             parents=[o[k] for k in ("device", "seed", "allow_pickle", "force", "max_shard_size", "max_memory",
                                     "quiet")],
             examples=["dfsmerge merge configs/real/experts/recipes/ties.yaml out/ties",
                       "dfsmerge merge recipe.yaml merged --device cuda --seed 1 --max-memory 16GB"])
    m.add_argument("config", help="mergekit YAML recipe")
    m.add_argument("out", help="output directory")
    m.add_argument("--workers", type=int, default=None, help="tensors merged at once (default 2 on CPU, 1 on CUDA)")

    s = _add(sub, "search", search_command,
             help="evolve a merge (PS, DFS, staged or joint) and write a run directory",
             description="Run an explicit, checkpointed evolutionary search. Flags override the config file; a "
                         "killed run continues with --resume. With --quiet, one log line per generation instead of "
                         "the progress bar.",
             parents=[o["max_memory"], o["quiet"]],
             examples=["dfsmerge search configs/toy/joint.yaml --out runs/toy_joint",
                       "dfsmerge search configs/toy/joint.yaml --out runs/toy_joint --resume"])
    s.add_argument("config", help="search config YAML (dfsmerge form, or a mergekit-evolve config)")
    s.add_argument("--out", required=True, help="run directory (new and empty unless --resume)")
    s.add_argument("--resume", action="store_true", help="continue the run in --out")
    s.add_argument("--seed", type=int, default=None, help="override seed")
    s.add_argument("--max-evals", type=int, default=None,
                   help="override budget.max_evals (and stage2.budget.max_evals)")
    s.add_argument("--max-generations", type=int, default=None,
                   help="override budget.max_generations (and stage2.budget.max_generations)")
    s.add_argument("--time-limit", type=float, default=None, help="override budget.time_limit (and stage2's; seconds)")
    s.add_argument("--backend", choices=("local", "ray"), default=None, help="override backend")
    s.add_argument("--address", default=None, help="Ray cluster address (with --backend ray)")
    s.add_argument("--workers", type=int, default=None, help="Ray actors (default: one per GPU, else per CPU)")
    s.add_argument("--device", default=None, help="override device (cpu, cuda, cuda:N, auto)")
    s.add_argument("--task-path", action="append", default=None,
                   help="extra lm-eval task directory (repeatable; mergekit-evolve's --task-search-path)")
    s.add_argument("--zoo-dir", default=None, help="toy zoo directory for zoo:<name> models")

    i = _add(sub, "inspect", inspect_command, help="write the report of a search run (also while it runs)",
             examples=["dfsmerge inspect runs/toy_joint", "dfsmerge inspect runs/toy_joint --significance"])
    i.add_argument("run", help="run directory of `dfsmerge search`")
    i.add_argument("--significance", action="store_true",
                   help="rescore the best, the start and each source and report paired tests (loads the models)")

    x = _add(sub, "export", run_export, help="export a layer path or a search candidate as a Hugging Face model",
             parents=[o[k] for k in ("seed", "allow_pickle", "force", "max_shard_size")],
             examples=["dfsmerge export runs/toy_joint --candidate best --out runs/toy_joint/model",
                       "dfsmerge export --plan plan.yaml --out merged --format gguf --quant q8_0"])
    x.add_argument("run_dir", nargs="?", help="a search run directory (with --candidate)")
    x.add_argument("--plan", help="a plan YAML (models, base, optional embed, path) to export instead of a run "
                                  "candidate; relative model paths resolve against the cwd, then the plan's folder. "
                                  "A model mapped to '@ps' is a run candidate's PS merge: export those with RUN_DIR")
    x.add_argument("--candidate", default="best", help="best (default) or an id of RUN_DIR/evals.jsonl")
    x.add_argument("--out", required=True, help="output directory")
    x.add_argument("--format", choices=("folded", "compact", "gguf"), default="folded",
                   help="folded: plain checkpoint, scales folded into weights (default); compact: unique layers + "
                        "path, needs trust_remote_code=True; gguf: one llama.cpp file + Ollama Modelfile")
    x.add_argument("--quant", choices=("f32", "f16", "bf16", "q8_0"), default=None,
                   help="GGUF tensor type of the matrices (--format gguf; default f32)")
    x.add_argument("--dtype", default=None, help="output dtype (default: the base model's)")

    e = _add(sub, "eval", _eval, help="score a checkpoint, hub id, zoo:<name> or plan file on lm-eval tasks; with "
             "two or more, also their paired differences (McNemar / paired bootstrap) against the first",
             parents=[o[k] for k in ("device", "allow_pickle", "max_memory")],
             examples=["dfsmerge eval HuggingFaceTB/SmolLM2-135M --tasks arc_easy --limit 100",
                       "dfsmerge eval runs/toy_joint/model zoo:math --zoo zoo --tasks zoo_math_b --split test "
                       "--native"])
    e.add_argument("model", metavar="MODEL_OR_PLAN", nargs="+")
    e.add_argument("--tasks", required=True, help="comma-separated task names")
    e.add_argument("--task-search-path", action="append", default=[], metavar="DIR",
                   help="directory of custom task YAMLs (repeatable)")
    e.add_argument("--zoo", default=None, metavar="DIR", help="toy zoo: resolves zoo:<name> and adds its tasks")
    e.add_argument("--split", default=None, help="split to score (default: the task's test split)")
    e.add_argument("--limit", type=float, default=None, help="documents per task (or a fraction < 1)")
    e.add_argument("--native", action="store_true", help="the fast native evaluator instead of lm-eval's loop")
    e.add_argument("--batch-size", type=int, default=16, help="documents per forward batch (default 16)")
    e.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    e.add_argument("--json", action="store_true", help='print {"results": {task: {metric: value}}}')
    # lm_eval's own prompt and generation flags (same names and meaning as `lm_eval run`)
    e.add_argument("--apply_chat_template", action="store_true", help="render prompts with the model's chat template")
    e.add_argument("--system_instruction", default=None, help="system message before every prompt")
    e.add_argument("--fewshot_as_multiturn", nargs="?", const=True, default=None,
                   type=lambda x: x.lower() in ("true", "1", "yes"),
                   help="few-shot examples as chat turns (default: on with --apply_chat_template)")
    e.add_argument("--gen_kwargs", nargs="+", default=None, metavar="KEY=VALUE",
                   help="generation overrides: max_gen_toks=N, until=[...], do_sample=False")
    e.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples (default: the task's)")

    a = _add(sub, "ablate", _ablate, help="score a run's candidate and its ablations (scales to 1, each step left "
             "out, repeats removed, PS/DFS parts alone, the sources) with paired tests against it",
             parents=[o["quiet"]],
             examples=["dfsmerge ablate runs/demo --split test   # writes runs/demo/ablation/",
                       "dfsmerge ablate runs/demo --candidate 17 --out ablation-17"])
    a.add_argument("run", help="run directory of a `dfsmerge search`")
    a.add_argument("--candidate", default="best", help="best (default) or an id of evals.jsonl")
    a.add_argument("--split", default=None, help="split to score (default: each objective's own)")
    a.add_argument("--out", default=None, help="output directory (default RUN/ablation)")

    mo = _add(sub, "moe", _moe, help="assemble a mixture of experts from dense models (mergekit-moe's YAML)",
              parents=[o[k] for k in ("seed", "force", "max_shard_size", "quiet")],
              examples=["dfsmerge moe moe.yaml out/moe", "dfsmerge moe moe.yaml out/moe --seed 1 --force"])
    mo.add_argument("config", help="mergekit-moe YAML")
    mo.add_argument("out", help="output directory")
    mo.add_argument("--allow-all-same", action="store_true", help="allow every expert to be the same model")

    xl = _add(sub, "extract-lora", _extract_lora, help="a fine-tune's difference from its base as a PEFT LoRA adapter",
              parents=[o[k] for k in ("device", "allow_pickle", "force", "quiet")],
              examples=["dfsmerge extract-lora real:smollm2-fra/math real:smollm2-135m out/math-lora --rank 32",
                        "dfsmerge extract-lora ./my-finetune HuggingFaceTB/SmolLM2-135M lora --rank 16 "
                        "--exclude lm_head"])
    xl.add_argument("finetuned", help="fine-tuned model (directory or hub id)")
    xl.add_argument("base", help="its base model")
    xl.add_argument("out", help="adapter directory to write")
    xl.add_argument("--rank", type=int, required=True, help="largest LoRA rank")
    xl.add_argument("--exclude", "-e", action="append", default=[], metavar="REGEX",
                    help="skip modules whose name matches (repeatable)")
    xl.add_argument("--include", "-i", action="append", default=[], metavar="REGEX",
                    help="decompose only modules whose name matches (repeatable)")
    xl.add_argument("--save-module", action="append", default=[], metavar="NAME",
                    help="save this module at full rank (repeatable)")
    xl.add_argument("--embed-lora", action="store_true", help="decompose embeddings instead of saving them whole")
    xl.add_argument("--no-distribute-scale", action="store_true", help="singular values all into lora_A")
    xl.add_argument("--sv-epsilon", type=float, default=0.0, help="drop singular values not above this")
    xl.add_argument("--skip-undecomposable", action="store_true", help="skip norms instead of saving them whole")
    xl.add_argument("--lora-bias", action="store_true", help="set PEFT's lora_bias so bias deltas are applied")

    c = _add(sub, "convert", _convert, help="dequantise a GGUF file into a Hugging Face checkpoint directory",
             parents=[o["force"]],
             examples=["dfsmerge convert model-q8_0.gguf out/model",
                       "dfsmerge convert model.gguf out/model --dtype bfloat16"])
    c.add_argument("gguf", metavar="MODEL.gguf")
    c.add_argument("out", help="output directory")
    c.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the saved weights (default float32)")

    z = sub.add_parser("zoo", help="the toy zoo: tiny models trained on CPU", description="The toy zoo: tiny models "
                       "trained on CPU.", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  dfsmerge zoo build\n  dfsmerge zoo build --real smollm2-fra")
    zsub = z.add_subparsers(dest="zoo_command", required=True)
    zb = _add(zsub, "build", _zoo_build, help="train the toy zoo into DIR (reuses a finished build)",
              parents=[o[k] for k in ("seed", "force", "quiet")],
              examples=["dfsmerge zoo build zoo --size tiny", "dfsmerge zoo build --real smollm2-fra"])
    zb.add_argument("dir", nargs="?", default=None, help="zoo directory (default: $DFSMERGE_ZOO or the cache)")
    zb.add_argument("--size", default="default",
                    help="tiny (seconds, for tests), default (minutes), or the earlier recipes l0 and round3")
    zb.add_argument("--threads", type=int, default=None, help="torch CPU threads while training")
    zb.add_argument("--real", default=None, metavar="SET",
                    help="instead of the toy zoo, fine-tune a real base into the math and language experts of SET "
                         "(e.g. smollm2-fra; about an hour on 2 cores, resumable, cached; models real:SET/math, "
                         "real:SET/lang)")
    return p


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


def _ablate(args: argparse.Namespace) -> int:
    from dfsmerge.analysis.ablation import run_ablation

    out = run_ablation(args.run, candidate=args.candidate, split=args.split, out=args.out,
                       log=None if args.quiet else print)
    print(f"ablation table: {out / 'table.md'} (also table.json, contribution.png, rows/)")
    return 0


def _zoo_build(args: argparse.Namespace) -> int:
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


def _moe(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dfsmerge.tools.moe import build_moe, load_moe_config

    config = load_moe_config(args.config)
    out = build_moe(config, args.out, seed=args.seed, allow_all_same=args.allow_all_same, force=args.force,
                    max_shard_size=args.max_shard_size, progress=not args.quiet,
                    recipe_text=Path(args.config).read_text())
    print(f"mixture of experts written to {out}")
    return 0


def _extract_lora(args: argparse.Namespace) -> int:
    from dfsmerge.tools.lora import extract_lora

    out = extract_lora(args.finetuned, args.base, args.out, rank=args.rank, exclude=args.exclude,
                       include=args.include, modules_to_save=args.save_module, embed_lora=args.embed_lora,
                       distribute_scale=not args.no_distribute_scale, sv_epsilon=args.sv_epsilon,
                       skip_undecomposable=args.skip_undecomposable, lora_bias=args.lora_bias, device=args.device,
                       allow_pickle=args.allow_pickle, force=args.force, progress=not args.quiet)
    print(f"LoRA adapter written to {out}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from dfsmerge.io.dtypes import torch_dtype
    from dfsmerge.io.gguf import convert_gguf

    out = convert_gguf(args.gguf, args.out, dtype=torch_dtype(args.dtype), force=args.force)
    print(f"converted checkpoint written to {out}")
    return 0


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
    try:
        rc = int(args.handler(args) or 0)
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
