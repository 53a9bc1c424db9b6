"""``dfsmerge moe`` against mergekit-moe 0.1.5 (the oracle, run in-process) and vanilla transformers."""

from __future__ import annotations

import pytest
import torch
import yaml

from dfsmerge.cli import main as cli_main
from dfsmerge.errors import ArchitectureError, ConfigError, OutputExistsError
from dfsmerge.io import open_checkpoint
from dfsmerge.tools.moe import build_moe, load_moe_config


def _recipe(models, *, mode, arch, shared=False, **extra):
    d = {"base_model": str(models["base"]), "gate_mode": mode, "dtype": "float32", "experts_per_token": 2,
         "architecture": arch,
         "experts": [{"source_model": str(models["ft1"]), "positive_prompts": ["abc 12", "hello"],
                      "negative_prompts": ["zzz"]},
                     {"source_model": str(models["ft2"]), "positive_prompts": ["math 1+2=3"]}],
         **extra}
    if shared:  # mergekit-moe opens only the base's and the experts' files, so the shared expert is the base
        d["shared_experts"] = [{"source_model": str(models["base"]), "positive_prompts": ["general text"]}]
    return d


def _mergekit_moe(recipe_file, out):
    pytest.importorskip("mergekit")
    from mergekit.scripts.moe import main as mk_main

    mk_main.main([str(recipe_file), str(out)], standalone_mode=False)
    return out


@pytest.mark.parametrize(("family", "mode", "arch", "shared"), [
    ("llama", "cheap_embed", "mixtral", False), ("llama", "hidden", "mixtral", False),
    ("qwen2", "hidden", "qwen", True), ("llama", "cheap_embed", "qwen", True),
    ("qwen3", "cheap_embed", "qwen3", False), ("qwen3", "hidden", "qwen3", False),
])
def test_moe_matches_mergekit_and_loads(tiny_family_models, tmp_path, family, mode, arch, shared, one_torch_thread):
    from transformers import AutoModelForCausalLM

    models = tiny_family_models[family]
    f = tmp_path / "moe.yml"
    f.write_text(yaml.safe_dump(_recipe(models, mode=mode, arch=arch, shared=shared)))
    ref = open_checkpoint(_mergekit_moe(f, tmp_path / "mk"))
    ours = open_checkpoint(build_moe(load_moe_config(f), tmp_path / "ours", progress=False))
    assert sorted(ours.keys()) == sorted(ref.keys())
    for k in ref.keys():  # noqa: SIM118 - a reader, not a dict
        a, b = ours.get_tensor(k), ref.get_tensor(k)
        assert a.dtype == b.dtype == torch.float32, k
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=k)
    # the router is not degenerate: each expert's gate row differs
    g = ours.get_tensor("model.layers.0.mlp.gate.weight")
    assert g.shape[0] == 2 and not torch.allclose(g[0], g[1])
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), dtype=torch.float32)
    assert model.config.model_type == {"mixtral": "mixtral", "qwen": "qwen2_moe", "qwen3": "qwen3_moe"}[arch]
    # vanilla transformers holds exactly the tensors we wrote (no random init left behind)
    sd = model.state_dict()
    torch.testing.assert_close(sd["model.layers.1.mlp.experts.down_proj"],
                               torch.stack([open_checkpoint(models[m]).get_tensor("model.layers.1.mlp.down_proj.weight")
                                            for m in ("ft1", "ft2")]), rtol=0, atol=0)
    out = model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)
    assert (tmp_path / "ours" / "README.md").read_text().count(str(models["ft1"])) >= 2  # card lists the recipe


def test_random_gates_reproducible(tiny_family_models, tmp_path, one_torch_thread):
    models = tiny_family_models["llama"]
    cfg = load_moe_config(_recipe(models, mode="random", arch="mixtral"))
    gates = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = build_moe(cfg, tmp_path / name, seed=seed, progress=False)
        gates[name] = open_checkpoint(out).get_tensor("model.layers.1.mlp.gate.weight")
    assert torch.equal(gates["a"], gates["b"])
    assert not torch.equal(gates["a"], gates["c"])
    u = load_moe_config(_recipe(models, mode="uniform_random", arch="mixtral"))
    g = open_checkpoint(build_moe(u, tmp_path / "u", seed=0, progress=False)).get_tensor(
        "model.layers.0.mlp.gate.weight")
    assert float(g.abs().max()) <= (1 / 32) ** 0.5


@pytest.mark.parametrize(("change", "error", "match"), [
    ({"experts_per_token": 3}, ConfigError, "experts_per_token=3"),
    ({"gate_mode": "smart"}, ConfigError, "gate_mode='smart'"),
    ({"architecture": "deepseek2"}, ConfigError, "architecture='deepseek2'"),
    ({"experts": [{"source_model": "x"}, {"source_model": "y"}]}, ConfigError, "positive_prompts"),
    ({"experts": [{"source_model": "x", "positive_prompts": ["a"]},
                  {"source_model": "y", "positive_prompts": ["a"]}]}, ConfigError, "identical"),
    ({"nonsense": 1}, ConfigError, "nonsense"),
])
def test_bad_configs_one_line(tiny_family_models, change, error, match):
    data = {**_recipe(tiny_family_models["llama"], mode="cheap_embed", arch="mixtral"), **change}
    with pytest.raises(error, match=match) as e:
        load_moe_config(data)
    assert "\n" not in str(e.value)


def test_bad_models_fail_before_writing(tiny_family_models, tmp_path):
    llama, qwen3 = tiny_family_models["llama"], tiny_family_models["qwen3"]
    with pytest.raises(ArchitectureError, match="qwen3"):  # qwen3 output from llama models
        build_moe(load_moe_config(_recipe(llama, mode="random", arch="qwen3")), tmp_path / "a", progress=False)
    mixed = _recipe(llama, mode="random", arch="mixtral")
    mixed["experts"][1]["source_model"] = str(qwen3["ft1"])
    with pytest.raises(ArchitectureError):
        build_moe(load_moe_config(mixed), tmp_path / "a", progress=False)
    same = _recipe(llama, mode="random", arch="mixtral")
    same["experts"][1]["source_model"] = same["experts"][0]["source_model"]
    with pytest.raises(ConfigError, match="every expert"):
        build_moe(load_moe_config(same), tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()


def test_cli_moe(tiny_family_models, tmp_path, capsys, one_torch_thread):
    f = tmp_path / "moe.yml"
    f.write_text(yaml.safe_dump(_recipe(tiny_family_models["llama"], mode="cheap_embed", arch="mixtral")))
    assert cli_main(["moe", str(f), str(tmp_path / "out"), "--quiet"]) == 0
    assert (tmp_path / "out" / "mergekit_moe_config.yml").read_text() == f.read_text()
    assert cli_main(["moe", str(f), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and OutputExistsError.__name__ in err[0]
