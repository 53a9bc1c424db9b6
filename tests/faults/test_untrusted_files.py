"""Untrusted model files: crafted GGUF files (huge declared counts, strings, arrays, shapes and ranks, truncated data,
random bytes, a valid header over content transformers rejects) and crafted LoRA adapters (a huge or garbled
safetensors header, data past the file's end, a bad config, factors whose product would be enormous) each fail
through ``dfsmerge convert`` and ``dfsmerge eval`` (and named by a recipe through ``dfsmerge merge``, by a plan
through ``dfsmerge eval PLAN``) with a one-line error and exit 2, no traceback, and the process's peak RSS stays
under 1 GB. Valid GGUF headers read the same as with the gguf package's own reader."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dfsmerge.errors import CheckpointError
from dfsmerge.io.gguf import check_gguf_file
from tests.faults.conftest import REPO

gguf = pytest.importorskip("gguf")

RSS_LIMIT_KB = 1 << 20  # 1 GiB in ru_maxrss units (KiB on Linux)
U8, U32, F32, STR, ARR, U64 = 0, 4, 6, 8, 9, 10


def _s(b: bytes | str) -> bytes:
    b = b.encode() if isinstance(b, str) else b
    return struct.pack("<Q", len(b)) + b


def _kv(key, vtype, value: bytes, *, key_len=None) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k) if key_len is None else key_len) + k + struct.pack("<I", vtype) + value


def _gguf(kvs: list[bytes], tensors: list[tuple[str, tuple[int, ...], int, bytes]], *, n_kv=None, n_tensors=None,
          ranks=None) -> bytes:
    """A GGUF v3 file from raw metadata entries and ``(name, shape, ggml type, data)`` tensors."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                len(kvs) if n_kv is None else n_kv) + b"".join(kvs)
    offset, datas = 0, []
    for i, (name, shape, ttype, data) in enumerate(tensors):
        rank = len(shape) if ranks is None else ranks[i]
        out += _s(name) + struct.pack("<I", rank) + b"".join(struct.pack("<Q", d) for d in shape[::-1])
        out += struct.pack("<IQ", ttype, offset)
        pad = (-len(data)) % 32
        datas.append(data + b"\0" * pad)
        offset += len(data) + pad
    out += b"\0" * ((-len(out)) % 32)
    return out + b"".join(datas)


def _valid_parts():
    kvs = [_kv("general.architecture", STR, _s("llama")), _kv("general.name", STR, _s("crafted")),
           _kv("llama.block_count", U32, struct.pack("<I", 1))]
    t = np.arange(32, dtype=np.float32).tobytes()
    return kvs, [("token_embd.weight", (4, 8), 0, t)]


def crafted_gguf(tmp: Path) -> dict[str, Path]:
    kvs, tensors = _valid_parts()
    valid = _gguf(kvs, tensors)
    files = {
        "huge_tensor_count": _gguf(kvs, tensors, n_tensors=1 << 62),
        "huge_kv_count": _gguf(kvs, tensors, n_kv=1 << 60),
        "huge_key": _gguf([_kv("general.architecture", STR, _s("llama"), key_len=1 << 40)], tensors),
        "huge_string": _gguf([kvs[0], _kv("general.name", STR, struct.pack("<Q", 1 << 50) + b"x" * 16)], tensors),
        "huge_string_array": _gguf([kvs[0], _kv("tokenizer.ggml.tokens", ARR, struct.pack("<IQ", STR, 1 << 55))],
                                   tensors),
        "huge_numeric_array": _gguf([kvs[0], _kv("tokenizer.ggml.scores", ARR, struct.pack("<IQ", U64, 1 << 61))],
                                    tensors),
        "huge_shape": _gguf(kvs, [("token_embd.weight", (1 << 31, 1 << 31), 0, tensors[0][3])]),
        "huge_rank": _gguf(kvs, tensors, ranks=[1 << 31]),
        "truncated_data": valid[: len(valid) - 64],
        "random_bytes": random.Random(0).randbytes(4096),
        "unknown_tensor_type": _gguf(kvs, [("token_embd.weight", (4, 8), 9999, tensors[0][3])]),
        "valid_header_bad_content": valid,  # a llama with no hyperparameters, vocabulary or layers
    }
    out = {}
    for name, data in files.items():
        p = tmp / f"{name}.gguf"
        p.write_bytes(data)
        out[name] = p
    return out


