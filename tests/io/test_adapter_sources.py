"""PEFT LoRA adapters as sources: every model reference resolves an adapter to base + adapter, as PEFT's own
``merge_and_unload`` (the independent reference) computes it."""

from __future__ import annotations

import json

import pytest
import torch

from dfsmerge.errors import CheckpointError
from dfsmerge.io import open_checkpoint, resolve_model_path

peft = pytest.importorskip("peft")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DFSMERGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _make_adapter(base_dir, out, *, seed, **lora_kwargs):
    """A PEFT LoRA adapter with random (non-zero) factors on ``base_dir``, and PEFT's merge of it (the reference)."""
    from transformers import AutoModelForCausalLM

    from dfsmerge.zoo.tiny import save_tiny_tokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", **lora_kwargs)
    pm = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(str(out / "adapter"))
    merged = pm.merge_and_unload()
    merged.save_pretrained(str(out / "merged"))
    save_tiny_tokenizer(out / "merged")
    return out / "adapter", out / "merged"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    from dfsmerge.zoo.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("adapters")
    base = make_tiny_checkpoint("llama", root / "base", seed=0, num_layers=2, hidden=32)
    a1, m1 = _make_adapter(base, root / "one", seed=1, r=4, lora_alpha=8,
                           target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                           rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})
    a2, m2 = _make_adapter(base, root / "two", seed=2, r=8, lora_alpha=4, use_rslora=True,
                           target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"], modules_to_save=["lm_head"])
    return {"base": base, "a1": a1, "m1": m1, "a2": a2, "m2": m2}


def test_adapter_resolves_to_peft_merge(adapters, cache):
    for a, m in (("a1", "m1"), ("a2", "m2")):
        ours, ref = open_checkpoint(adapters[a]), open_checkpoint(adapters[m])
        assert sorted(ours.keys()) == sorted(ref.keys())
        for k in ref.keys():  # noqa: SIM118 - a reader, not a dict
            torch.testing.assert_close(ours.get_tensor(k), ref.get_tensor(k), rtol=1e-6, atol=1e-6, msg=k)
    moved = open_checkpoint(adapters["a2"]).get_tensor("model.layers.0.self_attn.k_proj.weight")
    base = open_checkpoint(adapters["base"]).get_tensor("model.layers.0.self_attn.k_proj.weight")
    assert not torch.equal(moved, base)  # the adapter did something


def test_cache_reused_and_base_override(adapters, cache):
    p1 = resolve_model_path(adapters["a1"])
    marker = next(p1.glob(".dfsmerge-adapter.json"))
    stamp = marker.stat().st_mtime_ns
    assert resolve_model_path(str(adapters["a1"])) == p1 and marker.stat().st_mtime_ns == stamp
    assert p1.parent == cache / "adapters"
    # BASE+ADAPTER (mergekit's syntax) applies the adapter to another base of the same shapes
    other = resolve_model_path(f"{adapters['m2']}+{adapters['a1']}")
    assert other != p1
    ours = open_checkpoint(other).get_tensor("model.layers.0.self_attn.q_proj.weight")
    want = (open_checkpoint(adapters["m2"]).get_tensor("model.layers.0.self_attn.q_proj.weight")
            + open_checkpoint(adapters["m1"]).get_tensor("model.layers.0.self_attn.q_proj.weight")
            - open_checkpoint(adapters["base"]).get_tensor("model.layers.0.self_attn.q_proj.weight"))
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


def test_merge_recipe_over_adapters_equals_recipe_over_merged(adapters, cache, tmp_path, one_torch_thread):
    from dfsmerge.recipe.config import load_merge_config
    from dfsmerge.recipe.executor import run_merge

    def recipe(a, b):
        return {"merge_method": "ties", "base_model": str(adapters["base"]), "dtype": "float32",
                "parameters": {"normalize": True},
                "models": [{"model": str(a), "parameters": {"weight": 0.7, "density": 0.6}},
                           {"model": str(b), "parameters": {"weight": 0.5, "density": 0.8}}]}

    out_a = run_merge(load_merge_config(recipe(adapters["a1"], adapters["a2"])), tmp_path / "over_adapters",
                      progress=False)
    out_m = run_merge(load_merge_config(recipe(adapters["m1"], adapters["m2"])), tmp_path / "over_merged",
                      progress=False)
    ra, rm = open_checkpoint(out_a), open_checkpoint(out_m)
    assert sorted(ra.keys()) == sorted(rm.keys())
    for k in rm.keys():  # noqa: SIM118 - a reader, not a dict
        torch.testing.assert_close(ra.get_tensor(k), rm.get_tensor(k), rtol=1e-5, atol=1e-6, msg=k)


def test_plan_and_eval_accept_adapters(adapters, cache, tmp_path, one_torch_thread):
    import yaml

    from dfsmerge.runtime.loading import load_model_or_plan

    ids = torch.randint(5, 40, (2, 10), generator=torch.Generator().manual_seed(0))
    model_a, _ = load_model_or_plan(str(adapters["a1"]))
    model_m, _ = load_model_or_plan(str(adapters["m1"]))
    with torch.no_grad():
        torch.testing.assert_close(model_a(ids).logits, model_m(ids).logits, rtol=1e-5, atol=1e-5)

    def plan(a, b):
        path = [{"model": "A", "layer": 0, "scale": 1.0}, {"model": "B", "layer": 1, "scale": 0.8},
                {"model": "A", "layer": 1, "scale": 1.1}]
        f = tmp_path / f"plan-{a.parent.name}.yaml"
        f.write_text(yaml.safe_dump({"models": {"A": str(a), "B": str(b)}, "base": "A", "path": path}))
        return f

    stitched_a, _ = load_model_or_plan(plan(adapters["a1"], adapters["a2"]))
    stitched_m, _ = load_model_or_plan(plan(adapters["m1"], adapters["m2"]))
    with torch.no_grad():
        torch.testing.assert_close(stitched_a(ids).logits, stitched_m(ids).logits, rtol=1e-5, atol=1e-5)


def test_bad_adapters_fail_in_one_line(adapters, cache, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "base_model_name_or_path": "x"}))
    with pytest.raises(CheckpointError, match="peft_type='IA3'"):
        resolve_model_path(bad)
    nobase = tmp_path / "nobase"
    nobase.mkdir()
    (nobase / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (nobase / "adapter_model.safetensors").write_bytes((adapters["a1"] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="base_model_name_or_path") as e:
        resolve_model_path(nobase)
    assert "\n" not in str(e.value)
    assert not (cache / "adapters").exists() or not any((cache / "adapters").iterdir())


def test_short_search_over_adapters_equals_search_over_merged(adapters, cache, tmp_path, one_torch_thread):
    """A joint PS+DFS search whose models are the two adapters runs, and logs the same candidates and scores as the
    same search over PEFT's merged checkpoints."""
    from dfsmerge.search import load_search_config, run_search

    def search(a, b, out):
        models = [{"name": "one", "model": str(a)}, {"name": "two", "model": str(b)}]
        cfg = {"genome": {"mode": "joint", "models": models, "base_model": str(adapters["base"]),
                          "merge_method": "task_arithmetic", "layer_granularity": 1, "dfs": {"repetitions": 2}},
               "objectives": [{"type": "cost", "name": "hops"}, {"type": "synthetic", "name": "sphere"}],
               "optimizer": {"name": "cma", "popsize": 4}, "budget": {"max_evals": 8}}
        run_search(load_search_config(cfg), out, progress=False)
        lines = [json.loads(x) for x in (out / "evals.jsonl").read_text().splitlines()]
        return [(r["genome"], r["objectives"], r["error"]) for r in lines]

    got = search(adapters["a1"], adapters["a2"], tmp_path / "run_adapters")
    want = search(adapters["m1"], adapters["m2"], tmp_path / "run_merged")
    assert len(got) == 8 and all(err is None for *_, err in got)
    assert got == want
