"""Fused merge kernels vs eager PyTorch: achieved GB/s against the bytes that must move.

    python benchmarks/kernel_speed.py                      # CPU: eager reference path only (says so)
    python benchmarks/kernel_speed.py --reps 20            # CUDA: fused kernel, fused end-to-end, eager, ratios
    python benchmarks/kernel_speed.py --interpret --shapes 33x65 --k 2   # smoke-run the fused columns on CPU

For each method, 7B-shaped tensor (4096x4096: attention projections; 14336x4096: Mistral/Llama-3 MLP) and K
sources, the bytes that must move are (K+1) reads of the storage dtype (K sources + base) and one write:
a merge that reads every input once and writes once moves exactly these. GB/s = those bytes / measured time
(1 GB = 1e9 B). Columns:
  fused pass  - the one fused elementwise kernel (``gta_apply``; linear / slerp: their kernels), reductions done
  fused e2e   - everything ``fused_merge`` does: thresholds / ranks / L1 rescale reductions + the fused pass
  eager       - the eager PyTorch reference of the same method (fp32 compute, composed torch ops)
  ratio       - eager time / fused pass time
On CUDA, ``copy`` is a device-to-device copy of one tensor (2 * n bytes per element size): the practically
achievable bandwidth the fused pass is measured against (target on an H100: >= 80% of HBM bandwidth, >= 3x eager).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CPU_METHODS = "task_arithmetic,dare_ties,linear"
GPU_METHODS = "task_arithmetic,ties,dare_ties,della,linear,slerp"


def _time(fn, reps: int, warmup: int, cuda: bool) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _params(method: str, k: int) -> dict:
    weights = [1.0 / k + 0.1 * i for i in range(k)]
    return {"weight": [0.0, *weights], "density": [1.0, *([0.5] * k)], "epsilon": [0.1] * (k + 1)}


def bench_one(method, shape, k, dtype, reps, warmup, device, fused_cols):
    from dfsmerge.kernels import fused_merge

    cuda = device.type == "cuda"
    n_sources = 1 if method == "slerp" else k
    g = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)
    sources = [(base.float() + 0.01 * torch.randn(shape, generator=g, device=device)).to(dtype)
               for _ in range(n_sources)]
    tensors = [base, *sources]
    out = torch.empty_like(base)
    nbytes = (len(tensors) + 1) * base.numel() * base.element_size()
    params = None if method == "slerp" else _params(method, n_sources)
    if method == "linear":
        params = {"weight": [0.2] * len(tensors)}
    glob = {"t": 0.4} if method == "slerp" else None
    row = {"method": method, "shape": "x".join(map(str, shape)), "K": n_sources, "GB": nbytes / 1e9}

    def eager():
        fused_merge(method, tensors, base_index=0, params=params, global_params=glob, seed=1, backend="reference")

    row["eager_s"] = _time(eager, reps, warmup, cuda)
    if fused_cols:

        def e2e():
            fused_merge(method, tensors, base_index=0, params=params, global_params=glob, seed=1, out=out,
                        backend="triton")

        row["e2e_s"] = _time(e2e, reps, warmup, cuda)
        if method in ("linear", "slerp"):
            row["fused_s"] = row["e2e_s"]
        else:
            from dfsmerge.kernels._common import resolve_params
            from dfsmerge.kernels.gta import gta_apply, gta_plan

            rp = resolve_params(method, len(tensors), 0, params, glob)
            plan = gta_plan(method, base, sources, weights=rp.weights, densities=rp.densities, gammas=rp.gammas,
                            epsilons=rp.epsilons, normalize=rp.normalize, rescale=rp.rescale, lam=rp.lam, seed=1)
            row["fused_s"] = _time(lambda: gta_apply(plan, base, sources, out), reps, warmup, cuda)
        row["copy_s"] = _time(lambda: out.copy_(base), reps, warmup, cuda)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,14336x4096")
    ap.add_argument("--k", default="2,3,4", help="numbers of non-base sources")
    ap.add_argument("--methods", default=None, help=f"default: CPU {CPU_METHODS}; CUDA {GPU_METHODS}")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default: CPU 1, CUDA 20)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--interpret", action="store_true",
                    help="CPU: also run the fused columns in the Triton interpreter (smoke test only)")
    args = ap.parse_args()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    methods = (args.methods or (GPU_METHODS if cuda else CPU_METHODS)).split(",")
    reps = args.reps or (20 if cuda else 1)
    warmup = 3 if cuda else 0
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ks = [int(v) for v in args.k.split(",")]
    dtype = DTYPES[args.dtype]
    fused_cols = cuda or args.interpret
    if cuda:
        print(f"# device: {torch.cuda.get_device_name()}; dtype {args.dtype}; median of {reps} after {warmup} warmup")
    elif args.interpret:
        print("# device: CPU with TRITON_INTERPRET=1: a smoke run of every column; the timings mean nothing")
    else:
        print(f"# device: CPU ({args.threads} threads): no CUDA, so only the eager reference path runs "
              f"(Triton kernels need CUDA; under TRITON_INTERPRET=1 they are a correctness tool, not a benchmark). "
              f"dtype {args.dtype}; median of {reps}")
    head = f"{'method':16} {'shape':>11} {'K':>2} {'GB moved':>9} {'eager GB/s':>11}"
    if fused_cols:
        head += f" {'fused GB/s':>11} {'e2e GB/s':>9} {'copy GB/s':>10} {'fused/copy':>10} {'eager/fused':>11}"
    print(head)
    with torch.inference_mode():
        for method in methods:
            for shape in shapes:
                for k in [1] if method == "slerp" else ks:
                    r = bench_one(method, shape, k, dtype, reps, warmup, device, fused_cols)
                    line = f"{method:16} {r['shape']:>11} {r['K']:>2} {r['GB']:9.3f} {r['GB'] / r['eager_s']:11.2f}"
                    if fused_cols:
                        copy_bw = 2 * r["GB"] / (r["K"] + 2) / r["copy_s"]
                        fused_bw = r["GB"] / r["fused_s"]
                        line += (f" {fused_bw:11.1f} {r['GB'] / r['e2e_s']:9.1f} {copy_bw:10.1f}"
                                 f" {fused_bw / copy_bw:10.2f} {r['eager_s'] / r['fused_s']:11.2f}")
                    print(line, flush=True)


if __name__ == "__main__":
    main()
