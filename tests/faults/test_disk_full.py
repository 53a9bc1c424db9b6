"""A full disk at each write site of a search (evals.jsonl, the state checkpoint, config.yaml, best/, the report) and
of an export: the command stops with a one-line error naming the path and the space needed (exit 2), nothing
half-written replaces a good file, and after the space returns ``--resume`` ends with the uninterrupted run's evals
and outputs. ENOSPC is injected at the n-th write of each site (tests/faults/inject.py); where this process may mount
a size-limited tmpfs, a real full filesystem is tested too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from dfsmerge.cli import main
from dfsmerge.search import load_search_config, run_search
from tests.faults import inject
from tests.faults.conftest import same_evals

# site, glob under the run directory, which matching write fails
SEARCH_SITES = [
    ("evals", "evals.jsonl", 3),
    ("state", "state/.state.json.*", 3),
    ("config", ".config.yaml.*", 1),
    ("best", "best/.*", 2),
    ("report", "report/.*", 1),
]


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _check_intact(run: Path) -> None:
    assert not [p for p in run.rglob("*.tmp*")], "a temporary file was left behind"
    if (run / "evals.jsonl").exists():
        for line in (run / "evals.jsonl").read_text().splitlines(keepends=True):
            assert line.endswith("\n")
            json.loads(line)
    if (run / "state" / "state.json").exists():
        assert json.loads((run / "state" / "state.json").read_text())["format"] == 1


def _one_line_error(capsys, target: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    err = [e for e in err if e.startswith("dfsmerge: error")]
    assert len(err) == 1, err
    assert "DiskFullError: no space left on device writing" in err[0] and target in err[0], err[0]
    assert " needed, " in err[0] and " free)" in err[0], err[0]
    return err[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_models):
    import yaml

    d = tmp_path_factory.mktemp("disk_full_ref")
    genome = {"mode": "joint", "models": [str(tiny_models["m1"]), str(tiny_models["m2"])],
              "base_model": str(tiny_models["base"]), "layer_granularity": 1, "dfs": {"repetitions": 2}}
    cfg = {"genome": genome, "optimizer": {"name": "cma", "popsize": 4}, "budget": {"max_evals": 8},
           "objectives": [{"type": "synthetic", "name": "sphere"},
                          {"type": "synthetic", "name": "path_length", "weight": 0.1}]}
    path = d / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_search(load_search_config(path), d / "ref", progress=False)
    return path, d / "ref"


@pytest.mark.parametrize("site,glob,n", SEARCH_SITES, ids=[s[0] for s in SEARCH_SITES])
def test_search_disk_full_at_each_site(reference, tmp_path, capsys, site, glob, n):
    cfg, ref = reference
    run = tmp_path / "run"
    undo, hit = inject.install(str(run / glob), n)
    try:
        rc = main(["search", str(cfg), "--out", str(run), "--quiet"])
    finally:
        undo()
    assert hit["hit"] is not None, f"the {site} write site was not reached"
    assert rc == 2
    target = Path(hit["hit"]).name if site in ("evals",) else site
    line = _one_line_error(capsys, {"state": "state.json", "config": "config.yaml", "best": "best",
                                    "report": "report"}.get(site, target))
    assert str(run) in line
    _check_intact(run)
    resume = [] if site == "config" else ["--resume"]  # no config.yaml: the run never started, start it again
    assert main(["search", str(cfg), "--out", str(run), "--quiet", *resume]) == 0, capsys.readouterr().err
    same_evals(run, ref)
    got, want = _files(run / "best"), _files(ref / "best")
    assert got.keys() == want.keys()
    for name in want:
        if name != "best.json":
            assert got[name] == want[name], name
    assert (run / "report" / "report.md").is_file()


def test_export_disk_full(reference, tmp_path, capsys):
    cfg, ref = reference
    good = tmp_path / "good"
    assert main(["export", str(ref), "--candidate", "best", "--out", str(good)]) == 0
    capsys.readouterr()
    for n in (1, 4):  # a shard, a side file
        out = tmp_path / f"exp{n}"
        undo, hit = inject.install(str(tmp_path / f".exp{n}.tmp-*"), n)
        try:
            rc = main(["export", str(ref), "--candidate", "best", "--out", str(out)])
        finally:
            undo()
        assert hit["hit"] is not None and rc == 2
        line = _one_line_error(capsys, str(out))
        assert "at least" in line
        assert not out.exists() and not list(tmp_path.glob(f".exp{n}.tmp-*"))  # nothing half-written in place
        assert main(["export", str(ref), "--candidate", "best", "--out", str(out)]) == 0
        assert _files(out) == _files(good)


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return p.returncode == 0


def test_real_full_tmpfs(reference, tmp_path, capsys):
    """A real filesystem that fills mid-search (a 1 MiB tmpfs, a filler file leaving a few KiB)."""
    cfg, ref = reference
    fs = tmp_path / "fs"
    if not _mount_tmpfs(fs, "1m"):
        pytest.skip("mounting a size-limited tmpfs needs root and mount(8); the injected ENOSPC tests cover the sites")
    try:
        filler = fs / "filler"
        free = shutil.disk_usage(fs).free
        want_evals = (ref / "evals.jsonl").stat().st_size
        with open(filler, "wb") as f:  # room for about half of the log (and the small files)
            f.write(b"\0" * max(0, free - want_evals // 2 - 8 * 4096))
        run = fs / "run"
        assert main(["search", str(cfg), "--out", str(run), "--quiet"]) == 2
        line = _one_line_error(capsys, str(run))
        _check_intact(run)
        filler.unlink()
        assert main(["search", str(cfg), "--out", str(run), "--quiet", "--resume"]) == 0, line
        same_evals(run, ref)
    finally:
        subprocess.run(["umount", str(fs)], capture_output=True)
