"""`dfsmerge merge` against mergekit 0.1.5 (the test oracle) on tiny checkpoints of every family."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dfsmerge.merge import get_method, registered_methods
from dfsmerge.recipe.config import load_merge_config
from dfsmerge.recipe.executor import run_merge
from tests.mergekit_oracle import load_dir as _load_dir
from tests.mergekit_oracle import oracle_recipe as _models_recipe
from tests.mergekit_oracle import run_mergekit as _mergekit


def _assert_same(ours: Path, theirs: Path, atol: float = 1e-6) -> None:
    a, b = _load_dir(ours), _load_dir(theirs)
    assert set(a) == set(b), f"tensor names differ: {sorted(set(a) ^ set(b))}"
    worst = ("", 0.0, 0.0)
    for k in a:
        assert a[k].shape == b[k].shape, f"{k}: {a[k].shape} vs {b[k].shape}"
        d = (a[k].double() - b[k].double()).abs()
        if d.max().item() > worst[1]:
            worst = (k, d.max().item(), d.mean().item())
    assert worst[1] <= atol, f"max |diff| {worst[1]:.3g} (mean {worst[2]:.3g}) at {worst[0]}"
    cfg_a = json.loads((ours / "config.json").read_text())
    cfg_b = json.loads((theirs / "config.json").read_text())
    assert cfg_a["num_hidden_layers"] == cfg_b["num_hidden_layers"]


def _finite_logits(path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    ids = torch.arange(1, 12).unsqueeze(0)
    logits = model(ids).logits
    assert logits.shape[-1] == model.config.vocab_size
    assert torch.isfinite(logits).all()


DETERMINISTIC = [m for m in registered_methods() if not get_method(m).random]
RANDOM = [m for m in registered_methods() if get_method(m).random]


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", DETERMINISTIC)
def test_every_deterministic_method_matches_mergekit(method, family, tiny_family_models, tmp_path):
    m = tiny_family_models[family]
    recipe = _models_recipe(method, m)
    ours = run_merge(load_merge_config(recipe), tmp_path / "ours", progress=False)
    _assert_same(ours, _mergekit(recipe, tmp_path / "mk"))
    _finite_logits(ours)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("method,extra", [
    ("ties", {"parameters": {"normalize": False, "lambda": 0.8}}),
    ("task_arithmetic", {"parameters": {"int8_mask": True}}),
    ("linear", {"parameters": {"normalize": False}}),
    ("slerp", {}),
    ("model_stock", {}),
])
def test_parameter_variants_match_mergekit(family, method, extra, tiny_family_models, tmp_path):
    recipe = _models_recipe(method, tiny_family_models[family], **extra)
    ours = run_merge(load_merge_config(recipe), tmp_path / "ours", progress=False)
    _assert_same(ours, _mergekit(recipe, tmp_path / "mk"))
    _finite_logits(ours)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_passthrough_stack_with_duplicated_layers(family, tiny_family_models, tmp_path):
    m = tiny_family_models[family]
    scale = [{"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": 0.25}, {"value": 1.0}]
    recipe = {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": str(m["base"]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(m["ft1"]), "layer_range": [1, 2], "parameters": {"scale": scale}}]},
            {"sources": [{"model": str(m["base"]), "layer_range": [1, 2]}]},
        ],
    }
    ours = run_merge(load_merge_config(recipe), tmp_path / "ours", progress=False)
    cfg = json.loads((ours / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4
    # independent reference: output layer k is (model, source layer, scale rule) of the stack
    base, ft1 = _load_dir(m["base"]), _load_dir(m["ft1"])
    got = _load_dir(ours)
    stack = [(base, 0, False), (base, 1, False), (ft1, 1, True), (base, 1, False)]
    for k, (src, j, scaled) in enumerate(stack):
        for name, t in src.items():
            if name.startswith(f"model.layers.{j}."):
                want = t
                if scaled:
                    want = t * (0.5 if "o_proj" in name else 0.25 if "down_proj" in name else 1.0)
                out_name = name.replace(f"model.layers.{j}.", f"model.layers.{k}.")
                torch.testing.assert_close(got[out_name], want, rtol=0, atol=0)
    for name in base:
        if not name.startswith("model.layers."):
            torch.testing.assert_close(got[name], base[name], rtol=0, atol=0)
    if "layer_types" in cfg:
        # mergekit 0.1.5 cannot stack configs that carry layer_types; we extend them along the stack
        assert len(cfg["layer_types"]) == 4
    else:
        _assert_same(ours, _mergekit(recipe, tmp_path / "mk"))
    _finite_logits(ours)


def test_sliced_merge_with_slice_parameters_matches_mergekit(tiny_family_models, tmp_path):
    m = tiny_family_models["llama"]
    recipe = {
        "merge_method": "ties",
        "base_model": str(m["base"]),
        "dtype": "float32",
        "parameters": {"normalize": True, "density": 0.6},
        "slices": [
            {"sources": [{"model": str(m["base"]), "layer_range": [0, 1]},
                         {"model": str(m["ft1"]), "layer_range": [0, 1], "parameters": {"weight": 0.7}},
                         {"model": str(m["ft2"]), "layer_range": [1, 2], "parameters": {"weight": 0.4}}],
             "parameters": {"density": [{"filter": "self_attn", "value": 0.3}, {"value": 0.9}]}},
            {"sources": [{"model": str(m["base"]), "layer_range": [1, 2]},
                         {"model": str(m["ft1"]), "layer_range": [1, 2], "parameters": {"weight": [0.2, 0.6]}},
                         {"model": str(m["ft2"]), "layer_range": [0, 1], "parameters": {"weight": 1.0}}]},
        ],
    }
    ours = run_merge(load_merge_config(recipe), tmp_path / "ours", progress=False)
    _assert_same(ours, _mergekit(recipe, tmp_path / "mk"))


@pytest.mark.parametrize("out_dtype", ["bfloat16", "float16"])
def test_out_dtype_matches_mergekit(out_dtype, tiny_family_models, tmp_path):
    recipe = _models_recipe("task_arithmetic", tiny_family_models["llama"], out_dtype=out_dtype)
    ours = run_merge(load_merge_config(recipe), tmp_path / "ours", progress=False)
    _assert_same(ours, _mergekit(recipe, tmp_path / "mk"), atol=0.0)
    assert json.loads((ours / "config.json").read_text())["dtype"] == out_dtype


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", RANDOM)
def test_random_methods_are_reproducible_and_loadable(method, family, tiny_family_models, tmp_path):
    recipe = _models_recipe(method, tiny_family_models[family])
    cfg = load_merge_config(recipe)
    a = _load_dir(run_merge(cfg, tmp_path / "a", seed=7, progress=False, workers=1))
    b = _load_dir(run_merge(cfg, tmp_path / "b", seed=7, progress=False, workers=3, memory_budget=20_000))
    c = _load_dir(run_merge(cfg, tmp_path / "c", seed=8, progress=False))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].ndim == 2)
    _finite_logits(tmp_path / "a")


def test_output_files(tiny_family_models, tmp_path):
    m = tiny_family_models["llama"]
    recipe = _models_recipe("linear", m, tokenizer_source=f"model:{m['ft2']}")
    out = run_merge(load_merge_config(recipe), tmp_path / "out", progress=False, max_shard_size="20KB")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "README.md", "mergekit.yaml"} <= names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("model-*.safetensors")}
    assert yaml.safe_load((out / "mergekit.yaml").read_text())["merge_method"] == "linear"
    assert str(m["ft2"]) in (out / "README.md").read_text()
    assert not list(tmp_path.glob(".out.tmp-*")), "temporary directory left behind"


def _cli(*args: str, subprocess_: bool = False) -> subprocess.CompletedProcess:
    if subprocess_:
        return subprocess.run([sys.executable, "-m", "dfsmerge.cli", *args], capture_output=True, text=True)
    import contextlib
    import io

    from dfsmerge.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("mutate,expect", [
    (lambda r, m: r.update(merge_method="tiez"), "tiez"),
    (lambda r, m: r["models"][0].pop("parameters"), "weight"),
    (lambda r, m: r.update(models=None, slices=[{"sources": [{"model": str(m["ft1"]), "layer_range": [0, 9]}]}]),
     "layer_range"),
    (lambda r, m: r["models"][0].update(model=str(m["ft1"]) + "-missing"), "missing"),
    (lambda r, m: r["models"][0].update(model=str(m["other"])), "shape"),
    (lambda r, m: r.update(parameters={"normalise": True}), "normalise"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(mutate, expect, tiny_family_models, tmp_path):
    from dfsmerge.zoo.tiny import make_tiny_checkpoint

    m = dict(tiny_family_models["llama"])
    m["other"] = make_tiny_checkpoint("llama", tmp_path / "other", num_layers=2, hidden=48)
    recipe = _models_recipe("ties", m)
    mutate(recipe, m)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({k: v for k, v in recipe.items() if v is not None}))
    res = _cli("merge", str(tmp_path / "r.yaml"), str(tmp_path / "out"), "--quiet")
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("dfsmerge: error")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert expect in lines[0]
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_refuses_to_overwrite_without_force(tiny_family_models, tmp_path):
    recipe = _models_recipe("linear", tiny_family_models["llama"])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    res = _cli("merge", str(tmp_path / "r.yaml"), str(out), "--quiet", subprocess_=True)
    assert res.returncode == 2 and "--force" in res.stderr and "Traceback" not in res.stderr
    assert (out / "keep.txt").read_text() == "precious"
    res = _cli("merge", str(tmp_path / "r.yaml"), str(out), "--quiet", "--force")
    assert res.returncode == 0, res.stderr
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_failure_midway_leaves_no_output_and_keeps_old(tiny_family_models, tmp_path, monkeypatch):
    import dfsmerge.recipe.executor as recipe_mod

    cfg = load_merge_config(_models_recipe("linear", tiny_family_models["llama"]))
    out = tmp_path / "out"
    run_merge(cfg, out, progress=False)
    before = _load_dir(out)
    calls = {"n": 0}
    real = recipe_mod.execute_job

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(recipe_mod, "execute_job", flaky)
    with pytest.raises(RuntimeError):
        run_merge(cfg, out, progress=False, force=True)
    after = _load_dir(out)
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(RuntimeError):
        calls["n"] = 0
        run_merge(cfg, tmp_path / "fresh", progress=False)
    assert not (tmp_path / "fresh").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_hub_id_without_network_says_so(tmp_path):
    res = _cli("merge", str(_write(tmp_path, {"merge_method": "linear", "models": [
        {"model": "some-org/some-model", "parameters": {"weight": 1.0}}]})), str(tmp_path / "out"), "--quiet")
    assert res.returncode == 2
    assert "some-org/some-model" in res.stderr and "network" in res.stderr


def _write(tmp_path: Path, recipe: dict) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(recipe))
    return p
