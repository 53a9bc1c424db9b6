"""A full disk at each write site of a search (evals.jsonl, the state checkpoint, config.yaml, best/, the report) and
of an export: the command stops with a one-line error naming the path and the space needed (exit 2), nothing
half-written replaces a good file, and after the space returns ``--resume`` ends with the uninterrupted run's evals
and outputs. ENOSPC is injected at the n-th write of each site (tests/faults/inject.py); where this process may mount
a size-limited tmpfs, a real full filesystem is tested too."""

from __future__ import annotations

import json
import os
import re
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


# --- every write site in turn: the writes of a whole command are recorded, then each file's first and last write
# (a file written twice, as the report is by the search loop and again by `dfsmerge search` with significance, gets
# both) fails in turn ---------------------------------------------------------------------------------------------

_TMP_NAME = re.compile(r"^\.(.+)\.[^.]+\.tmp$")  # atomic_write's and the report's temporary files
# the random part of temporary directories (ShardedWriter's, the export's PS part and folded intermediate)
_TMP_DIR = re.compile(r"\.(tmp|ps|folded)-[\d-]*[0-9a-f]{8}")


def _target(path: str, root: Path) -> str:
    """The file a write is for, relative to ``root``, the same in every run: a temporary file's final name, a
    temporary directory's name without its random part."""
    *dirs, name = Path(path).relative_to(root).parts
    if m := _TMP_NAME.match(name):
        name = m.group(1)
    return "/".join([_TMP_DIR.sub(lambda m: "." + m.group(1), d) for d in dirs] + [name])


def _write_sites(paths: list[str], root: Path) -> dict[str, list[int]]:
    """``{target: [first write, last write]}`` (1-based indices among all recorded writes)."""
    sites: dict[str, list[int]] = {}
    for i, p in enumerate(paths, 1):
        sites.setdefault(_target(p, root), [i, i])[1] = i
    return {t: sorted(set(ns)) for t, ns in sites.items()}


def _check_complete(d: Path) -> None:
    """Every file in ``d`` is whole: JSON and YAML parse, PNG images end with their IEND chunk."""
    import yaml

    for p in d.rglob("*"):
        if p.suffix == ".png":
            assert p.read_bytes().endswith(b"IEND\xaeB`\x82"), f"{p} is cut short"
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix in (".yaml", ".yml"):
            yaml.safe_load(p.read_text())


def test_search_disk_full_at_every_write_site(reference, tmp_path, capsys):
    cfg, ref = reference
    rec = tmp_path / "recorded"
    undo, state = inject.install(f"{rec}/*", 0)
    try:
        assert main(["search", str(cfg), "--out", str(rec), "--quiet"]) == 0
    finally:
        undo()
    sites = _write_sites(state["paths"], rec)
    for target in ("config.yaml", "state/state.json", "evals.jsonl", "best/best.json", "best/plan.yaml",
                   "report/report.md", "report/fitness.png", "report/path.png"):
        assert target in sites, f"{target} was not written: {sorted(sites)}"
    capsys.readouterr()
    failures = []
    for k, (target, ns) in enumerate(sorted(sites.items())):
        for n in ns:
            run = tmp_path / f"run{k}-{n}"
            undo, hit = inject.install(f"{run}/*", n)
            try:
                rc = main(["search", str(cfg), "--out", str(run), "--quiet"])
            finally:
                undo()
            err = capsys.readouterr().err
            lines = [e for e in err.strip().splitlines() if e.startswith("dfsmerge: error")]
            if hit["hit"] is None or _target(hit["hit"], run) != target:
                failures.append(f"{target} write {n}: the injection hit {hit['hit']}")
                continue
            if not (rc == 2 and len(lines) == 1 and "Traceback" not in err
                    and "DiskFullError: no space left on device writing" in lines[0] and str(run) in lines[0]
                    and " free)" in lines[0]):
                failures.append(f"{target} write {n}: rc={rc} {err[-600:]}")
                continue
            _check_intact(run)
            _check_complete(run)
            resume = [] if target == "config.yaml" else ["--resume"]  # no config.yaml: the run never started
            rc = main(["search", str(cfg), "--out", str(run), "--quiet", *resume])
            err = capsys.readouterr().err
            if rc != 0:
                failures.append(f"{target} write {n}: resume rc={rc} {err[-600:]}")
                continue
            same_evals(run, ref)
            got, want = _files(run / "best"), _files(ref / "best")
            assert got.keys() == want.keys()
            assert all(got[f] == want[f] for f in want if f != "best.json"), target
            assert (run / "report" / "report.md").is_file()
            _check_complete(run)
    print(f"search: ENOSPC at {sum(map(len, sites.values()))} writes of {len(sites)} files: {sorted(sites)}")
    assert not failures, "\n".join(failures)


