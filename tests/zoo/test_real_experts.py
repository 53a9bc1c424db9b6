"""Real experts on the real SmolLM2 base at a tiny budget (dfsmerge.zoo.experts): the builder resumes after a kill
to the same weights as an uninterrupted build, the unsearched baselines and the Layer Swapping recipe of
configs/real/experts run, and every search config there runs end to end."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dfsmerge.io.realmodels import expert_set_dir, real_model_dir
from dfsmerge.recipe.config import load_merge_config
from dfsmerge.recipe.executor import run_merge
from dfsmerge.search.config import load_search_config
from dfsmerge.search.loop import run_search
from dfsmerge.zoo.experts import build_experts, tiny_set
from tests.mergekit_oracle import load_dir

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "real" / "experts"
TINY = tiny_set("fra", steps=3)
pytestmark = [pytest.mark.real, pytest.mark.usefixtures("one_torch_thread")]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def tiny_set_root() -> Path:
    """The tiny expert set, built once into the cache (``real:tiny-fra-0/math`` etc.)."""
    return build_experts(TINY, threads=1, log=lambda _m: None)


def _build_cmd(root: Path) -> list[str]:
    code = ("import torch; torch.set_num_threads(1)\n"
            "from pathlib import Path\nfrom dfsmerge.zoo.experts import build_experts, tiny_set\n"
            f"build_experts(tiny_set('fra', steps=3), root=Path({str(root)!r}), roles=('math',), threads=1, "
            "log=lambda m: None)\n")
    return [sys.executable, "-c", code]


def test_expert_builder_resumes_after_kill(tiny_set_root, tmp_path):
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copytree(tiny_set_root / "data", killed / "data")  # the same data; the build reuses them
    shutil.copytree(tiny_set_root / "tasks", killed / "tasks")
    proc = subprocess.Popen(_build_cmd(killed), env=ENV)
    state = killed / "math.state" / "progress.json"
    deadline = time.time() + 600
    while not state.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the build ended before its first saved state: nothing to resume"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "math" / "expert.json").exists()
    subprocess.run(_build_cmd(killed), env=ENV, check=True)
    assert "resuming at step" in (killed / "log.txt").read_text()
    resumed = load_file(str(killed / "math" / "model.safetensors"))
    whole = load_file(str(tiny_set_root / "math" / "model.safetensors"))
    assert set(resumed) == set(whole)
    for k in whole:
        assert torch.equal(resumed[k], whole[k]), f"{k}: max diff {(resumed[k] - whole[k]).abs().max()}"
    base = load_dir(real_model_dir("smollm2-135m"))
    assert any(not torch.equal(whole[k], base[k]) for k in whole)  # it trained


def _tiny_refs(text: str) -> str:
    return text.replace("real:smollm2-fra/", f"real:{TINY.name}/")


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare_ties", "layer_swap"])
def test_baseline_recipes_run(tiny_set_root, tmp_path, name):
    recipe = yaml.safe_load(_tiny_refs((CONFIGS / "recipes" / f"{name}.yaml").read_text()))
    out = run_merge(load_merge_config(recipe), tmp_path / name)
    merged = load_dir(out)
    math_, lang = (load_dir(expert_set_dir(TINY.name) / r) for r in ("math", "lang"))
    base = load_dir(real_model_dir("smollm2-135m"))
    k = "model.layers.7.mlp.down_proj.weight"
    if name == "task_arithmetic":  # weights 1.0, no normalisation: base + both task vectors
        torch.testing.assert_close(merged[k], base[k] + (math_[k] - base[k]) + (lang[k] - base[k]), rtol=0,
                                   atol=1e-6)
    elif name == "layer_swap":  # layer 7 is in the first transition zone, layer 0 the language expert's
        torch.testing.assert_close(merged[k], 0.5 * math_[k] + 0.5 * lang[k], rtol=0, atol=1e-6)
        assert torch.equal(merged["model.layers.0.mlp.down_proj.weight"], lang["model.layers.0.mlp.down_proj.weight"])
        assert torch.equal(merged["model.layers.15.mlp.down_proj.weight"],
                           math_["model.layers.15.mlp.down_proj.weight"])
    assert all(torch.isfinite(t).all() for t in merged.values())


@pytest.mark.parametrize("mode", ["ps", "dfs", "dfs-mathfirst", "staged", "joint"])
def test_search_configs_run(tiny_set_root, tmp_path, mode):
    data = yaml.safe_load(_tiny_refs((CONFIGS / f"{mode}.yaml").read_text()))
    data["budget"] = {"max_evals": 4}
    data["optimizer"] = {**data["optimizer"], "popsize": 2}
    data["objectives"] = [{**o, "limit": 3} for o in data["objectives"]]
    cfg = tmp_path / f"{mode}.yaml"
    cfg.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    run_search(load_search_config(cfg), run, progress=False)
    lines = (run / "evals.jsonl").read_text().splitlines()
    assert len(lines) >= 4
    assert (run / "best").is_dir()


def test_unbuilt_expert_and_tasks_name_the_build_command(tmp_path, monkeypatch):
    from dfsmerge.errors import CheckpointError
    from dfsmerge.objectives.tasks import task_dirs

    monkeypatch.setenv("DFSMERGE_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"dfsmerge zoo build --real nosuch"):
        real_model_dir("nosuch/math")
    with pytest.raises(CheckpointError, match=r"dfsmerge zoo build --real nosuch"):
        task_dirs(["real:nosuch/tasks"])
    (tmp_path / "real" / "experts" / "built" / "tasks").mkdir(parents=True)
    assert task_dirs(["real:built/tasks"]) == [str((tmp_path / "real" / "experts" / "built" / "tasks").resolve())]
