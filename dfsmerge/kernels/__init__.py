"""Fused Triton merge kernels, each beside its PyTorch reference (importable as ``dfsmerge.kernels``).

``fused_merge`` is the entry point the merge library and the PS runtime call: Triton on CUDA tensors, the
eager reference elsewhere. Triton is optional (``_common`` guards its import, so the package works without it)
and the kernel modules are imported on first use, so ``TRITON_INTERPRET`` (read when ``triton.jit`` decorates a
kernel) may be set any time before the first Triton merge.

Which methods have a fused kernel is the merge registry's word (``MergeMethod.kernel``, a key of
:data:`KERNELS`); the kernels take the parameters the registry resolved (``dfsmerge.merge.resolve_params``).

Files: ``gta.py`` (task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della,
della_linear), ``linear.py``, ``slerp.py``, ``reductions.py`` (thresholds and ranks as torch reductions),
``_common.py`` (parameter resolution through the registry, input checks), ``dispatch.py`` (:func:`fused_merge`:
which one runs).
"""

from dfsmerge.kernels._common import METHOD_NAMES
from dfsmerge.kernels.dispatch import BACKENDS, KERNELS, fused_merge, triton_available, triton_supports

__all__ = ["BACKENDS", "KERNELS", "METHOD_NAMES", "fused_merge", "triton_available", "triton_supports"]
