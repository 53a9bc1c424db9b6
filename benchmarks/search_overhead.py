"""Search-loop overhead per candidate: everything the loop does except the forward passes (ask, decode, duplicate
check, evals.jsonl append + fsync, the two atomic state checkpoints per generation, tell, best-so-far tracking).
Target: < 5 ms per candidate.

Each setting runs a real search over tiny checkpoints with a model-free synthetic objective (the objective itself
costs microseconds), so the wall time per candidate is the loop's own overhead; a second DFS setting adds the
``cost/hops`` objective, which also swaps the stitched model's path per candidate (Runtime.prepare, no forward).
The time in each component is measured by wrapping it.

    python benchmarks/search_overhead.py                 # 32-layer tiny models, 3 models, CMA-ES and NSGA-II
    python benchmarks/search_overhead.py --layers 8 --evals 200
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def _timed(cls, name: str, acc: dict[str, float]):
    orig = getattr(cls, name)

    def f(*a, **k):
        t = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            acc[name] += time.perf_counter() - t

    setattr(cls, name, f)
    return orig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32, help="decoder layers of each tiny model (default 32)")
    ap.add_argument("--evals", type=int, default=400, help="candidates per setting (default 400)")
    args = ap.parse_args()

    import logging

    from dfsmerge.optim.base import Optimizer
    from dfsmerge.search import load_search_config
    from dfsmerge.search.loop import Search
    from dfsmerge.search.state import RunDir
    from dfsmerge.zoo.tiny import make_tiny_checkpoint

    logging.getLogger("dfsmerge.search").setLevel(logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="search_overhead_"))
    base = make_tiny_checkpoint("llama", tmp / "base", seed=0, num_layers=args.layers, hidden=16)
    models = [str(make_tiny_checkpoint("llama", tmp / f"m{i}", seed=i, like=base, delta_std=0.1)) for i in (1, 2)]
    synth = [{"type": "synthetic", "name": "sphere"}]
    settings = [
        ("ps   cma    sphere", "ps", "cma", synth, {}),
        ("dfs  cma    sphere", "dfs", "cma", synth, {"repetitions": 3}),
        ("dfs  nsga2  sphere+length", "dfs", "nsga2", synth + [{"type": "synthetic", "name": "path_length"}],
         {"repetitions": 3}),
        ("dfs  cma    sphere+cost/hops", "dfs", "cma", synth + [{"type": "cost", "name": "hops"}], {"repetitions": 3}),
    ]
    print(f"tiny models: {args.layers} layers, hidden 16; {args.evals} candidates per setting; times per candidate")
    print(f"{'setting':32s} {'dim':>5s} {'pop':>4s} {'total':>9s} {'fsync log':>10s} {'checkpoint':>11s} "
          f"{'ask+tell':>9s} {'prepare':>8s} {'loop code':>10s}")
    for label, mode, opt, objs, dfs in settings:
        cfg = load_search_config({
            "genome": {"mode": mode, "models": models, "base_model": str(base), "layer_granularity": 1,
                       "filters": ["self_attn", "mlp"], "dfs": {**dfs, "max_length": 2 * args.layers}},
            "objectives": objs, "optimizer": {"name": opt}, "budget": {"max_evals": args.evals}})
        acc: dict[str, float] = defaultdict(float)
        saved = [(RunDir, "append_eval", _timed(RunDir, "append_eval", acc)),
                 (RunDir, "write_state", _timed(RunDir, "write_state", acc)),
                 (Optimizer, "ask", _timed(Optimizer, "ask", acc)),
                 (Optimizer, "tell", _timed(Optimizer, "tell", acc))]
        out = tmp / label.replace(" ", "_").replace("/", "_")
        s = Search(cfg, out, progress=False)  # worker, tasks and pool set up outside the timed loop
        if cfg.needs_model:
            s.backend.worker._load_runtime()
        t0 = time.perf_counter()
        _loop_only(s)
        wall = time.perf_counter() - t0
        for cls, name, orig in saved:
            setattr(cls, name, orig)
        import json

        evals = [json.loads(x) for x in (out / "evals.jsonl").read_text().splitlines()]
        n = len(evals)
        prep = sum(r["timings"].get("prepare_s", 0.0) for r in evals)
        fwd = sum(r["timings"].get("eval_s", 0.0) for r in evals)
        dim = len(evals[0]["genome"])
        pop = sum(1 for r in evals if r["generation"] == 0)
        ms = 1e3 / n
        rest = wall - fwd - acc["append_eval"] - acc["write_state"] - acc["ask"] - acc["tell"] - prep
        print(f"{label:32s} {dim:5d} {pop:4d} {(wall - fwd) * ms:7.2f}ms {acc['append_eval'] * ms:8.2f}ms "
              f"{acc['write_state'] * ms:9.2f}ms {(acc['ask'] + acc['tell']) * ms:7.2f}ms {prep * ms:6.2f}ms "
              f"{rest * ms:8.2f}ms")
    print("total = wall time of the loop minus objective evaluation (eval_s), per candidate; target < 5 ms.\n"
          "fsync log = evals.jsonl append + fsync (the disk's fsync latency); checkpoint = state.json after each ask "
          "(optimizer state + fsync); ask+tell = the optimizer (CMA-ES: eigendecomposition); loop code = the rest "
          "(decode, duplicate keys, records, progress).")


def _loop_only(search):
    """run_loop without the final report (plots are not part of the per-candidate loop)."""
    search.finish = lambda offset: None
    return search.run_loop()


if __name__ == "__main__":
    main()
