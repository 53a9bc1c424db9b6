"""How fast the run-directory lock refuses a second writer, and how fast a search pauses on SIGINT (issue 29's
"exits 2 within a second naming the pid" and "exits within one candidate's time").

1. A run directory whose lock this process holds: ``dfsmerge search CONFIG --out RUN --resume`` is started
   ``--repeats`` times; prints its wall time to exit 2 (interpreter start-up included) and that it named our pid.
2. A search over tiny random models whose objectives are model-free, with each candidate made ``--candidate-s``
   long by a sleeping synthetic objective registered in a runner script: SIGINT once 3 lines are logged; prints
   the seconds from the signal to the exit and the candidates logged after the signal.

    python benchmarks/fault_latency.py [--repeats 5] [--candidate-s 2]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RUNNER = textwrap.dedent('''
    import sys, time
    from dfsmerge.search import worker as W
    @W.register_synthetic("sleepy")
    def _sleepy(u, candidate, obj):
        time.sleep(obj.params["s"])
        return float(((u - 0.3) ** 2).sum())
    from dfsmerge.cli import main
    sys.exit(main())  # the arguments from sys.argv, as the `dfsmerge` command
''')


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--candidate-s", type=float, default=2.0)
    a = ap.parse_args()
    from dfsmerge.rundir.lock import RunLock
    from dfsmerge.zoo.tiny import make_tiny_checkpoint

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = make_tiny_checkpoint("llama", tmp / "base", seed=0, num_layers=2, hidden=16)
        m1 = make_tiny_checkpoint("llama", tmp / "m1", seed=1, like=base, delta_std=0.2)
        cfg = tmp / "c.yaml"
        cfg.write_text(yaml.safe_dump({
            "genome": {"mode": "ps", "models": [str(base), str(m1)], "base_model": str(base)},
            "objectives": [{"type": "synthetic", "name": "sleepy", "params": {"s": a.candidate_s}}],
            "optimizer": {"name": "cma", "popsize": 4}, "budget": {"max_evals": 40}}))
        run = tmp / "locked"
        run.mkdir()
        times = []
        with RunLock(run):
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                p = subprocess.run([sys.executable, "-m", "dfsmerge.cli", "search", str(cfg), "--out", str(run),
                                    "--resume"], env=env, capture_output=True, text=True)
                times.append(time.perf_counter() - t0)
                assert p.returncode == 2 and f"pid {os.getpid()}" in p.stderr, p.stderr
        print(f"second writer refused (exit 2, our pid named): median {statistics.median(times):.2f}s, "
              f"max {max(times):.2f}s over {a.repeats} starts")

        runner = tmp / "runner.py"
        runner.write_text(RUNNER)
        out = tmp / "run"
        live = subprocess.Popen([sys.executable, str(runner), "search", str(cfg), "--out", str(out), "--quiet"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        evals = out / "evals.jsonl"
        while not evals.exists() or evals.read_text().count("\n") < 3:
            time.sleep(0.02)
        n0 = evals.read_text().count("\n")
        t0 = time.perf_counter()
        live.send_signal(signal.SIGINT)
        _, err = live.communicate()
        dt = time.perf_counter() - t0
        n1 = evals.read_text().count("\n")
        line = next((x for x in err.splitlines() if "resume with" in x), "(no resume line)")
        print(f"SIGINT -> exit {live.returncode} in {dt:.2f}s with candidates of {a.candidate_s}s "
              f"({dt / a.candidate_s:.2f} candidates' time); {n1 - n0} candidate(s) logged after the signal")
        print(f"  {line}")


if __name__ == "__main__":
    main()