def _safetensors(header: dict, data: bytes, *, header_len: int | None = None) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h) if header_len is None else header_len) + h + data


def crafted_adapters(tmp: Path, base: Path) -> dict[str, Path]:
    cfg = {"peft_type": "LORA", "base_model_name_or_path": str(base), "r": 1, "lora_alpha": 1,
           "target_modules": ["q_proj"]}
    mod = "base_model.model.model.layers.0.self_attn.q_proj"
    n = 1 << 18  # factors of 1 MiB each whose product would be 2**36 floats (256 GiB)
    big = {f"{mod}.lora_A.weight": {"dtype": "F32", "shape": [1, n], "data_offsets": [0, 4 * n]},
           f"{mod}.lora_B.weight": {"dtype": "F32", "shape": [n, 1], "data_offsets": [4 * n, 8 * n]}}
    a = {f"{mod}.lora_A.weight": {"dtype": "F32", "shape": [1, 16], "data_offsets": [0, 64]}}
    cases = {
        "adapter_huge_header": (cfg, _safetensors(a, b"\0" * 64, header_len=1 << 62)),
        "adapter_garbled_header": (cfg, struct.pack("<Q", 8) + b"{{{{{{{{" + b"\0" * 64),
        "adapter_data_past_end": (cfg, _safetensors({k: {**v, "data_offsets": [0, 1 << 40]} for k, v in a.items()},
                                                    b"\0" * 64)),
        "adapter_bad_config": ({**cfg, "r": "sixteen"}, _safetensors(a, b"\0" * 64)),
        "adapter_enormous_product": (cfg, _safetensors(big, b"\0" * (8 * n))),
    }
    out = {}
    for name, (c, weights) in cases.items():
        d = tmp / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps(c))
        (d / "adapter_model.safetensors").write_bytes(weights)
        out[name] = d
    return out


