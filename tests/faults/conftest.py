"""Fault-injection harness: real ``dfsmerge`` subprocesses started through a runner that can slow each candidate down
(so a signal or a second process lands mid-run) and inject ``ENOSPC`` at the n-th write of a chosen file. The hooks
live only in the runner script written here; the package has none."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.search.conftest import (  # noqa: F401 - fixtures
    make_config,
    mc_task_dir,
    read_evals,
    strip_volatile,
    tiny_models,
)

REPO = Path(__file__).resolve().parents[2]

# DFSMERGE_TEST_SLOW=s: every candidate takes s more seconds.
# DFSMERGE_TEST_ENOSPC=GLOB:N[:KEEP]: the N-th write to files whose path matches GLOB fails with ENOSPC after KEEP
# of its bytes (default half), as a filling disk does (tests/faults/inject.py).
RUNNER = textwrap.dedent('''
    import os, sys, time
    slow = float(os.environ.get("DFSMERGE_TEST_SLOW", "0") or 0)
    if slow:
        from dfsmerge.search import worker as W
        orig = W.Worker.evaluate
        def evaluate(self, *a, **k):
            time.sleep(slow)
            return orig(self, *a, **k)
        W.Worker.evaluate = evaluate
    spec = os.environ.get("DFSMERGE_TEST_ENOSPC")
    if spec:
        from tests.faults.inject import install
        glob, n, *keep = spec.split(":")
        install(glob, int(n), int(keep[0]) if keep else None)
    from dfsmerge.cli import main
    sys.exit(main())  # the arguments from sys.argv, as the `dfsmerge` command
''')


def same_evals(run: Path, ref: Path) -> None:
    got, want = read_evals(run), read_evals(ref)
    assert [r["id"] for r in got] == list(range(len(got))), "a gap or a duplicate id"
    assert len(got) == len(want)
    assert [strip_volatile(r) for r in got] == [strip_volatile(r) for r in want]


class Dfsmerge:
    """Starts ``dfsmerge`` commands in subprocesses through the runner."""

    def __init__(self, tmp: Path):
        self.runner = tmp / "runner.py"
        self.runner.write_text(RUNNER)
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, str(self.runner), *map(str, args)]

    def start(self, *args: str, slow: float = 0.0, enospc: str | None = None) -> subprocess.Popen:
        env = {**self.env, "DFSMERGE_TEST_SLOW": str(slow)}
        if enospc:
            env["DFSMERGE_TEST_ENOSPC"] = enospc
        return subprocess.Popen(self.argv(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def run(self, *args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
        p = self.start(*args, **kw)
        out, err = p.communicate(timeout=timeout)
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def wait_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    """Wait until ``path`` has at least ``n`` lines (the process must still run)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        k = path.read_bytes().count(b"\n") if path.exists() else 0
        if k >= n:
            return k
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (rc={proc.returncode}) before {n} lines: "
                                 f"{proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    raise AssertionError(f"{path} did not reach {n} lines in {timeout}s")


@pytest.fixture
def dfs(tmp_path) -> Dfsmerge:
    return Dfsmerge(tmp_path)


@pytest.fixture
def search_cfg(make_config, tmp_path):  # noqa: F811 - the fixture imported above
    """``search_cfg(**make_config kwargs)`` -> path of a config file (model-free objectives: each run is short)."""

    def make(mode="joint", optimizer="cma", **kw):
        kw.setdefault("objectives", [{"type": "synthetic", "name": "sphere"},
                                     {"type": "synthetic", "name": "path_length", "weight": 0.1}])
        path = tmp_path / f"config-{mode}-{optimizer}.yaml"
        path.write_text(yaml.safe_dump(make_config(mode, optimizer, **kw)))
        return path

    return make