@pytest.mark.filterwarnings("ignore:.*llama.cpp's pre-tokenizer:UserWarning")  # a tokenizer trained in the test
@pytest.mark.parametrize("fmt", ["folded", "compact", "gguf"])
def test_export_disk_full_at_every_write_site(reference, tmp_path, capsys, fmt):
    """A run's candidate (a PS merge and a layer path) exported folded and compact; GGUF needs a BPE tokenizer, so
    a plan over a small Llama with one is exported to GGUF (a folded intermediate, then the .gguf file)."""
    cfg, ref = reference
    args = ["export", str(ref), "--candidate", "best", "--format", fmt]
    if fmt == "gguf":
        from dfsmerge.genome.plan import PathPlan
        from tests.export.test_gguf_export import _tiny

        src = _tiny("llama", tmp_path / "src")
        (tmp_path / "plan.yaml").write_text(PathPlan.identity("S", 3, models={"S": str(src)}).to_yaml())
        args = ["export", "--plan", str(tmp_path / "plan.yaml"), "--format", "gguf", "--quant", "q8_0"]
    good, rec = tmp_path / "good" / "out", tmp_path / "rec"  # named "out" as every export below (GGUF file names)
    rec.mkdir()
    assert main([*args, "--out", str(good)]) == 0
    undo, state = inject.install(f"{rec}/*", 0)
    try:
        assert main([*args, "--out", str(rec / "out")]) == 0
    finally:
        undo()
    sites = _write_sites(state["paths"], rec)
    assert any(t.endswith((".safetensors", ".gguf")) for t in sites), sites
    capsys.readouterr()
    failures = []
    for k, (target, ns) in enumerate(sorted(sites.items())):
        for n in ns:
            parent = tmp_path / f"x{k}-{n}"
            parent.mkdir()
            out = parent / "out"
            undo, hit = inject.install(f"{parent}/*", n)
            try:
                rc = main([*args, "--out", str(out)])
            finally:
                undo()
            err = capsys.readouterr().err
            lines = [e for e in err.strip().splitlines() if e.startswith("dfsmerge: error")]
            if hit["hit"] is None or _target(hit["hit"], parent) != target:
                failures.append(f"{target} write {n}: the injection hit {hit['hit']}")
                continue
            if not (rc == 2 and len(lines) == 1 and "Traceback" not in err
                    and "DiskFullError: no space left on device writing" in lines[0] and str(parent) in lines[0]):
                failures.append(f"{target} write {n}: rc={rc} {err[-600:]}")
                continue
            if list(parent.iterdir()):  # nothing half-written in place, no temporary left
                failures.append(f"{target} write {n}: left {[p.name for p in parent.iterdir()]}")
                continue
            assert main([*args, "--out", str(out)]) == 0
            assert _files(out) == _files(good), target
    print(f"export {fmt}: ENOSPC at {sum(map(len, sites.values()))} writes of {len(sites)} files: {sorted(sites)}")
    assert not failures, "\n".join(failures)


def test_subset_fitness_record_disk_full(tmp_path):
    """Subset fitness's append-only records (responses.jsonl, rescored.jsonl): a full disk cuts the partial line
    back and stops with the one-line error; the file keeps its complete lines."""
    from dfsmerge.io.diskspace import DiskFullError
    from dfsmerge.search.subset_fitness import _append, _lines

    path = tmp_path / "responses.jsonl"
    _append(path, {"key": "a", "generation": 0})
    undo, hit = inject.install(str(path), 1)
    try:
        with pytest.raises(DiskFullError, match=r"no space left on device writing .*responses.jsonl.* needed, .* free"):
            _append(path, {"key": "b", "generation": 0, "responses": list(range(100))})
    finally:
        undo()
    assert hit["hit"] is not None
    assert path.read_text().endswith("\n")
    assert _lines(path) == [{"key": "a", "generation": 0}]
    _append(path, {"key": "b", "generation": 1})
    assert [r["key"] for r in _lines(path)] == ["a", "b"]
