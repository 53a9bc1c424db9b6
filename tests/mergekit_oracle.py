"""mergekit 0.1.5 as a test oracle (never imported by the package): run a recipe with its own ``run_merge`` and read
a checkpoint directory's tensors, for the tests that compare ``dfsmerge merge`` with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (all safetensors shards)."""
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def run_mergekit(recipe: dict, out: Path, *, copy_tokenizer: bool = False) -> Path:
    """Merge ``recipe`` (a mergekit YAML as a dict) into ``out`` with mergekit's own ``run_merge``."""
    mk_config = pytest.importorskip("mergekit.config")
    from mergekit.merge import run_merge as mk_run
    from mergekit.options import MergeOptions

    cfg = mk_config.MergeConfiguration.model_validate(recipe)
    mk_run(cfg, str(out), options=MergeOptions(copy_tokenizer=copy_tokenizer, write_model_card=False, quiet=True))
    return out
