"""llama.cpp as the real client of ``dfsmerge export --format gguf`` (issue 27): the GGUF export of SmolLM2-135M
(identity plan and a plan repeating layers 10-11 with scales 0.9 / 1.1) and of Gemma 3 270M (identity and a
repeated 6-layer block with the same scales), loaded by llama.cpp (``llama-cpp-python``, built from its PyPI sdist),
continues three prompts (English, code, French) greedily for 16 tokens; the same prompt ids go through the folded
export in transformers (f32). Prints, per model and prompt, whether the 16 tokens agree (and where they first
differ, with both sides' top-2 logit margins there), whether llama.cpp tokenizes the prompt as the Hugging Face
tokenizer does, the largest relative logit difference over the prompt positions (max |llama.cpp - HF| / max |HF|),
the smallest top-2 margin of transformers' greedy steps (how far the closest step is from a tie; up to the first
difference) and llama.cpp's lead of the same token over the same runner-up at that step.

llama.cpp runs in a subprocess of its own interpreter, so the project's environment needs no llama-cpp-python:
``--llama-python`` or ``$DFSMERGE_LLAMACPP_PYTHON`` names it (a Python with ``llama_cpp`` and numpy); without
either, the current interpreter is used if it imports ``llama_cpp``. Build it once in a separate venv (~15-50 min
on two busy cores; the prebuilt wheels need a newer glibc)::

    python3 -m venv /work/llamavenv && /work/llamavenv/bin/pip install numpy
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF" CMAKE_BUILD_PARALLEL_LEVEL=1 \
        /work/llamavenv/bin/pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36

    DFSMERGE_LLAMACPP_PYTHON=/work/llamavenv/bin/python OMP_NUM_THREADS=1 python benchmarks/gguf_llamacpp.py \
        [--models smollm2-135m,gemma3-270m] [--tokens 16] [--quant f32] [--kv f16,f32] [--threads 1] [--out DIR]

Exit status 0 when every continuation agrees. The opt-in test tests/export/test_gguf_llamacpp.py asserts the same.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "En français, « le café » se dit"]
LAYERS = {"smollm2-135m": 30, "gemma3-270m": 18}
LLAMA_PYTHON_ENV = "DFSMERGE_LLAMACPP_PYTHON"


def llama_python(explicit: str | None = None) -> str | None:
    """The interpreter that runs llama.cpp: ``explicit``, else ``$DFSMERGE_LLAMACPP_PYTHON``, else this one when it
    imports ``llama_cpp``; None when there is none."""
    if explicit or os.environ.get(LLAMA_PYTHON_ENV):
        return explicit or os.environ[LLAMA_PYTHON_ENV]
    return sys.executable if importlib.util.find_spec("llama_cpp") is not None else None


def plans(name: str, src: Path):
    from dfsmerge.genome.plan import LayerRef, PathPlan, Step

    n = LAYERS[name]
    block = [10, 11] if name == "smollm2-135m" else list(range(6, 12))  # Gemma 3: one whole 5:1 block
    order = [*range(block[-1] + 1), *block, *range(block[-1] + 1, n)]
    scales = [1.0] * len(order)
    scales[block[-1] + 1], scales[block[-1] + len(block)] = 0.9, 1.1
    repeat = PathPlan(tuple(Step(LayerRef("S", i), s) for i, s in zip(order, scales, strict=True)),
                      models={"S": str(src)}, base="S")
    return {"identity": PathPlan.identity("S", n, models={"S": str(src)}), "repeat": repeat}


# ====================================================================== llama.cpp side (its own interpreter)
def _llama_worker(gguf_file: str, job_file: str, out_file: str) -> None:
    """Runs under the llama.cpp interpreter (numpy and llama_cpp only): for each prompt of the job, llama.cpp's own
    tokenization, then greedy continuation of the given ids; writes tokens and all logits rows to ``out_file``."""
    import llama_cpp
    from llama_cpp import Llama

    job = json.loads(Path(job_file).read_text())
    n_ctx = max(len(p["ids"]) for p in job["prompts"]) + job["tokens"] + 8
    kv = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32}[job["kv"]]
    llm = Llama(gguf_file, logits_all=True, n_ctx=n_ctx, n_threads=job["threads"], n_threads_batch=job["threads"],
                type_k=kv, type_v=kv, verbose=False)
    arrays: dict[str, np.ndarray] = {}
    meta = {"version": llama_cpp.__version__, "prompts": []}
    for k, p in enumerate(job["prompts"]):
        # add_bos=True is llama_tokenize's add_special: BOS/EOS only as the file's tokenizer.ggml.add_*_token say
        cpp_ids = llm.tokenize(p["text"].encode(), add_bos=True, special=False)
        ids = p["ids"]
        llm.reset()
        llm.eval(ids)
        out: list[int] = []
        for _ in range(job["tokens"]):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        arrays[f"logits{k}"] = np.array(llm.scores[: len(ids) + job["tokens"] - 1], dtype=np.float32)
        meta["prompts"].append({"tokens": out, "cpp_ids": list(map(int, cpp_ids))})
    del llm
    np.savez(out_file, meta=np.array(json.dumps(meta)), **arrays)


def llama_greedy(python: str, gguf_file: Path, prompts: list[tuple[str, list[int]]], *, tokens: int,
                 threads: int, kv: str = "f16") -> tuple[dict, list[np.ndarray]]:
    """Run :func:`_llama_worker` in ``python``; returns (meta, logits per prompt)."""
    with tempfile.TemporaryDirectory() as d:
        job, out = Path(d) / "job.json", Path(d) / "out.npz"
        job.write_text(json.dumps({"tokens": tokens, "threads": threads, "kv": kv,
                                   "prompts": [{"text": t, "ids": ids} for t, ids in prompts]}))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        r = subprocess.run([python, __file__, "--worker", str(gguf_file), str(job), str(out)], env=env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"llama.cpp worker ({python}) failed with exit {r.returncode}:\n{r.stderr[-4000:]}")
        with np.load(out) as z:
            return json.loads(str(z["meta"])), [z[f"logits{k}"] for k in range(len(prompts))]


# ====================================================================== transformers side
def hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """Greedy continuation (no cache: the plain forward of the whole sequence each step); logits rows of the prompt
    and of each step but the last, as llama.cpp's are returned."""
    import torch

    seq = list(ids)
    with torch.no_grad():
        rows = [model(torch.tensor([ids])).logits[0].float()]
        for k in range(n):
            if k:
                rows.append(model(torch.tensor([seq])).logits[0, -1:].float())
            seq.append(int(rows[-1][-1].argmax()))
    return seq[len(ids):], torch.cat(rows).numpy()


