"""`dfsmerge eval` on a checkpoint and on a plan file: the same scores as the library's evaluate_model."""

from __future__ import annotations

import contextlib
import io
import json

from objectives_helpers import GEN_TASK, MC_TASK

from dfsmerge.cli import main
from dfsmerge.genome import PathPlan
from dfsmerge.objectives import evaluate_model


def _run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def test_eval_checkpoint_and_identity_plan_print_lm_eval_metric_keys(tiny_ckpt, tiny_model, task_dir, tmp_path):
    model, tok = tiny_model
    want = evaluate_model(model, tok, [MC_TASK, GEN_TASK], task_paths=[str(task_dir)], limit=8)
    rc, out, err = _run("eval", str(tiny_ckpt), "--tasks", f"{MC_TASK},{GEN_TASK}", "--task-search-path",
                        str(task_dir), "--limit", "8", "--json")
    assert rc == 0, err
    got = json.loads(out[out.index("{"):])
    assert got == want
    assert "acc,none" in got["results"][MC_TASK]

    plan = PathPlan.identity("A", model.config.num_hidden_layers, models={"A": str(tiny_ckpt)})
    plan.save(tmp_path / "plan.yaml")
    rc, out, err = _run("eval", str(tmp_path / "plan.yaml"), "--tasks", f"{MC_TASK},{GEN_TASK}",
                        "--task-search-path", str(task_dir), "--limit", "8", "--json")
    assert rc == 0, err
    assert json.loads(out[out.index("{"):]) == want


def test_eval_unknown_task_is_a_clean_error(tiny_ckpt, task_dir):
    rc, _, err = _run("eval", str(tiny_ckpt), "--tasks", "no_such_task", "--task-search-path", str(task_dir))
    assert rc == 2 and "no_such_task" in err and "Traceback" not in err
