"""Peak memory of one merged tensor, per merge method, against the executor's cost model.

    python benchmarks/merge_memory.py [--models 2,3,5] [--methods ties,ram] [--out benchmarks/results/merge_memory.md]

For every registered method and number of inputs, a child process plans a recipe over random bf16 Llama-shaped
checkpoints (embedding 8192x1024), merges its largest tensor once whole and once in 32 MiB row chunks, and reads its
own peak resident set (VmHWM, reset before each merge through /proc/self/clear_refs). Printed: the measured peak
increase over the cost model (``dfsmerge.recipe.executor._working_bytes``: the whole tensor, or the chunk's rows)
and over the estimate the memory preflight uses (``dfsmerge.recipe.executor.job_memory``); the preflight's
``_PEAK_FACTOR`` table is the largest ratio per method with a 20% margin, rounded up to 0.05.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HIDDEN, INTER, VOCAB = 1024, 2048, 8192
CHUNK = 32 << 20

CHILD = r'''
import json, math, sys
import dfsmerge.recipe.executor as R
from dfsmerge.recipe.config import MergeConfig

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

rec, chunk = json.loads(sys.argv[1]), int(sys.argv[2])
cfg = MergeConfig.model_validate(rec)
plan = R.plan_merge(cfg, R.open_models(cfg))
size = lambda j: math.prod(plan.readers[j.inputs[0][0]].get_shape(j.inputs[0][1]))
job = max(plan.jobs, key=size)
R.execute_job(plan, min(plan.jobs, key=size), chunk_bytes=None)  # code paths and allocator warmed up
out = {"inputs": len(job.inputs), "numel": size(job)}
for mode, cb in (("chunked", chunk), ("whole", None)):
    chunked = R.job_chunking(plan, job, chunk_bytes=cb)
    est, how = R.job_memory(plan, job, chunk_bytes=cb)
    base = status("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    if chunked is None:
        t = R.execute_job(plan, job, chunk_bytes=None)
        del t
        model = R._working_bytes(size(job), len(job.inputs))
    else:
        chunker, rows = chunked
        parts = 0
        for _, part in R.chunk_rows(plan, job, chunker, rows):
            parts += 1
            del part
        shape = plan.readers[job.inputs[0][0]].get_shape(job.inputs[0][1])
        model = rows * R._working_bytes(math.prod(shape[1:]), len(job.inputs))
        if parts == 1 and rows < shape[0]:  # the chunker's statistics asked for the whole tensor (ties)
            how, model = "whole (ties)", R._working_bytes(size(job), len(job.inputs))
    out[mode] = {"how": how, "peak": status("VmHWM:") - base, "model": model, "estimate": est}
print(json.dumps(out))
'''


def write_models(root: Path, k: int) -> list[Path]:
    """``k`` random bf16 Llama-shaped checkpoints (one layer): a shared base plus a per-model delta."""
    import torch

    from dfsmerge.io import ShardedWriter
    from dfsmerge.zoo.tiny import save_tiny_tokenizer, tiny_config

    cfg = tiny_config("llama", num_layers=1, hidden=HIDDEN, heads=16, kv_heads=16, intermediate=INTER,
                      vocab_size=VOCAB).to_dict()
    cfg["dtype"], cfg["architectures"] = "bfloat16", ["LlamaForCausalLM"]
    p = "model.layers.0."
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN), p + "mlp.gate_proj.weight": (INTER, HIDDEN),
              p + "mlp.up_proj.weight": (INTER, HIDDEN), p + "mlp.down_proj.weight": (HIDDEN, INTER),
              p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,)}
    shapes.update({p + f"self_attn.{n}_proj.weight": (HIDDEN, HIDDEN) for n in "qkvo"})
    paths = []
    for i in range(k):
        out = root / f"m{i}"
        paths.append(out)
        if (out / "config.json").exists():
            continue
        with ShardedWriter(out) as w:
            for j, (name, shape) in enumerate(shapes.items()):
                t = torch.randn(shape, generator=torch.Generator().manual_seed(j)) * 0.02
                if i:
                    t += torch.randn(shape, generator=torch.Generator().manual_seed(j + 1000 * i)) * 0.002
                w.add_tensor(name, t.to(torch.bfloat16))
            w.write_json("config.json", cfg)
        save_tiny_tokenizer(out)
    return paths


def recipe(method: str, models: list[Path]) -> dict | None:
    """A recipe of ``method`` over ``models`` (the first is the base where the method takes one), or None when
    the method takes no such number of inputs."""
    from dfsmerge.merge import get_method

    m = get_method(method)
    names = {p.name for p in m.params}
    per = {k: v for k, v in (("weight", 0.5), ("density", 0.5)) if k in names}
    glob = {"t": 0.3} if "t" in names else {}
    n = len(models)
    if n < m.min_inputs or (m.max_inputs is not None and n > m.max_inputs):
        return None
    if m.base == "none":
        return {"merge_method": method, "dtype": "bfloat16", "parameters": glob,
                "models": [{"model": str(p), "parameters": per} for p in models]}
    others = models[1:]
    if len(others) < m.min_non_base or (m.max_non_base is not None and len(others) > m.max_non_base):
        return None
    return {"merge_method": method, "base_model": str(models[0]), "dtype": "bfloat16", "parameters": glob,
            "models": [{"model": str(p), "parameters": per} for p in others]}


def main() -> None:
    from dfsmerge.merge import registered_methods

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="2,3,5")
    ap.add_argument("--methods", default=None)
    ap.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "dfsmerge-merge-memory"))
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = ap.parse_args()
    counts = [int(x) for x in args.models.split(",")]
    models = write_models(Path(args.root), max(counts))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    rows = ["| method | inputs | whole: peak | / model | / estimate | chunked: peak | / model | / estimate |",
            "|---|---|---|---|---|---|---|---|"]
    worst: dict[str, list[float]] = {}
    for method in args.methods.split(",") if args.methods else registered_methods():
        for k in counts:
            rec = recipe(method, models[:k])
            if rec is None:
                continue
            p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(rec), str(CHUNK)], env=env,
                               capture_output=True, text=True)
            if p.returncode:
                print(f"{method} x{k}: failed\n{p.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(p.stdout.strip().splitlines()[-1])
            cells = []
            w = worst.setdefault(method, [0.0, 0.0])
            for mode in ("whole", "chunked"):
                m = r[mode]
                ratio = m["peak"] / m["model"]
                if mode == "whole" or m["how"] != "whole":  # a chunker's fallback counts as whole
                    j = 1 if m["how"] == "in row chunks" else 0
                    w[j] = max(w[j], ratio)
                cells += [f"{m['peak'] / 2**20:.0f} MiB" + ("" if m["how"] == "in row chunks" or mode == "whole"
                                                            else f" ({m['how']})"),
                          f"{ratio:.2f}", f"{m['peak'] / m['estimate']:.2f}"]
            rows.append(f"| {method} | {r['inputs']} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    factors = {m: tuple(math.ceil(max(1.0, v * 1.2) * 20) / 20 for v in w) for m, w in worst.items()}
    print("\n_PEAK_FACTOR (largest ratio x 1.2, at least 1):")
    print("{" + ", ".join(f'"{m}": {f}' for m, f in factors.items() if f != (1.0, 1.0)) + "}")
    if args.out:
        Path(args.out).write_text(f"# Peak memory of one merged tensor per method\n\n`python "
                                  f"benchmarks/merge_memory.py`; embedding {VOCAB}x{HIDDEN} bf16, chunks of "
                                  f"{CHUNK >> 20} MiB. Peak: VmHWM increase of the merging process.\n\n{table}\n")


if __name__ == "__main__":
    main()