def _margin(row: np.ndarray) -> float:
    top2 = np.partition(row, -2)[-2:]
    return float(top2[1] - top2[0])


def compare(name: str, kind: str, plan, root: Path, *, tokens: int, quant: str, threads: int,
            python: str, kv: tuple[str, ...] = ("f16",)) -> list[dict]:
    """Export ``plan`` (folded f32 and GGUF ``quant``), then one row per prompt and llama.cpp KV-cache type."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dfsmerge.export import export_plan

    folded = export_plan(plan, root / f"{name}-{kind}-folded", format="folded", dtype="float32", force=True)
    t = time.perf_counter()
    out = export_plan(plan, root / f"{name}-{kind}-gguf", format="gguf", quant=quant, force=True)
    export_s = time.perf_counter() - t
    (gguf_file,) = out.glob("*.gguf")
    tok = AutoTokenizer.from_pretrained(str(folded))
    model = AutoModelForCausalLM.from_pretrained(str(folded), dtype=torch.float32).eval()
    prompts = [(p, tok(p)["input_ids"]) for p in PROMPTS]
    hf = [hf_greedy(model, ids, tokens) for _, ids in prompts]
    rows = []
    for cache in kv:
        t = time.perf_counter()
        meta, cpp_logits = llama_greedy(python, gguf_file, prompts, tokens=tokens, threads=threads, kv=cache)
        cpp_s = time.perf_counter() - t
        for (p, ids), (hf_out, hl), m, cl in zip(prompts, hf, meta["prompts"], cpp_logits, strict=True):
            cpp_out, n = m["tokens"], len(ids)
            rel = float(np.abs(cl[:n] - hl[:n]).max() / np.abs(hl[:n]).max())
            first = next((i for i, (a, b) in enumerate(zip(hf_out, cpp_out, strict=True)) if a != b), None)
            # the closest of transformers' steps to a tie, and llama.cpp's lead of the same pick over the same
            # runner-up there (negative: llama.cpp would pick the runner-up)
            k = min(range(first if first is not None else tokens), key=lambda i: _margin(hl[n - 1 + i]), default=0)
            h, c = hl[n - 1 + k], cl[n - 1 + k]
            pick, second = np.argsort(h)[-1], np.argsort(h)[-2]
            row = dict(model=name, plan=kind, kv=cache, prompt=p, same=hf_out == cpp_out, first_diff=first,
                       tokenizer_same=m["cpp_ids"] == ids, rel_logits=rel, export_s=export_s, llama_s=cpp_s,
                       min_margin=float(h[pick] - h[second]), cpp_at_min=float(c[pick] - c[second]),
                       text=tok.decode(cpp_out), hf_text=tok.decode(hf_out), version=meta["version"])
            if first is not None:  # the step where they part: each side's top-2 margin and the gap between picks
                h, c = hl[n - 1 + first], cl[n - 1 + first]
                a, b = hf_out[first], cpp_out[first]
                row.update(hf_margin=_margin(h), cpp_margin=_margin(c), hf_gap=float(h[a] - h[b]),
                           cpp_gap=float(c[b] - c[a]))
            rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--quant", default="f32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv", default="f16,f32",
                    help="llama.cpp's KV-cache types to run, comma-separated (f16: its default, what llama-cli and "
                         "Ollama use; f32: the export's own arithmetic)")
    ap.add_argument("--llama-python", default=None, help=f"interpreter with llama_cpp (default: ${LLAMA_PYTHON_ENV}, "
                                                         "else this one if it imports llama_cpp)")
    ap.add_argument("--out", default=None, help="where the exports go (default: a temporary directory)")
    args = ap.parse_args(argv)
    kv = tuple(args.kv.split(","))
    if not set(kv) <= {"f16", "f32"}:
        print(f"error: --kv={args.kv!r}: use f16, f32 or f16,f32", file=sys.stderr)
        return 2
    python = llama_python(args.llama_python)
    if python is None:
        print(f"error: no llama.cpp interpreter: set {LLAMA_PYTHON_ENV} (or --llama-python) to a Python with "
              "llama-cpp-python; build it as this script's docstring says", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    from dfsmerge.io.realmodels import real_model_dir

    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    root = Path(args.out or tmp.name)
    rows = []
    for name in args.models.split(","):
        src = real_model_dir(name)
        for kind, plan in plans(name, src).items():
            rows += compare(name, kind, plan, root, tokens=args.tokens, quant=args.quant, threads=args.threads,
                            python=python, kv=kv)
    print(f"llama-cpp-python {rows[0]['version']} ({python}); {args.quant} weights; "
          f"{args.tokens} greedy tokens")
    print(f"{'model':13} {'plan':9} {'kv':3} {'prompt':30} {'greedy':6} {'1st diff':8} {'tok ids':7} "
          f"{'rel logits':>10} {'min margin':>10} {'llama.cpp':>10}")
    for r in rows:
        print(f"{r['model']:13} {r['plan']:9} {r['kv']:3} {ascii(r['prompt'][:26]):30} "
              f"{'same' if r['same'] else 'DIFF':6} {'-' if r['first_diff'] is None else r['first_diff']!s:8} "
              f"{'same' if r['tokenizer_same'] else 'DIFF':7} {r['rel_logits']:10.2e} {r['min_margin']:10.3g} "
              f"{r['cpp_at_min']:10.3g}")
    for r in rows:
        print(f"{r['model']} {r['plan']} kv {r['kv']}: {r['prompt']!r} -> {r['text']!r}")
        if not r["same"]:
            print(f"    transformers: {r['hf_text']!r}\n    at step {r['first_diff']}: top-2 margin HF "
                  f"{r['hf_margin']:.4f}, llama.cpp {r['cpp_margin']:.4f}; HF prefers its pick by {r['hf_gap']:.4f}, "
                  f"llama.cpp its own by {r['cpp_gap']:.4f}")
    for m in dict.fromkeys((r["model"], r["plan"], r["kv"]) for r in rows):
        r = next(x for x in rows if (x["model"], x["plan"], x["kv"]) == m)
        print(f"{m[0]} {m[1]} kv {m[2]}: GGUF export {r['export_s']:.1f} s, llama.cpp load + {len(PROMPTS)} prompts "
              f"{r['llama_s']:.1f} s")
    for m, cache in dict.fromkeys((r["model"], r["kv"]) for r in rows):
        sel = [r for r in rows if (r["model"], r["kv"]) == (m, cache)]
        print(f"{m} kv {cache}: greedy equal {sum(r['same'] for r in sel)}/{len(sel)}, max rel logit diff over the "
              f"prompts {max(r['rel_logits'] for r in sel):.2e}, smallest HF top-2 margin "
              f"{min(r['min_margin'] for r in sel):.3g}")
    same = sum(r["same"] for r in rows)
    print(f"greedy {args.tokens}-token continuations equal: {same}/{len(rows)} ({args.quant}); "
          f"llama.cpp tokenization equal: {sum(r['tokenizer_same'] for r in rows)}/{len(rows)}")
    if tmp is not None:
        tmp.cleanup()
    return 0 if same == len(rows) else 1


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        _llama_worker(*sys.argv[2:])
        raise SystemExit(0)
    raise SystemExit(main())
