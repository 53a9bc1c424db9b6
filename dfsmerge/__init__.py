"""dfsmerge: evolutionary model merging in parameter space (PS) and data-flow space (DFS)."""

import importlib.util as _ilu
import sys as _sys
from pathlib import Path as _Path

__version__ = "0.1.0"


def _mount_kernels() -> None:
    # The Triton kernels live in the repository's top-level ``kernels/`` directory. A wheel installs them as
    # ``dfsmerge/kernels`` (pyproject's package-dir); a source checkout or editable install mounts them here.
    here = _Path(__file__).resolve().parent
    src = here.parent / "kernels" / "__init__.py"
    if (here / "kernels").is_dir() or not src.is_file() or "dfsmerge.kernels" in _sys.modules:
        return
    spec = _ilu.spec_from_file_location("dfsmerge.kernels", src, submodule_search_locations=[str(src.parent)])
    module = _ilu.module_from_spec(spec)
    _sys.modules["dfsmerge.kernels"] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module


_mount_kernels()
