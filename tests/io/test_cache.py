"""The cache's build lock: processes that need the same missing entry at once build it once, and none of them reads
an entry another is replacing (two searches started together on a fresh machine; ``pytest -n 2``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dfsmerge.io.cache import building, cache_root

ROOT = Path(__file__).resolve().parents[2]


def _start(code: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "DFSMERGE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DFSMERGE_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("DFSMERGE_CACHE")
    assert cache_root() == Path.home() / ".cache" / "dfsmerge"


def test_second_process_waits_for_the_builder_and_reuses_its_entry(tmp_path):
    """Four processes race for one entry whose build takes a while (``build_once``, what every cached builder
    uses): one builds, three wait and find it built."""
    entry = tmp_path / "entry"
    code = f"""
        import os, time
        from pathlib import Path
        from dfsmerge.io.cache import build_once
        entry = Path({str(entry)!r})
        built = []

        def build():
            time.sleep(0.5)  # a build long enough for the others to arrive meanwhile
            tmp = entry.with_name(".entry.tmp")
            tmp.write_text(str(os.getpid()))
            os.replace(tmp, entry)
            built.append(True)

        assert build_once(entry, entry.is_file, build) == entry
        print("built" if built else "reused", entry.read_text())
        """
    procs = [_start(code, _env(tmp_path)) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    lines = [o.split() for o, _ in outs]
    built = [pid for verb, pid in lines if verb == "built"]
    assert len(built) == 1
    assert all(pid == built[0] for _, pid in lines)  # every process saw the one build's entry
    assert entry.read_text() == built[0]


def test_lock_is_released_when_its_holder_is_killed(tmp_path):
    entry = tmp_path / "entry"
    holder = _start(f"""
        import time
        from pathlib import Path
        from dfsmerge.io.cache import building
        with building(Path({str(entry)!r})):
            print("holding", flush=True)
            time.sleep(600)
        """, _env(tmp_path))
    assert holder.stdout.readline().strip() == "holding"
    holder.kill()
    holder.wait()
    with building(entry):  # would block forever if the dead holder's lock survived
        entry.write_text("mine")
    assert entry.read_text() == "mine"


def test_two_processes_building_one_zoo_train_it_once(tmp_path):
    """``build_zoo`` on one missing directory from two processes at once: one trains (logs its phases), the other
    waits and loads the finished zoo; both see the same files."""
    code = f"""
        import json
        from dfsmerge.zoo import build_zoo
        lines = []
        zoo = build_zoo({str(tmp_path / "zoo")!r}, size="tiny", progress=False, threads=1, log=lines.append)
        print(json.dumps({{"trained": bool(lines), "checksums": zoo.checksums()}}))
        """
    procs = [_start(code, _env(tmp_path)) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    got = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    assert sorted(g["trained"] for g in got) == [False, True]
    assert got[0]["checksums"] == got[1]["checksums"]
    assert not list(tmp_path.glob(".zoo.building-*"))  # no half-built directory left beside it


@pytest.mark.filterwarnings("ignore:.*llama.cpp's pre-tokenizer:UserWarning")  # a tokenizer trained in the test
def test_cached_gguf_conversion_is_reused_without_reading_the_file_again(tmp_path, monkeypatch):
    """A GGUF source converts once; later uses find the conversion by content hash and check its family from the
    conversion's record, not by parsing the file's metadata again (seconds per use for a real vocabulary). A record
    of a family this version does not support still fails in one line."""
    import dfsmerge.io.gguf as G
    from dfsmerge.errors import ArchitectureError
    from dfsmerge.export import export_plan
    from dfsmerge.genome.plan import PathPlan
    from tests.export.test_gguf_export import _tiny

    monkeypatch.setenv("DFSMERGE_CACHE", str(tmp_path / "cache"))
    src = _tiny("llama", tmp_path / "src")
    export_plan(PathPlan.identity("S", 3, models={"S": str(src)}), tmp_path / "g", format="gguf", quant="f32")
    (path,) = (tmp_path / "g").glob("*.gguf")
    parsed = []
    real = G.gguf_model_type
    monkeypatch.setattr(G, "gguf_model_type", lambda p: parsed.append(p) or real(p))
    first = G.cached_gguf_checkpoint(path)
    assert len(parsed) == 1 and (first / "config.json").is_file()
    assert G.cached_gguf_checkpoint(path) == first
    assert len(parsed) == 1  # the second use read the record, not the file
    record = first / G._DONE
    record.write_text(json.dumps({**json.loads(record.read_text()), "model_type": "nosuchfamily"}))
    with pytest.raises(ArchitectureError, match="nosuchfamily"):
        G.cached_gguf_checkpoint(path)
