"""Shared prompt prefixes on a real model (issue 18): a few-shot task whose documents all start with the same
description and ``first_n`` examples (as MMLU's 5-shot prompts do), scored by the native evaluator with
``share_prompts`` off and on.

The task: configs/real/tasks' capitals questions with a description and 5 ``first_n`` examples (drawn from the test
split; the validation split is scored). Reported: tokens through the model (a forward pre-hook), forward calls,
wall time (median of ``--repeats``), acc, the largest per-request loglikelihood difference between the two runs,
and lm-eval's own acc through the adapter (the harness) for reference.

    python benchmarks/shared_prompts.py [--model real:smollm2-135m] [--shots 5] [--batch-size 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASK = "real_capitals_fewshot"


def write_task(d: Path, shots: int) -> None:
    data = ROOT / "configs/real/tasks"
    (d / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {data / 'real_capitals_validation.jsonl'}\n    test: {data / 'real_capitals_test.jsonl'}\n"
        "output_type: multiple_choice\nvalidation_split: validation\nfewshot_split: test\n"
        "description: 'Each line names a country and its capital city. Complete the last line with the "
        "capital.\\n\\n'\n"
        f"num_fewshot: {shots}\nfewshot_config:\n  sampler: first_n\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\n"
        "target_delimiter: ' '\nfewshot_delimiter: '\\n'\nmetric_list:\n  - metric: acc\n"
        "    aggregation: mean\n    higher_is_better: true\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="real:smollm2-135m")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dfsmerge.io.realmodels import real_model_dir
    from dfsmerge.objectives import EvalConfig, ObjectiveConfig, TaskSuite
    from dfsmerge.objectives.lm_adapter import DfsLM
    from dfsmerge.objectives.tasks import simple_evaluate

    path = real_model_dir(args.model.removeprefix("real:")) if args.model.startswith("real:") else args.model
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    d = Path(tempfile.mkdtemp(prefix="dfs_shared_prompts_"))
    write_task(d, args.shots)
    seen: list[int] = []
    model.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["input_ids"]).numel()),
                                    with_kwargs=True)
    rows = {}
    for share in (False, True):
        cfg = EvalConfig(objectives=(ObjectiveConfig(name=TASK, split="validation", native=True),),
                         task_paths=(str(d),), batch_size=args.batch_size, share_prompts=share)
        native = TaskSuite(cfg, tok).prepared[0].native
        times = []
        for _ in range(args.repeats):
            seen.clear()
            calls = native.scorer.forward_calls
            t0 = time.perf_counter()
            with torch.no_grad():
                res = native.evaluate(model)
            times.append(time.perf_counter() - t0)
            calls = native.scorer.forward_calls - calls
        with torch.no_grad():
            lls = native._loglikelihoods(model)
        rows[share] = dict(tokens=sum(seen), calls=calls, wall=statistics.median(times), acc=res["acc,none"],
                           lls=lls, shared=len(native.shared), docs=len(native.docs),
                           prompt=sum(len(r[1]) for r in native.requests) / len(native.requests))
    off, on = rows[False], rows[True]
    diff = max(abs(a[0] - b[0]) for a, b in zip(off["lls"], on["lls"], strict=True))
    harness = simple_evaluate(DfsLM(model, tok, batch_size=args.batch_size), [TASK], task_paths=[d],
                              bootstrap_iters=0, log_samples=False)["results"][TASK]["acc,none"]
    print(f"{args.model}, {TASK}: {on['docs']} documents, {args.shots}-shot first_n, mean context "
          f"{off['prompt']:.0f} tokens of which {on['shared']} shared; batch {args.batch_size}, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print("| share_prompts | tokens through the model | forward calls | wall s | acc |\n|---|---|---|---|---|")
    for k, r in (("off", off), ("on", on)):
        print(f"| {k} | {r['tokens']} | {r['calls']} | {r['wall']:.2f} | {r['acc']:.4f} |")
    print(f"ratios off/on: tokens {off['tokens'] / on['tokens']:.2f}x, wall {off['wall'] / on['wall']:.2f}x; "
          f"largest loglikelihood difference {diff:.2e}; harness acc {harness:.4f}")


if __name__ == "__main__":
    main()
