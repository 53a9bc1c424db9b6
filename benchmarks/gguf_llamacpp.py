"""llama.cpp as the real client of ``dfsmerge export --format gguf`` (issue 27): the GGUF export of SmolLM2-135M
(identity plan and a plan repeating layers 10-11 with scales 0.9 / 1.1) and of Gemma 3 270M (identity and a
repeated 6-layer block), loaded by llama.cpp (``llama-cpp-python``, built from its PyPI sdist), continues three
prompts greedily for 16 tokens; the same prompts go through the folded export in transformers (f32). Prints, per
model and prompt, whether the 16 tokens agree, where they first differ, llama.cpp's tokenization against the Hugging
Face tokenizer's, and the largest relative logit difference over the prompt positions.

    pip install --no-binary :all: llama-cpp-python==0.3.36   # once; CMAKE_ARGS="-DGGML_NATIVE=OFF", ~15 min
    python benchmarks/gguf_llamacpp.py [--models smollm2-135m,gemma3-270m] [--tokens 16] [--quant f32] \
        [--threads 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Water boils at a temperature of"]
LAYERS = {"smollm2-135m": 30, "gemma3-270m": 18}


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


def hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation (no cache: the plain forward each step) and the prompt's logits."""
    seq = list(ids)
    with torch.no_grad():
        prompt_logits = model(torch.tensor([ids])).logits[0]
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):], prompt_logits


def llama_greedy(llm, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    llm.reset()
    llm.eval(ids)
    prompt_logits = np.array(llm.scores[: len(ids)])
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out, prompt_logits


def compare(name: str, kind: str, plan, root: Path, *, tokens: int, quant: str, threads: int) -> list[dict]:
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dfsmerge.export import export_plan

    folded = export_plan(plan, root / f"{name}-{kind}-folded", format="folded", dtype="float32", force=True)
    t = time.perf_counter()
    out = export_plan(plan, root / f"{name}-{kind}-gguf", format="gguf", quant=quant, force=True)
    export_s = time.perf_counter() - t
    (gguf_file,) = out.glob("*.gguf")
    tok = AutoTokenizer.from_pretrained(str(folded))
    model = AutoModelForCausalLM.from_pretrained(str(folded), dtype=torch.float32).eval()
    llm = Llama(str(gguf_file), logits_all=True, n_ctx=256, n_threads=threads, verbose=False)
    rows = []
    for p in PROMPTS:
        ids = tok(p)["input_ids"]
        cpp_ids = llm.tokenize(p.encode(), add_bos=llm.metadata.get("tokenizer.ggml.add_bos_token") == "true",
                               special=False)
        hf_out, hf_logits = hf_greedy(model, ids, tokens)
        cpp_out, cpp_logits = llama_greedy(llm, ids, tokens)
        rel = float(np.abs(cpp_logits - hf_logits.numpy()).max() / np.abs(hf_logits.numpy()).max())
        first = next((i for i, (a, b) in enumerate(zip(hf_out, cpp_out, strict=True)) if a != b), None)
        rows.append(dict(model=name, plan=kind, prompt=p, same=hf_out == cpp_out, first_diff=first,
                         tokenizer_same=cpp_ids == ids, rel_logits=rel, export_s=export_s,
                         text=tok.decode(cpp_out)))
    del llm
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--quant", default="f32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="where the exports go (default: a temporary directory)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from dfsmerge.io.realmodels import real_model_dir

    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    root = Path(args.out or tmp.name)
    rows = []
    for name in args.models.split(","):
        src = real_model_dir(name)
        for kind, plan in plans(name, src).items():
            rows += compare(name, kind, plan, root, tokens=args.tokens, quant=args.quant, threads=args.threads)
    print(f"{'model':14} {'plan':9} {'prompt':34} {'greedy':7} {'1st diff':8} {'tok ids':8} {'rel logits':>10}")
    for r in rows:
        print(f"{r['model']:14} {r['plan']:9} {r['prompt'][:32]!r:34} {'same' if r['same'] else 'DIFF':7} "
              f"{'-' if r['first_diff'] is None else r['first_diff']!s:8} "
              f"{'same' if r['tokenizer_same'] else 'DIFF':8} {r['rel_logits']:10.2e}")
    for r in rows:
        print(f"{r['model']} {r['plan']}: {r['prompt']!r} -> {r['text']!r}")
    same = sum(r["same"] for r in rows)
    print(f"greedy {args.tokens}-token continuations equal: {same}/{len(rows)} ({args.quant})")
    if tmp is not None:
        tmp.cleanup()
    return 0 if same == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
