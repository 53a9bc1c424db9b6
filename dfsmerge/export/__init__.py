"""Hugging Face export of layer paths (DFS), merge recipes (PS) and both (docs/design.md section 6).

``export_plan`` writes a folded (plain architecture) or compact (``trust_remote_code``) checkpoint with
``mergekit.yaml`` and a model card; ``export_candidate`` does it for a candidate of a search run;
``dfsmerge.export.cli.run_export`` is the handler of ``dfsmerge export``.

The names are resolved on first use (PEP 562), so the command line can import ``dfsmerge.export.cli`` for its
handler while it builds its parser, without importing torch.
"""

from dfsmerge._lazy import lazy_getattr

_EXPORTS = {
    "RunCandidate": "candidate", "export_candidate": "candidate", "load_run_candidate": "candidate",
    "FORMATS": "exporter", "ExportInfo": "info", "export_plan": "exporter",
    "export_ps": "exporter", "unique_layers": "exporter",
    "check_foldable": "fold", "cumulative_scales": "fold", "eps_bound": "fold",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())