def test_valid_headers_read_like_ggufreader(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "ok.gguf", "llama")
    w.add_name("ok")
    w.add_uint32("llama.block_count", 2)
    w.add_token_list(["<s>", "a", "bb", "ccc"])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0, -3.0])
    w.add_custom_alignment(64)
    w.add_tensor("a", np.ones((3, 5), np.float32))
    w.add_tensor("b", np.ones((7,), np.float16))
    q = gguf.quants.quantize(np.ones((2, 64), np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("c", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = gguf.GGUFReader(tmp_path / "ok.gguf")
    got = check_gguf_file(tmp_path / "ok.gguf")
    assert got["n_tensors"] == len(r.tensors) == 3
    assert got["n_kv"] == len(r.fields) - 3  # the reader lists the header's version and counts as fields too
    assert got["alignment"] == r.alignment == 64
    assert got["data_offset"] == r.data_offset
    assert got["architecture"] == "llama"
    for p in crafted_gguf(tmp_path).values():  # what the checks refuse
        if p.stem != "valid_header_bad_content":
            with pytest.raises(CheckpointError, match=r"not a valid GGUF|truncated or corrupt"):
                check_gguf_file(p)


CHILD = textwrap.dedent('''
    import contextlib, io, json, sys, traceback
    from dfsmerge.cli import main
    results = []
    for argv in json.loads(sys.argv[1]):
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                rc = main(argv)
        except BaseException as e:  # what main did not turn into a one-line error
            rc, err = "raised", io.StringIO(traceback.format_exc())
        results.append({"argv": argv, "rc": rc, "stderr": err.getvalue()})
    # VmHWM: this process's own peak (ru_maxrss survives execve and would report the forking parent's size)
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"results": results, "maxrss_kb": hwm}))
''')


def test_crafted_files_fail_in_one_line_without_large_allocation(tiny_models, tmp_path):
    files = crafted_gguf(tmp_path)
    adapters = crafted_adapters(tmp_path, tiny_models["base"])
    import yaml

    from dfsmerge.genome.plan import PathPlan

    runs = []
    for name, p in files.items():
        runs.append([name, ["convert", str(p), str(tmp_path / f"out-{name}")]])
        runs.append([name, ["eval", str(p), "--tasks", "anything"]])
    for name, d in adapters.items():
        runs.append([name, ["eval", str(d), "--tasks", "anything"]])
    for name, ref in [*files.items(), *adapters.items()]:  # the same files named by a recipe and by a plan
        recipe = tmp_path / f"recipe-{name}.yaml"
        recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
            {"model": str(tiny_models["base"]), "parameters": {"weight": 0.5}},
            {"model": str(ref), "parameters": {"weight": 0.5}}]}))
        runs.append([name, ["merge", str(recipe), str(tmp_path / f"out-merge-{name}"), "--quiet"]])
        plan = tmp_path / f"plan-{name}.yaml"
        plan.write_text(PathPlan.identity("X", 1, models={"X": str(ref)}).to_yaml())
        runs.append([name, ["eval", str(plan), "--tasks", "anything"]])
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO), "DFSMERGE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(child), json.dumps([argv for _, argv in runs])], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    bad = []
    for (name, argv), res in zip(runs, out["results"], strict=True):
        # (a file that gets as far as transformers' conversion shows its progress bars before the error)
        lines = [x for x in res["stderr"].replace("\r", "\n").splitlines() if x.strip() and "it/s]" not in x]
        ok = (res["rc"] == 2 and len(lines) == 1 and lines[0].startswith("dfsmerge: error: ")
              and "Traceback" not in res["stderr"])
        if not ok:
            bad.append(f"{name} ({argv[0]}): rc={res['rc']} {res['stderr'][-800:]}")
    assert not bad, "\n".join(bad)
    print(f"peak RSS of the process that read all {len(runs)}: {out['maxrss_kb'] / 1024:.0f} MiB")
    assert out["maxrss_kb"] < RSS_LIMIT_KB, f"peak RSS {out['maxrss_kb'] / 1024:.0f} MiB"
    assert not list((tmp_path).glob("out-*")), "a failed convert left an output"


@pytest.mark.filterwarnings("ignore:.*llama.cpp's pre-tokenizer:UserWarning")  # a tokenizer trained in the test
def test_real_gguf_passes_the_checks_and_converts(tmp_path):
    """The checks refuse nothing real: a tiny Llama exported to GGUF by dfsmerge passes them and converts back to
    its own weights (f32: exact)."""
    from safetensors.torch import load_file

    from dfsmerge.export import export_plan
    from dfsmerge.genome.plan import PathPlan
    from dfsmerge.io.gguf import convert_gguf
    from tests.export.test_gguf_export import _tiny

    src = _tiny("llama", tmp_path / "src")
    export_plan(PathPlan.identity("S", 3, models={"S": str(src)}), tmp_path / "g", format="gguf", quant="f32")
    (path,) = (tmp_path / "g").glob("*.gguf")
    header = check_gguf_file(path)
    assert header["n_tensors"] == len(gguf.GGUFReader(path).tensors)
    out = convert_gguf(path, tmp_path / "back")
    got = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    want = {k: v for f in src.glob("*.safetensors") for k, v in load_file(f).items()}
    assert got.keys() == want.keys()
    for k in want:
        assert (got[k].float() - want[k].float()).abs().max().item() == 0.0, k
