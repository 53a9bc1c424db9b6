"""lm-eval's own ``HFLM`` on a folded export scores what dfsmerge's adapter (``DfsLM``) scores on the stitched
plan, for a multiple-choice and a generate_until task over local JSONL."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from dfsmerge.export import export_plan
from dfsmerge.genome.plan import LayerRef, PathPlan, Step
from dfsmerge.runtime.stitched import StitchedModel
from dfsmerge.zoo.tiny import make_tiny_checkpoint

MC, GEN = "dfsx_mc", "dfsx_gen"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_task(d: Path, name: str, body: str, docs: list[dict]) -> None:
    path = d / f"{name}.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in docs))
    (d / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                    f"    validation: {path}\nvalidation_split: validation\n{body}")


def _evaluate(lm, task_dir: Path) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=[MC, GEN], task_manager=tm, random_seed=None,
                                   numpy_random_seed=None, torch_random_seed=None, bootstrap_iters=0,
                                   log_samples=True, verbosity="ERROR")


def _setup(tmp_path: Path):
    """Two tiny llamas, a cross-model plan with repeats, its folded export and two local tasks."""
    a = make_tiny_checkpoint("llama", tmp_path / "A", seed=0, num_layers=3, hidden=64)
    b = make_tiny_checkpoint("llama", tmp_path / "B", seed=1, num_layers=3, hidden=64)
    plan = PathPlan((Step(LayerRef("A", 0), 1.0), Step(LayerRef("B", 1), 1.3), Step(LayerRef("A", 1), 0.7),
                     Step(LayerRef("A", 1), 1.6), Step(LayerRef("A", 2), 0.9)), models={"A": str(a), "B": str(b)},
                    base="A")
    out = export_plan(plan, tmp_path / "export")

    rng = random.Random(0)
    word = lambda n: "".join(rng.choice("abcdefghij") for _ in range(n))  # noqa: E731
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_task(tasks, MC, "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: choices\n"
                "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
                [{"question": f"q: {word(rng.randint(3, 9))} is", "choices": [word(rng.randint(1, 4)) for _ in
                                                                             range(4)], "label": rng.randrange(4)}
                 for _ in range(10)])
    _write_task(tasks, GEN, "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: a\n"
                "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 6\n  do_sample: false\n"
                "metric_list:\n  - metric: exact_match\n",
                [{"q": f"{rng.randint(0, 99)}+{rng.randint(0, 99)}=", "a": word(2)} for _ in range(6)])

    return a, b, plan, out, tasks


def test_hflm_on_export_scores_as_dfslm_on_plan(tmp_path):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from dfsmerge.objectives.lm_adapter import DfsLM
    from dfsmerge.runtime.pool import LayerPool

    a, b, plan, out, tasks = _setup(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(a))
    stitched = StitchedModel.from_pool(LayerPool({"A": str(a), "B": str(b)}), plan).eval()
    ref = _evaluate(DfsLM(stitched, tok, batch_size=4), tasks)
    got = _evaluate(HFLM(pretrained=str(out), batch_size=4, device="cpu", dtype="float32"), tasks)

    for task in (MC, GEN):
        strip = lambda r: {k: v for k, v in r.items() if "stderr" not in k}  # noqa: E731
        assert strip(got["results"][task]) == strip(ref["results"][task])
    assert [s["resps"] for s in got["samples"][GEN]] == [s["resps"] for s in ref["samples"][GEN]]
    for x, y in zip(got["samples"][MC], ref["samples"][MC], strict=True):
        for (lx, gx), (ly, gy) in zip([r[0] for r in x["resps"]], [r[0] for r in y["resps"]], strict=True):
            assert abs(float(lx) - float(ly)) < 1e-4 * max(1.0, abs(float(ly))) and gx == gy


def test_lm_eval_cli_on_export_scores_as_dfsmerge_eval_of_the_plan(tmp_path):
    """The command lines users run: `lm_eval run --model hf` on the export, `dfsmerge eval` on the plan file."""
    import shutil
    import subprocess
    import sys

    _, _, plan, out, tasks = _setup(tmp_path)
    plan.save(tmp_path / "plan.yaml")
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    lm_eval_bin = shutil.which("lm_eval") or shutil.which("lm-eval")
    assert lm_eval_bin, "lm-eval's command line is not installed"
    res = subprocess.run([lm_eval_bin, "run", "--model", "hf", "--model_args", f"pretrained={out},dtype=float32",
                          "--tasks", f"{MC},{GEN}", "--include_path", str(tasks), "--device", "cpu",
                          "--batch_size", "4", "--output_path", str(tmp_path / "lm_eval_out")],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    theirs = json.loads(next((tmp_path / "lm_eval_out").rglob("results_*.json")).read_text())["results"]
    res = subprocess.run([sys.executable, "-m", "dfsmerge.cli", "eval", str(tmp_path / "plan.yaml"), "--tasks",
                          f"{MC},{GEN}", "--task-search-path", str(tasks), "--batch-size", "4", "--json"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    ours = json.loads(res.stdout[res.stdout.index("{"):])["results"]
    for task, metrics in ours.items():
        for key, value in metrics.items():
            assert theirs[task][key] == value, (task, key, theirs[task][key], value)
