"""Packaging: every package directory is installed, and the kernels import as dfsmerge.kernels."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_directory_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"dfsmerge." + p.parent.relative_to(ROOT / "dfsmerge").as_posix().replace("/", ".")
             for p in (ROOT / "dfsmerge").rglob("__init__.py") if p.parent != ROOT / "dfsmerge"}
    found.add("dfsmerge")
    assert found == listed, f"missing from pyproject: {found - listed}; stale: {listed - found}"


def test_importing_dfsmerge_is_light_and_kernels_mount():
    code = ("import sys, dfsmerge; assert 'torch' not in sys.modules; "
            "import dfsmerge.kernels as k; print(k.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "dfsmerge.kernels"


def test_command_line_parser_builds_without_torch():
    """`dfsmerge --help` and argument errors stay instant: sub-commands import their libraries when they run."""
    code = ("import sys, dfsmerge.cli as c; c.build_parser(); "
            "heavy = [m for m in ('torch', 'transformers', 'cma', 'pymoo') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
