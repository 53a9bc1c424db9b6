"""Lazy reading (any shard layout, pickle only on request) and atomic sharded writing (streamed or planned)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dfsmerge.errors import CheckpointError, OutputExistsError
from dfsmerge.io import ShardedWriter, open_checkpoint


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(5, 7, generator=g), "b.bias": torch.randn(3, generator=g).bfloat16(),
            "c.weight": torch.randn(64, 9, generator=g).half(), "d.count": torch.arange(4),
            "e.scalar": torch.tensor(2.5)}


def _model_dir(tmp_path, name="m"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return d


def test_reader_any_shard_layout_without_index(tmp_path):
    d = _model_dir(tmp_path)
    t = _tensors()
    save_file({k: t[k] for k in ("a.weight", "d.count")}, str(d / "weird-name-1.safetensors"))
    save_file({k: t[k] for k in ("b.bias", "c.weight", "e.scalar")}, str(d / "other.safetensors"))
    r = open_checkpoint(d)
    assert set(r.keys()) == set(t)
    for k, v in t.items():
        assert torch.equal(r.get_tensor(k), v)
        assert r.get_shape(k) == tuple(v.shape) and r.get_dtype(k) == v.dtype
    with pytest.raises(CheckpointError, match="'zzz' not found"):
        r.get_tensor("zzz")


def test_reader_index_with_missing_shard_names_it(tmp_path):
    d = _model_dir(tmp_path)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        open_checkpoint(d)


def test_pickle_only_with_permission_and_weights_only(tmp_path):
    d = _model_dir(tmp_path)
    t = _tensors()
    torch.save(t, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        open_checkpoint(d)
    r = open_checkpoint(d, allow_pickle=True)
    assert all(torch.equal(r.get_tensor(k), v) for k, v in t.items())

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = _model_dir(tmp_path, "evil")
    torch.save({"x": Evil()}, evil / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        open_checkpoint(evil, allow_pickle=True)


@pytest.mark.parametrize("planned", [False, True])
def test_writer_shards_index_and_round_trip(tmp_path, planned):
    t = _tensors()
    manifest = [(k, tuple(v.shape), v.dtype) for k, v in t.items()] if planned else None
    with ShardedWriter(tmp_path / "out", max_shard_size=200, manifest=manifest) as w:
        for k, v in t.items():
            w.add_tensor(k, v)
        w.write_json("config.json", {"model_type": "llama"})
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == shards and len(shards) > 1
    loaded = {}
    for s in shards:
        loaded.update(load_file(str(out / s)))
    assert set(loaded) == set(t) and all(torch.equal(loaded[k], v) for k, v in t.items())
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_planned_writer_rejects_off_manifest_tensor_and_leaves_nothing(tmp_path):
    t = _tensors()
    manifest = [(k, tuple(v.shape), v.dtype) for k, v in t.items()]
    with pytest.raises(RuntimeError, match="manifest expected"), ShardedWriter(tmp_path / "out",
                                                                             manifest=manifest) as w:
        w.add_tensor("b.bias", t["b.bias"])
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_existing_and_force_replaces(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(OutputExistsError, match="--force"):
        ShardedWriter(out).__enter__()
    assert (out / "keep").exists()
    with ShardedWriter(out, force=True) as w:
        w.add_tensor("a", torch.ones(2))
    assert not (out / "keep").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
