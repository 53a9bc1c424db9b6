"""Hugging Face export of layer paths (DFS), merge recipes (PS) and both (DESIGN.md section 6).

``export_plan`` writes a folded (plain architecture) or compact (``trust_remote_code``) checkpoint with
``mergekit.yaml`` and a model card; ``export_candidate`` does it for a candidate of a search run;
``dfsmerge.export.cli.add_export_parser`` adds ``dfsmerge export`` to the CLI.
"""

from dfsmerge.export.candidate import RunCandidate, export_candidate, load_run_candidate
from dfsmerge.export.exporter import FORMATS, PS_MARKER, ExportInfo, export_plan, export_ps, unique_layers
from dfsmerge.export.fold import check_foldable, cumulative_scales, eps_bound

__all__ = ["FORMATS", "PS_MARKER", "ExportInfo", "RunCandidate", "check_foldable", "cumulative_scales", "eps_bound",
           "export_candidate", "export_plan", "export_ps", "load_run_candidate", "unique_layers"]
