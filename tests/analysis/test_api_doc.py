"""docs/api.md's worked example runs as written, on a tiny joint run of the toy's shape (its path stands in for
``runs/toy_joint``)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_the_worked_example_runs(joint_run, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 3
    ns: dict = {}
    for code in blocks:
        exec(compile(code.replace('"runs/toy_joint"', repr(str(joint_run))), str(DOC), "exec"), ns)  # noqa: S102
    out = capsys.readouterr().out
    run = ns["run"]
    assert f"best id {run.best.id}" in out
    assert (joint_run / "ablation" / "table.md").is_file()
    assert "paired differences against" in out
    assert len(ns["table"]["rows"]) == len(ns["rows"]) and ns["cmp"].tests
