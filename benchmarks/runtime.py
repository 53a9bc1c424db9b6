"""Runtime benchmark: DFS candidate switch time, identity-plan forward overhead, memory over many switches.

    python benchmarks/runtime.py [--device cpu|cuda] [--layers 32] [--hidden 64] [--batch 4] [--length 128]

Prints (targets from issue 3):
- time to switch a StitchedModel to a new DFS candidate over a 2 x N-layer pool (target < 1 ms), with the check
  that no weight moved (every parameter's storage pointer unchanged);
- forward time of the identity plan over vanilla ``AutoModelForCausalLM`` at equal batch and length
  (target <= 1.05x);
- process memory (RSS, and CUDA allocated on GPU) before and after 1,000 switches (target: no growth).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_forward(model, ids, device, reps: int) -> list[float]:
    out = []
    with torch.no_grad():
        for _ in range(3):
            model(ids)
        for _ in range(reps):
            _sync(device)
            t = time.perf_counter()
            model(ids)
            _sync(device)
            out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--switches", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from dfsmerge.genome.dfs import DFSGenome, Infeasible
    from dfsmerge.genome.plan import PathPlan
    from dfsmerge.runtime.pool import LayerPool
    from dfsmerge.runtime.stitched import StitchedModel
    from dfsmerge.zoo.tiny import make_tiny_checkpoint

    device = torch.device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        a = make_tiny_checkpoint("llama", Path(tmp) / "a", seed=1, num_layers=args.layers, hidden=args.hidden)
        b = make_tiny_checkpoint("llama", Path(tmp) / "b", seed=2, like=a, delta_std=0.2)
        pool = LayerPool({"A": str(a), "B": str(b)}, device=device)
        vanilla = AutoModelForCausalLM.from_pretrained(str(a), dtype=torch.float32).to(device).eval()

    genome = DFSGenome({"A": args.layers, "B": args.layers}, repetitions=2, scales="per_step")
    rng = np.random.default_rng(0)
    plans = []
    while len(plans) < 64:
        p = genome.decode(rng.normal(0, 0.5, genome.dim))
        if not isinstance(p, Infeasible):
            plans.append(p)
    model = StitchedModel.from_pool(pool, PathPlan.identity("A", args.layers))
    ptrs = {(m.name, n): p.data_ptr() for m in pool for n, p in m.model.named_parameters()}

    # 1. switch time (plan -> new step list, validated, no weight touched)
    times = []
    for i in range(200):
        plan = plans[i % len(plans)]
        t = time.perf_counter()
        model.set_plan(pool, pool.validate_plan(plan))
        times.append(time.perf_counter() - t)
    unchanged = ptrs == {(m.name, n): p.data_ptr() for m in pool for n, p in m.model.named_parameters()}
    mean_len = statistics.mean(len(p) for p in plans)
    print(f"device={device} pool=2x{args.layers} layers hidden={args.hidden}; plans of mean length {mean_len:.1f}")
    print(f"switch to new DFS candidate: median {statistics.median(times) * 1e3:.3f} ms, "
          f"p90 {np.percentile(times, 90) * 1e3:.3f} ms (target < 1 ms); storage pointers unchanged: {unchanged}")
    if not unchanged:
        raise SystemExit("weights were copied during switching")

    # 2. identity-plan forward vs vanilla HF
    model.set_plan(pool, PathPlan.identity("A", args.layers))
    ids = torch.randint(5, 40, (args.batch, args.length), device=device)
    with torch.no_grad():
        diff = (model(ids).logits - vanilla(ids).logits).abs().max().item()
    hf_t, ours_t = [], []
    for _ in range(3):  # interleave to share machine noise
        hf_t += _time_forward(vanilla, ids, device, args.reps)
        ours_t += _time_forward(model, ids, device, args.reps)
    ratio = statistics.median(ours_t) / statistics.median(hf_t)
    print(f"identity forward B={args.batch} T={args.length}: vanilla HF {statistics.median(hf_t) * 1e3:.2f} ms, "
          f"stitched {statistics.median(ours_t) * 1e3:.2f} ms, ratio {ratio:.3f}x (target <= 1.05x); "
          f"max |logit diff| {diff:.2e}")

    # 3. memory over many switches (a cached forward every 100 switches); one warm-up round first so one-off
    # allocations (allocator pools, lazily built objects) are not counted as growth
    short = ids[:, :16]

    def churn(n: int) -> None:
        for i in range(n):
            model.set_plan(pool, pool.validate_plan(plans[i % len(plans)]))
            if i % 100 == 0:
                with torch.no_grad():
                    model(short, use_cache=True)

    churn(200)
    gc.collect()
    rss0, objs0 = _rss_mb(), len(gc.get_objects())
    cuda0 = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    marks = []
    for _ in range(4):
        churn(args.switches // 4)
        gc.collect()
        marks.append(_rss_mb())
    rss1, objs1 = marks[-1], len(gc.get_objects())
    cuda1 = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    print(f"memory over {args.switches} switches: RSS {rss0:.1f} -> " + " -> ".join(f"{m:.1f}" for m in marks)
          + f" MB ({rss1 - rss0:+.1f} MB); live Python objects {objs0} -> {objs1} ({objs1 - objs0:+d})"
          + (f"; CUDA allocated {cuda0 / 2**20:.1f} -> {cuda1 / 2**20:.1f} MB" if device.type == "cuda" else ""))

if __name__ == "__main__":
    main()
