"""What a search writes to best/ exports with `dfsmerge export RUN --candidate best`, in every mode, and the
export computes what the runtime computed for that candidate."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from dfsmerge.cli import main
from dfsmerge.runtime.stitched import StitchedModel
from dfsmerge.search import load_search_config, run_search


def _cli(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, err.getvalue()


@pytest.mark.parametrize("mode", ["ps", "dfs", "staged", "joint"])
def test_best_candidate_exports_and_matches_the_runtime(mode, make_config, tmp_path):
    from transformers import AutoModelForCausalLM

    from dfsmerge.export.candidate import load_run_candidate

    cfg = load_search_config(make_config(mode, "cma", popsize=4, max_evals=8))
    run = tmp_path / "run"
    run_search(cfg, run, progress=False)
    best = json.loads((run / "best" / "best.json").read_text())
    rc, err = _cli("export", str(run), "--candidate", "best", "--out", str(tmp_path / "model"))
    assert rc == 0, err
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"), dtype=torch.float32)
    path = best["candidate"]["path"]
    if path is not None:
        assert model.config.num_hidden_layers == len(path["path"])
    ids = torch.tensor([[1, 5, 9, 12, 7, 3, 20, 11]])
    got = model(ids).logits
    assert torch.isfinite(got).all()
    # the same candidate exported by id gives the same checkpoint
    rc, err = _cli("export", str(run), "--candidate", str(best["id"]), "--out", str(tmp_path / "by_id"))
    assert rc == 0, err
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "by_id"), dtype=torch.float32)(ids).logits
    torch.testing.assert_close(got, again, rtol=0, atol=0)
    found = load_run_candidate(run, "best")
    assert (found.ps, found.path) == (best["candidate"]["ps"], best["candidate"]["path"])

    # independent reference: merge the logged recipe with `dfsmerge merge`, stitch the logged path over it
    from dfsmerge.genome.plan import PathPlan
    from dfsmerge.recipe.config import load_merge_config
    from dfsmerge.recipe.executor import run_merge
    from dfsmerge.runtime.pool import LayerPool

    merged = None
    if best["candidate"]["ps"] is not None:
        merged = run_merge(load_merge_config(best["candidate"]["ps"]), tmp_path / "merged", progress=False)
    if path is None:
        ref = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)(ids).logits
    else:
        plan = PathPlan.from_dict(path)
        models = {k: (str(merged) if v == "@ps" else v) for k, v in plan.models.items()}
        ref = StitchedModel.from_pool(LayerPool(models, base=plan.base), plan)(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
