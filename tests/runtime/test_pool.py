"""LayerPool: loading (meta + assign), tied heads, dtype, compatibility errors, model A's parts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from dfsmerge.errors import ArchitectureError, CheckpointError, ConfigError
from dfsmerge.genome.plan import LayerRef, PathPlan, Step
from dfsmerge.runtime.pool import LayerPool
from dfsmerge.runtime.stitched import StitchedModel
from dfsmerge.zoo.tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    a = make_tiny_checkpoint("llama", root / "a", seed=1, num_layers=3, hidden=32, tie=True)
    return {
        "a": a,
        "b": make_tiny_checkpoint("llama", root / "b", seed=2, num_layers=2, hidden=32),
        "wide": make_tiny_checkpoint("llama", root / "wide", seed=3, num_layers=2, hidden=48),
        "qwen": make_tiny_checkpoint("qwen2", root / "qwen", seed=4, num_layers=2, hidden=32),
        "sharded": make_tiny_checkpoint("llama", root / "sharded", seed=5, num_layers=2, hidden=32,
                                        max_shard_size=20_000),
        "root": root,
    }


def test_loads_weights_equal_to_from_pretrained(ckpts):
    pool = LayerPool({"A": str(ckpts["a"]), "S": str(ckpts["sharded"])})
    for name in ("a", "sharded"):
        ref = AutoModelForCausalLM.from_pretrained(str(ckpts[name]), dtype=torch.float32)
        ours = pool["A" if name == "a" else "S"].model
        ref_sd, our_sd = ref.state_dict(), ours.state_dict()
        assert set(ref_sd) == set(our_sd)
        for k in ref_sd:
            assert torch.equal(ref_sd[k], our_sd[k]), k
    assert not any(p.is_meta for p in pool["A"].model.parameters())
    assert not any(p.requires_grad for p in pool["A"].model.parameters())


def test_tied_head_shares_the_embedding(ckpts):
    pool = LayerPool({"A": str(ckpts["a"])})
    assert pool.head().weight is pool.embedding().weight
    assert pool.head().weight.data_ptr() == pool.embedding().weight.data_ptr()


def test_dtype_and_parts_of_model_a(ckpts):
    pool = LayerPool({"A": str(ckpts["a"]), "B": str(ckpts["b"])}, dtype=torch.bfloat16)
    assert {p.dtype for m in pool for p in m.model.parameters()} == {torch.bfloat16}
    assert pool.names == ("A", "B") and pool.base == "A"
    assert pool.num_layers() == {"A": 3, "B": 2}
    assert pool.refs() == [LayerRef("A", 0), LayerRef("A", 1), LayerRef("A", 2), LayerRef("B", 0), LayerRef("B", 1)]
    assert pool.layer(LayerRef("B", 1)) is pool["B"].model.model.layers[1]
    assert pool.config.num_hidden_layers == 3
    assert pool.tokenizer("ab")["input_ids"]
    with pytest.raises(ConfigError, match=r"B\[2\] is out of range: model 'B' has 2 layers"):
        pool.layer(LayerRef("B", 2))
    with pytest.raises(ConfigError, match="'Z' is not in the layer pool"):
        pool["Z"]


def test_hidden_size_mismatch_is_named(ckpts):
    with pytest.raises(ArchitectureError, match="differ in hidden_size: 32 vs 48"):
        LayerPool({"A": str(ckpts["a"]), "W": str(ckpts["wide"])})


def test_family_mismatch_is_named(ckpts):
    with pytest.raises(ArchitectureError, match="model_type='qwen2'"):
        LayerPool({"A": str(ckpts["a"]), "Q": str(ckpts["qwen"])})


def test_rope_mismatch_is_named(ckpts):
    other = ckpts["root"] / "rope"
    shutil.copytree(ckpts["b"], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rope_theta"] = 1234.0
    cfg.pop("rope_parameters", None)
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArchitectureError, match="rope"):
        LayerPool({"A": str(ckpts["a"]), "R": str(other)})


def test_tokenizer_mismatch_is_named(ckpts):
    other = ckpts["root"] / "tok"
    shutil.copytree(ckpts["b"], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["zz"] = vocab.pop("z")
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ArchitectureError, match="tokenizers of models"):
        LayerPool({"A": str(ckpts["a"]), "T": str(other)})


def test_missing_tensor_is_a_checkpoint_error(ckpts):
    from safetensors.torch import load_file, save_file

    other = ckpts["root"] / "broken"
    shutil.copytree(ckpts["b"], other)
    f = other / "model.safetensors"
    sd = load_file(str(f))
    sd.pop("model.layers.1.mlp.up_proj.weight")
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        LayerPool({"X": str(other)})


def test_plans_validated_against_pool(ckpts):
    pool = LayerPool({"A": str(ckpts["a"]), "B": str(ckpts["b"])})
    bad = PathPlan((Step(LayerRef("B", 3)),), models={"A": "a", "B": "b"}, base="A")
    with pytest.raises(ConfigError, match=r"path\[0\].layer=3 is out of range for model 'B'"):
        StitchedModel.from_pool(pool, bad)


def test_dfs_genome_for_pool_starts_at_model_a(ckpts):
    from dfsmerge.genome.dfs import DFSGenome

    pool = LayerPool({"B": str(ckpts["b"]), "A": str(ckpts["a"])}, base="A")
    genome = DFSGenome.for_pool(pool, repetitions=2)
    assert list(genome.layers) == ["A", "B"] and genome.M == 5
    plan = genome.decode(genome.initial())
    assert plan.layers == tuple(LayerRef("A", i) for i in range(3))
    assert dict(plan.models) == {"A": str(ckpts["a"]), "B": str(ckpts["b"])}
    ids = torch.randint(5, 40, (1, 5))
    with torch.no_grad():
        want = pool["A"].model(ids).logits
        got = StitchedModel.from_pool(pool, plan)(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
