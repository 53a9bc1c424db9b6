"""ShardedWriter.add_tensor_rows: a tensor written in row parts straight into its place in the shard file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dfsmerge.io import ShardedWriter, open_checkpoint


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(37, 5, generator=g).to(torch.bfloat16),
            "b.bias": torch.randn(5, generator=g),
            "c.weight": torch.randn(11, 3, 2, generator=g)}


def _manifest(ts: dict[str, torch.Tensor]) -> list:
    return [(k, tuple(v.shape), v.dtype) for k, v in ts.items()]


def _load(path) -> dict[str, torch.Tensor]:
    r = open_checkpoint(path)
    return {k: r.get_tensor(k) for k in r.keys()}  # noqa: SIM118 - a reader, not a dict


@pytest.mark.parametrize("max_shard_size", ["1GB", 200])
def test_rows_in_parts_equal_the_whole_tensor(tmp_path, max_shard_size):
    ts = _tensors()
    with ShardedWriter(tmp_path / "whole", max_shard_size=max_shard_size, manifest=_manifest(ts)) as w:
        for k, v in ts.items():
            w.add_tensor(k, v)
        w.write_json("config.json", {})
    with ShardedWriter(tmp_path / "parts", max_shard_size=max_shard_size, manifest=_manifest(ts)) as w:
        for k, v in ts.items():
            if v.dim() < 2:
                w.add_tensor(k, v)
                continue
            for a in range(0, v.shape[0], 4):  # uneven last part
                w.add_tensor_rows(k, a, v[a:a + 4])
        w.write_json("config.json", {})
    whole, parts = _load(tmp_path / "whole"), _load(tmp_path / "parts")
    assert whole.keys() == parts.keys() == ts.keys()
    assert all(torch.equal(parts[k], ts[k]) and parts[k].dtype == ts[k].dtype for k in ts)
    files = [sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("whole", "parts")]
    assert files[0] == files[1]
    if max_shard_size == "1GB":  # one file: byte for byte the same
        assert (tmp_path / "whole" / "model.safetensors").read_bytes() == \
            (tmp_path / "parts" / "model.safetensors").read_bytes()
        assert load_file(str(tmp_path / "parts" / "model.safetensors")).keys() == ts.keys()


@pytest.mark.parametrize("mistake", ["out_of_order", "whole_while_partial", "wrong_dtype", "too_many_rows"])
def test_misplaced_parts_fail_and_leave_nothing(tmp_path, mistake):
    ts = _tensors()
    a = ts["a.weight"]
    with pytest.raises(RuntimeError, match="writer manifest expected|half written"), \
            ShardedWriter(tmp_path / "out", manifest=_manifest(ts)) as w:
        if mistake == "out_of_order":
            w.add_tensor_rows("a.weight", 4, a[4:8])
        elif mistake == "whole_while_partial":
            w.add_tensor_rows("a.weight", 0, a[:4])
            w.add_tensor("a.weight", a)
        elif mistake == "wrong_dtype":
            w.add_tensor_rows("a.weight", 0, a[:4].float())
        else:
            w.add_tensor_rows("a.weight", 0, torch.cat([a, a[:1]]))
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone too


def test_rows_need_a_manifest(tmp_path):
    with pytest.raises(RuntimeError, match="needs a writer with a manifest"), ShardedWriter(tmp_path / "out") as w:
        w.add_tensor_rows("a", 0, torch.zeros(2, 2))
    assert not (tmp_path / "out").exists()
