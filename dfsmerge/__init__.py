"""dfsmerge: evolutionary model merging in parameter space (PS) and data-flow space (DFS)."""

import importlib.abc as _iabc
import importlib.util as _ilu
import sys as _sys
from pathlib import Path as _Path

__version__ = "0.1.0"


class _KernelsFinder(_iabc.MetaPathFinder):
    """Finds ``dfsmerge.kernels`` in the repository's top-level ``kernels/`` directory.

    A wheel installs the kernels as ``dfsmerge/kernels`` (pyproject's package-dir); a source checkout or an
    editable install keeps them at the top level. The finder is consulted only when ``dfsmerge.kernels`` is
    imported, so importing dfsmerge stays free of torch and triton.
    """

    def __init__(self, src: _Path):
        self.src = src

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "dfsmerge.kernels":
            return None
        return _ilu.spec_from_file_location(fullname, self.src / "__init__.py",
                                            submodule_search_locations=[str(self.src)])


def _mount_kernels() -> None:
    here = _Path(__file__).resolve().parent
    src = here.parent / "kernels"
    if (here / "kernels").is_dir() or not (src / "__init__.py").is_file():
        return
    if not any(isinstance(f, _KernelsFinder) for f in _sys.meta_path):
        _sys.meta_path.append(_KernelsFinder(src))


_mount_kernels()
