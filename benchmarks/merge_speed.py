"""Wall time and peak memory of `dfsmerge merge` against `mergekit-yaml` on the same >= 1 GB checkpoint set.

Writes three random Llama-shaped bf16 checkpoints (a base and two fine-tunes), merges them with the same recipe
through both tools (alternating, best of --repeats), and prints both wall times, the ratio and both tools' peak RSS.
Both tools run as subprocesses with the same thread count (OMP_NUM_THREADS). Sets (--set):

- ``32k``: 32000x2048 embedding and head, 4 layers (~0.7 GB per model);
- ``128k``: Llama-3-8B-shaped 128256x4096 embedding and head, 2 layers (~2.6 GB per model); tensors this large
  are merged in row chunks (bounded memory).

    python benchmarks/merge_speed.py [--set 32k] [--methods ties,linear] [--threads 2] [--repeats 2] [--workdir DIR]
                                     [--out benchmarks/results/merge_speed_32k.md]
Targets (issue 15): on 32k, ties at most 0.5x mergekit's time with peak RSS < 1.5 GB; on 128k, peak RSS < 2 GB.
The table is printed and written as markdown to ``--out`` (default ``benchmarks/results/merge_speed_<set>.md``).
Both tools run in the same invocation, alternating, so the ratio is measured under the same machine load; RSS is
in GB (10^9 bytes). Pass a ``--workdir`` under ``runs/`` (git-ignored) to keep the generated checkpoints for reuse.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

# name: (hidden, intermediate, layers, vocab)
SETS = {"32k": (2048, 5632, 4, 32000), "128k": (4096, 4096, 2, 128256)}


def write_set(root: Path, geometry: tuple[int, int, int, int]) -> dict[str, Path]:
    from dfsmerge.io import ShardedWriter
    from dfsmerge.zoo.tiny import save_tiny_tokenizer, tiny_config

    HIDDEN, INTER, LAYERS, VOCAB = geometry  # noqa: N806
    cfg = tiny_config("llama", num_layers=LAYERS, hidden=HIDDEN, heads=16, kv_heads=16, intermediate=INTER,
                      vocab_size=VOCAB).to_dict()
    cfg["dtype"] = "bfloat16"
    cfg["architectures"] = ["LlamaForCausalLM"]
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for n in "qkvo":
            shapes[p + f"self_attn.{n}_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[p + "mlp.gate_proj.weight"] = shapes[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    paths = {}
    for k, name in enumerate(("base", "ft1", "ft2")):
        out = root / name
        paths[name] = out
        if (out / "config.json").exists():
            continue
        with ShardedWriter(out, max_shard_size="2GB") as w:
            for j, (tname, shape) in enumerate(shapes.items()):
                t = torch.empty(shape, dtype=torch.bfloat16)
                for a in range(0, shape[0], 8192):  # row blocks: the generator never holds a full fp32 copy
                    b = min(a + 8192, shape[0])
                    g = torch.Generator().manual_seed(1000 * j + a)  # shared base values ...
                    block = torch.randn((b - a, *shape[1:]), generator=g) * 0.02
                    if k:  # ... plus a per-model delta
                        g = torch.Generator().manual_seed(1000 * j + a + k * 10**7)
                        block += torch.randn((b - a, *shape[1:]), generator=g) * 0.002
                    t[a:b] = block
                w.add_tensor(tname, t)
            w.write_json("config.json", cfg)
        save_tiny_tokenizer(out)
    return paths


def recipe(method: str, m: dict[str, Path]) -> dict:
    params = {"weight": 0.6, "density": 0.5}
    if method == "linear":
        return {"merge_method": "linear", "dtype": "bfloat16",
                "models": [{"model": str(m[k]), "parameters": {"weight": w}}
                           for k, w in (("base", 0.4), ("ft1", 0.3), ("ft2", 0.3))]}
    return {"merge_method": method, "base_model": str(m["base"]), "dtype": "bfloat16",
            "parameters": {"normalize": True},
            "models": [{"model": str(m["ft1"]), "parameters": params},
                       {"model": str(m["ft2"]), "parameters": params}]}


def timed(cmd: list[str], env: dict) -> tuple[float, int]:
    """Wall seconds and the child's peak RSS in bytes (run with /usr/bin/time-free rusage via a wrapper)."""
    wrapper = [sys.executable, "-c",
               "import resource,subprocess,sys,json,time;t=time.perf_counter();"
               "r=subprocess.run(sys.argv[1:]);dt=time.perf_counter()-t;"
               "print(json.dumps([r.returncode,dt,resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))"]
    res = subprocess.run(wrapper + cmd, env=env, capture_output=True, text=True)
    rc, dt, rss = json.loads(res.stdout.strip().splitlines()[-1])
    if rc != 0:
        raise SystemExit(f"command failed ({rc}): {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return dt, rss * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", default="32k", choices=sorted(SETS))
    ap.add_argument("--methods", default="ties,linear")
    ap.add_argument("--no-mergekit", action="store_true", help="time dfsmerge alone")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="markdown result file (default benchmarks/results/merge_speed_SET.md)")
    args = ap.parse_args()
    out_md = Path(args.out or Path(__file__).parent / "results" / f"merge_speed_{args.set}.md")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="dfsmerge-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    models = write_set(root / f"models-{args.set}", SETS[args.set])
    size = sum(f.stat().st_size for p in models.values() for f in p.glob("*.safetensors"))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    mk_bin = shutil.which("mergekit-yaml")
    if mk_bin is None and not args.no_mergekit:
        raise SystemExit("mergekit-yaml not found: pip install mergekit==0.1.5 (the test oracle) to compare")
    hidden, _, _, vocab = SETS[args.set]
    header = (f"checkpoint set {args.set}: 3 models, embedding/head {vocab}x{hidden}, {size / 1e9:.2f} GB on disk "
              f"(bf16), OMP/MKL threads={args.threads}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(header)
    rows = []
    for method in args.methods.split(","):
        rp = root / f"{method}.yaml"
        rp.write_text(yaml.safe_dump(recipe(method, models)))
        ours, theirs, rss, mk_rss = [], [], 0, 0
        for _ in range(args.repeats):
            dt, r = timed([sys.executable, "-m", "dfsmerge.cli", "merge", str(rp), str(root / "out_ours"),
                           "--force", "--quiet"], env)
            ours.append(dt)
            rss = max(rss, r)
            shutil.rmtree(root / "out_mk", ignore_errors=True)
            if not args.no_mergekit:
                dt, r = timed([mk_bin, str(rp), str(root / "out_mk"), "--quiet", "--no-copy-tokenizer",
                               "--no-write-model-card"], env)
                theirs.append(dt)
                mk_rss = max(mk_rss, r)
            shutil.rmtree(root / "out_mk", ignore_errors=True)
        a, b = min(ours), min(theirs, default=float("nan"))
        rows.append(f"| {method} | {a:.2f} | {b:.2f} | {a / b:.2f} | {rss / 1e9:.2f} | "
                    + ("n/a" if args.no_mergekit else f"{mk_rss / 1e9:.2f}") + " |")
        print(rows[-1], flush=True)
        shutil.rmtree(root / "out_ours", ignore_errors=True)
    table = "\n".join([
        f"# merge_speed --set {args.set}", "", header, "",
        "| method | dfsmerge s | mergekit s | ratio | dfsmerge peak RSS GB | mergekit peak RSS GB |",
        "|---|---|---|---|---|---|", *rows, "",
        f"Best of {args.repeats} alternating runs each; ratio = dfsmerge / mergekit wall time; peak RSS = the child "
        "process's maximum resident set (ru_maxrss).", ""])
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(table)
    print(f"written {out_md}; workdir: {root}")


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    main()
