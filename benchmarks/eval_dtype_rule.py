"""What bfloat16 costs against float32 per decoder family and width on this CPU: the measurement behind
``eval_dtype: auto``'s rule (:func:`dfsmerge.search.eval_dtype.bf16_rule`, issue 26).

For each family (llama, qwen2, gemma3_text) and hidden size, a random 2-layer model with the family's usual MLP
ratio and a small (64) or a real-sized (49152) vocabulary scores a batch of 16 x 24 tokens, forward only, in float32
and in bfloat16, alternating (fp32, bf16, fp32, ...) ``--repeats`` times; the minimum time of each dtype counts
(the least disturbed run: the machine is shared). Prints the bf16 / fp32 speed ratio (> 1: bf16 faster).

    python benchmarks/eval_dtype_rule.py [--threads 1] [--repeats 7] [--hidden 64,128,256,384,576,768]
"""

from __future__ import annotations

import argparse
import time

import torch


def build(family: str, hidden: int, vocab: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    heads = max(1, hidden // 64)
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                  num_key_value_heads=heads, max_position_embeddings=256)
    if family == "gemma3_text":
        cfg = AutoConfig.for_model(family, intermediate_size=3 * hidden, head_dim=64, **common)
    else:
        cfg = AutoConfig.for_model(family, intermediate_size=(8 * hidden) // 3, **common)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def time_once(model, ids) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        model(ids)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--hidden", default="64,128,256,384,576,768")
    ap.add_argument("--families", default="llama,qwen2,gemma3_text")
    ap.add_argument("--vocabs", default="64,49152")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from dfsmerge.search.eval_dtype import cpu_has_native_bf16

    print(f"native bf16 matmul (avx512_bf16 / amx_bf16): {cpu_has_native_bf16()}")
    print("| family | hidden | vocab | fp32 ms | bf16 ms | bf16 speed / fp32 |")
    print("|---|---|---|---|---|---|")
    for fam in args.families.split(","):
        for h in [int(x) for x in args.hidden.split(",")]:
            for v in [int(x) for x in args.vocabs.split(",")]:
                m32 = build(fam, h, v)
                m16 = build(fam, h, v).to(torch.bfloat16)
                ids = torch.randint(0, v, (16, 24))
                for m in (m32, m16):
                    time_once(m, ids)  # warm-up
                t32, t16 = [], []
                for _ in range(args.repeats):
                    t32.append(time_once(m32, ids))
                    t16.append(time_once(m16, ids))
                a, b = min(t32), min(t16)
                print(f"| {fam} | {h} | {v} | {1e3 * a:.2f} | {1e3 * b:.2f} | {a / b:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
