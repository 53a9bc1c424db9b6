"""A second writer of a live run is refused at once naming the first's pid, readers keep working, a dead writer's
lock is taken over on resume; SIGINT/SIGTERM pause a search at the next candidate with the resume command printed,
a second signal stops it at once, and either way the resumed run's evals equal an uninterrupted run's."""

from __future__ import annotations

import os
import shlex
import signal
import time

import pytest

from dfsmerge.rundir.lock import LOCK_NAME, RunLock, RunLockedError, check_unlocked, holder
from dfsmerge.search import load_search_config, run_search
from tests.faults.conftest import same_evals, wait_lines

SLOW = 0.4  # seconds added to each candidate, so that a signal or a second process lands mid-run


def test_lock_in_process(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert holder(run) is None
    with RunLock(run) as lock:
        assert lock.stale is None
        assert holder(run) == f"pid {os.getpid()} on {os.uname().nodename}"
        with pytest.raises(RunLockedError, match=rf"pid {os.getpid()}\b.*kill -TERM {os.getpid()}"):
            RunLock(run).acquire()
        with pytest.raises(RunLockedError, match=str(os.getpid())):
            check_unlocked(run)
    assert holder(run) is None
    check_unlocked(run)
    # a dead holder's file (its pid inside, no flock) is no lock: it is taken over and reported as stale
    (run / LOCK_NAME).write_text("pid 999999 on elsewhere\n")
    assert holder(run) is None
    with RunLock(run) as lock:
        assert lock.stale == "pid 999999 on elsewhere"


def test_second_writer_refused_at_once_and_readers_work(dfs, search_cfg, tmp_path):
    # 400 candidates of 1 s: far longer than the readers take on a loaded machine (it is paused below); with 40 the
    # search once ended before the readers did at a load of 6, and the pause found it writing its final report
    cfg = search_cfg("joint", "cma", popsize=4, max_evals=400)
    run = tmp_path / "run"
    live = dfs.start("search", cfg, "--out", run, "--quiet", slow=1.0)
    try:
        wait_lines(run / "evals.jsonl", 2, live)
        for args in (["--resume"], []):  # a second resume, and a new run typed into the same --out
            t0 = time.monotonic()
            p = dfs.run("search", cfg, "--out", run, "--quiet", *args)
            dt = time.monotonic() - t0
            assert p.returncode == 2, p.stderr
            lines = p.stderr.strip().splitlines()
            assert len(lines) == 1 and "RunLockedError" in lines[0] and f"pid {live.pid}" in lines[0], p.stderr
            assert "Traceback" not in p.stderr
            # the refusal comes before the config (and torch) is loaded: the interpreter's start-up is most of it
            # (0.1 s measured on the 2-core machine under a load of 5)
            assert dt < 1, f"refused after {dt:.1f}s"
        n_before = (run / "evals.jsonl").read_text().count("\n")
        p = dfs.run("inspect", run)  # readers during the live search
        assert p.returncode == 0, p.stderr
        assert "evaluations" in p.stdout
        p = dfs.run("export", run, "--candidate", "0", "--out", tmp_path / "exported")
        assert p.returncode == 0, p.stderr
        assert (tmp_path / "exported" / "config.json").is_file()
        assert live.poll() is None, "the live search ended before the readers were checked"
        assert (run / "evals.jsonl").read_text().count("\n") >= n_before
        live.send_signal(signal.SIGTERM)  # a pause (resumed like SIGINT's, test_sigint_pauses_...)
        out, err = live.communicate(timeout=60)
        assert live.returncode == 128 + signal.SIGTERM, err
        assert "dfsmerge: search paused (SIGTERM)" in err and "--resume" in err
    finally:
        if live.poll() is None:
            live.kill()
    assert holder(run) is None


def test_sigkilled_holder_leaves_a_stale_lock(tmp_path):
    """flock dies with its holder: a process SIGKILLed while holding the lock leaves the file (its pid inside) but no
    lock; the next writer takes it and learns whose it was."""
    import subprocess
    import sys

    from tests.faults.conftest import REPO

    run = tmp_path / "run"
    run.mkdir()
    code = ("import sys, time; from dfsmerge.rundir.lock import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.stdout.readline().strip() == "held"
    assert holder(run).startswith(f"pid {p.pid} ")
    with pytest.raises(RunLockedError, match=f"pid {p.pid}"):
        check_unlocked(run)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert (run / LOCK_NAME).read_text().startswith(f"pid {p.pid} ")
    assert holder(run) is None
    with RunLock(run) as lock:
        assert lock.stale.startswith(f"pid {p.pid} ")


def test_sigkilled_search_lock_recovered_on_resume(dfs, search_cfg, tmp_path):
    """A live `dfsmerge search` SIGKILLed mid-run (as the OOM killer does) leaves its lock file; `--resume` takes it
    over, says whose it was, and ends with the uninterrupted run's evals."""
    cfg = search_cfg("joint", "cma", popsize=4, max_evals=12)
    run = tmp_path / "run"
    live = dfs.start("search", cfg, "--out", run, "--quiet", slow=SLOW)
    wait_lines(run / "evals.jsonl", 3, live)
    live.send_signal(signal.SIGKILL)
    live.communicate(timeout=30)
    assert live.returncode == -signal.SIGKILL
    assert (run / LOCK_NAME).read_text().startswith(f"pid {live.pid} ")  # the dead writer's file stays
    assert holder(run) is None  # but it is no lock
    p = dfs.run("search", cfg, "--out", run, "--resume")  # not quiet: the recovered lock is logged
    assert p.returncode == 0, p.stderr
    assert f"recovered the lock of a dead writer (pid {live.pid} " in p.stderr, p.stderr
    run_search(load_search_config(cfg), tmp_path / "ref", progress=False)
    same_evals(run, tmp_path / "ref")
    assert holder(run) is None


def test_sigint_pauses_and_resume_equals_uninterrupted(dfs, search_cfg, tmp_path):
    # (SIGTERM takes the same path: test_second_writer_refused_at_once_and_readers_work pauses with it)
    sig = signal.SIGINT
    cfg = search_cfg("staged", "cma", popsize=3, max_evals=6)
    run = tmp_path / "run"
    live = dfs.start("search", cfg, "--out", run, "--quiet", "--max-evals", "12", slow=SLOW)
    n = wait_lines(run / "evals.jsonl", 4, live)
    live.send_signal(sig)
    out, err = live.communicate(timeout=60)
    assert live.returncode == 128 + sig, err
    line = [x for x in err.splitlines() if x.startswith("dfsmerge: search paused")]
    assert len(line) == 1, err
    assert "Traceback" not in err
    done = (run / "evals.jsonl").read_text().count("\n")
    assert n <= done <= n + 2  # at most the candidate running when the signal came (and its duplicate) more
    cmd = shlex.split(line[0].split("resume with: ", 1)[1])
    assert cmd[:2] == ["dfsmerge", "search"] and "--resume" in cmd and "--max-evals" in cmd
    p = dfs.run(*cmd[1:])
    assert p.returncode == 0, p.stderr
    run_search(load_search_config(cfg), tmp_path / "ref", progress=False, **{"budget.max_evals": 12})
    same_evals(run, tmp_path / "ref")
    assert holder(run) is None


@pytest.mark.slow  # three processes
def test_second_sigint_stops_at_once_and_stays_resumable(dfs, search_cfg, tmp_path):
    cfg = search_cfg("joint", "cma", popsize=4, max_evals=8)
    run = tmp_path / "run"
    slow = 5.0  # a candidate far longer than the test waits: only the second signal can end the process in time
    live = dfs.start("search", cfg, "--out", run, "--quiet", slow=slow)
    while not (run / "state" / "state.json").exists():  # checkpointed after the first ask: scoring candidate 0
        assert live.poll() is None, live.stderr.read()[-2000:]
        time.sleep(0.05)
    live.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert live.poll() is None  # the first one waits for the running candidate
    t0 = time.monotonic()
    live.send_signal(signal.SIGINT)
    live.communicate(timeout=30)
    assert time.monotonic() - t0 < slow  # not the running candidate's end
    assert live.returncode == -signal.SIGINT
    assert holder(run) is None  # its lock died with it
    p = dfs.run("search", cfg, "--out", run, "--resume")  # not quiet: the recovered lock is logged
    assert p.returncode == 0, p.stderr
    assert f"recovered the lock of a dead writer (pid {live.pid} " in p.stderr
    run_search(load_search_config(cfg), tmp_path / "ref", progress=False)
    same_evals(run, tmp_path / "ref")
