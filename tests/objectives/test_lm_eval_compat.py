"""lm-eval is touched in one module, which refuses versions it was not checked against."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from dfsmerge.errors import ConfigError
from dfsmerge.objectives.lm_eval_compat import SUPPORTED_LM_EVAL, check_lm_eval_version

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "dfsmerge"
COMPAT = PKG / "objectives" / "lm_eval_compat.py"


def test_supported_range_is_pyprojects_pin():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d for d in deps if d.replace("_", "-").startswith("lm-eval")]
    assert pins == [f"lm-eval{SUPPORTED_LM_EVAL}"]


def test_installed_version_passes_and_others_fail_on_one_line():
    import importlib.metadata

    assert check_lm_eval_version() == importlib.metadata.version("lm_eval")
    for bad in ("0.5.0", "0.4.12", "1.0"):
        with pytest.raises(ConfigError) as e:
            check_lm_eval_version(bad)
        msg = str(e.value)
        assert "\n" not in msg and bad in msg and SUPPORTED_LM_EVAL in msg and "pip install" in msg


def _modules():
    return [(p, ast.parse(p.read_text())) for p in sorted(PKG.rglob("*.py"))]


def test_only_the_compat_module_imports_lm_eval():
    offenders = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n == "lm_eval" or n.startswith("lm_eval.") for n in names) and path != COMPAT:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


@pytest.mark.parametrize("rel", ["objectives/native.py", "objectives/tasks.py", "objectives/evaluator.py",
                                 "objectives/lm_adapter.py"])
def test_scoring_modules_read_no_private_attribute_of_other_objects(rel):
    """A private attribute (``task._instances``, ``lm._forward``) is read only on ``self``/``cls``."""
    tree = ast.parse((PKG / rel).read_text())
    private = [f"{rel}:{n.lineno} .{n.attr}" for n in ast.walk(tree)
               if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
               and not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"))]
    assert private == []
