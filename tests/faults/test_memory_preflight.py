"""Memory preflight: the estimate counts what transformers counts (the checkpoints' parameters, from the headers
alone), and a search or an ``eval`` whose estimate exceeds ``--max-memory`` or the machine's memory is refused with
one line before anything is loaded or any run directory is created. A ``dfsmerge merge`` recipe's estimate replays
the executor's schedule over the tensors' headers: over budget it is refused before a tensor is read or anything
is written; within budget the merging process's measured peak stays under it."""

from __future__ import annotations

import json
import math
import struct
import textwrap

import pytest
import torch
import yaml

from dfsmerge.cli import main
from dfsmerge.errors import ConfigError
from dfsmerge.io.memory import MemoryEstimate, check_memory, checkpoint_numel, machine_memory, parse_memory
from dfsmerge.merge import registered_methods
from dfsmerge.runtime.memory import search_estimate
from dfsmerge.search import load_search_config
from tests.search.conftest import read_evals


def _params(path) -> int:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return sum(p.numel() for p in m.state_dict().values())


def test_estimate_counts_the_checkpoints_parameters(tiny_models, make_config):
    for path in tiny_models.values():
        assert checkpoint_numel(path) == _params(path)
    from dfsmerge.search.space import build_space

    cfg = load_search_config(make_config("ps", "random"))  # cost + synthetic objectives: the pool is loaded
    assert cfg.needs_model
    est = search_estimate(cfg, build_space(cfg)[1])
    n = {name: _params(p) for name, p in tiny_models.items()}
    # the three models resident in float32 and one merged copy of the base architecture
    assert est.parts["merged copy (PS buffers)"] == 4 * n["base"]
    assert sum(v for k, v in est.parts.items() if k.startswith("model ")) == 4 * sum(n.values())
    assert not est.unknown


def test_search_over_budget_refused_before_any_work(tiny_models, make_config, tmp_path, capsys):
    from dfsmerge.search.space import build_space

    d = make_config("ps", "random", popsize=2, max_evals=2)
    est = search_estimate(load_search_config(d), build_space(load_search_config(d))[1])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(d))
    run = tmp_path / "run"
    assert main(["search", str(cfg), "--out", str(run), "--quiet", "--max-memory", str(est.total - 1)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ConfigError: each search worker needs an estimated" in err[0], err
    assert "--max-memory" in err[0] and "merged copy" in err[0]
    assert not run.exists()
    assert main(["search", str(cfg), "--out", str(run), "--quiet", "--max-memory", str(est.total)]) == 0
    assert len(read_evals(run)) == 2


def test_eval_of_a_model_larger_than_the_machine_refused(tiny_models, tmp_path, capsys):
    """A checkpoint whose header declares 4 TiB (a sparse file: nothing is on disk) is refused from its header."""
    d = tmp_path / "huge"
    d.mkdir()
    (d / "config.json").write_text((tiny_models["base"] / "config.json").read_text())
    n = 1 << 20
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "F32", "shape": [n, n],
                                                       "data_offsets": [0, 4 * n * n]}}).encode()
    with open(d / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 4 * n * n)
    assert checkpoint_numel(d) == n * n
    assert main(["eval", str(d), "--tasks", "anything"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs an estimated 4.0 TiB" in err[0] and "this machine's memory" in err[0], err


def test_eval_of_a_plan_over_budget(tiny_models, tmp_path, capsys):
    from dfsmerge.genome.plan import PathPlan

    plan = PathPlan.identity("A", 2, models={"A": str(tiny_models["base"])})
    (tmp_path / "plan.yaml").write_text(plan.to_yaml())
    assert main(["eval", str(tmp_path / "plan.yaml"), "--tasks", "anything", "--max-memory", "1KB"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "needs an estimated" in err and "--max-memory 1000 B" in err, err


def test_check_memory_and_parse():
    total, what = machine_memory("cpu")
    check_memory(MemoryEstimate({"x": total // 2}), what="w")
    with pytest.raises(ConfigError, match="more than this machine's memory"):
        check_memory(MemoryEstimate({"x": total + 1}), what="w")
    assert parse_memory("2GiB") == 2 << 30
    with pytest.raises(ConfigError, match="--max-memory 'lots'"):
        parse_memory("lots")


# --- dfsmerge merge: a recipe's peak, replayed from the executor's schedule over the headers ---------------------

MERGE_CHILD = textwrap.dedent('''
    import contextlib, io, json, sys
    import tqdm.auto  # noqa: F401 - what `dfsmerge merge` imports, loaded before anything is measured
    import dfsmerge.merge  # noqa: F401
    import dfsmerge.recipe.executor  # noqa: F401
    from dfsmerge.cli import main
    from dfsmerge.io import CheckpointReader

    reads = []
    for name in ("get_tensor", "get_rows"):  # every tensor read of a merge goes through these
        def counted(self, tensor, *a, _orig=getattr(CheckpointReader, name), **k):
            reads.append(tensor)
            return _orig(self, tensor, *a, **k)
        setattr(CheckpointReader, name, counted)

    def status(key):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

    results = []
    for argv in json.loads(sys.argv[1]):
        reads.clear()
        err = io.StringIO()
        base = status("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS: the peak below is this command's
        with contextlib.redirect_stderr(err):
            rc = main(argv)
        results.append({"rc": rc, "stderr": err.getvalue(), "increase": status("VmHWM:") - base,
                        "hwm": status("VmHWM:"), "reads": len(reads)})
    print(json.dumps(results))
''')


def _run_child(tmp_path, argvs: list[list[str]]) -> list[dict]:
    import os
    import subprocess
    import sys

    from tests.faults.conftest import REPO

    child = tmp_path / "merge_child.py"
    child.write_text(MERGE_CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(child), json.dumps(argvs)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _recipe(path, method: str, base, others, **params) -> str:
    per = {"weight": 0.5, "density": 0.5} if method != "linear" else {"weight": 0.5}
    d = {"merge_method": method, "dtype": "bfloat16", "parameters": params,
         "models": [{"model": str(m), "parameters": per} for m in others]}
    if method == "linear":
        d["models"].insert(0, {"model": str(base), "parameters": per})
    else:
        d["base_model"] = str(base)
    path.write_text(yaml.safe_dump(d))
    return str(path)


def _estimate(recipe: str, **kw) -> int:
    from dfsmerge.recipe.config import load_merge_config
    from dfsmerge.recipe.executor import merge_memory, open_models, plan_merge

    cfg = load_merge_config(recipe)
    return merge_memory(plan_merge(cfg, open_models(cfg)), **kw).total


def _sparse_checkpoint(d, like, rows: int, cols: int):
    """A checkpoint whose header declares an F32 embedding and head of ``rows x cols`` and tiny layers: a sparse
    file, so nothing is on disk and only reading it would allocate."""
    from safetensors import safe_open

    d.mkdir()
    cfg = json.loads((like / "config.json").read_text())
    cfg.update(vocab_size=rows, hidden_size=cols)
    (d / "config.json").write_text(json.dumps(cfg))
    header, offset = {}, 0
    (f,) = like.glob("*.safetensors")
    with safe_open(str(f), framework="pt") as h:
        names = list(h.keys())  # noqa: SIM118 - safe_open is no dict
    for name in names:
        shape = [rows, cols] if name in ("model.embed_tokens.weight", "lm_head.weight") else [1]
        n = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    with open(d / "model.safetensors", "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        out.truncate(8 + len(raw) + offset)
    return d


@pytest.fixture(scope="module")
def medium_models(tmp_path_factory):
    """A base and two fine-tunes, random bf16 Llama-shaped checkpoints of 27M parameters (embedding and head
    8192x1024): large enough that the merge's tensors, not the interpreter, set its peak."""
    from dfsmerge.io import ShardedWriter
    from dfsmerge.zoo.tiny import save_tiny_tokenizer, tiny_config

    root = tmp_path_factory.mktemp("medium_models")
    hidden, inter, vocab = 1024, 2048, 8192
    cfg = tiny_config("llama", num_layers=1, hidden=hidden, heads=16, kv_heads=16, intermediate=inter,
                      vocab_size=vocab).to_dict()
    cfg["dtype"], cfg["architectures"] = "bfloat16", ["LlamaForCausalLM"]
    p = "model.layers.0."
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden), p + "mlp.gate_proj.weight": (inter, hidden),
              p + "mlp.up_proj.weight": (inter, hidden), p + "mlp.down_proj.weight": (hidden, inter),
              p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)}
    shapes.update({p + f"self_attn.{n}_proj.weight": (hidden, hidden) for n in "qkvo"})
    out = []
    for i, name in enumerate(("base", "ft1", "ft2")):
        with ShardedWriter(root / name) as w:
            for j, (tensor, shape) in enumerate(shapes.items()):
                t = torch.randn(shape, generator=torch.Generator().manual_seed(j)) * 0.02
                if i:
                    t += torch.randn(shape, generator=torch.Generator().manual_seed(j + 1000 * i)) * 0.002
                w.add_tensor(tensor, t.to(torch.bfloat16))
            w.write_json("config.json", cfg)
        save_tiny_tokenizer(root / name)
        out.append(root / name)
    return out


def test_merge_over_budget_refused_before_any_read_or_write(tiny_models, tmp_path):
    """A recipe over small checkpoints with a tiny --max-memory, and one over checkpoints whose headers declare
    2 GiB tensors each (sparse files) with --max-memory 1GiB: both exit 2 with one line naming the estimate, the
    budget and the fix, before a tensor is read or anything is written; the process stays small."""
    small = _recipe(tmp_path / "small.yaml", "ties", tiny_models["base"], [tiny_models["m1"], tiny_models["m2"]])
    big_models = [_sparse_checkpoint(tmp_path / n, tiny_models["base"], 1 << 15, 1 << 14) for n in ("B", "F1", "F2")]
    big = _recipe(tmp_path / "big.yaml", "dare_ties", big_models[0], big_models[1:])
    outs = tmp_path / "outs"
    outs.mkdir()
    est_small, est_big = _estimate(small), _estimate(big)
    assert 0 < est_small < 1 << 20 and est_big > 6 << 30  # dare_ties merges the 2 GiB tensors whole
    warm = ["merge", small, str(tmp_path / "warm"), "--quiet"]  # imports and code paths, before the measurements
    refused = [["merge", small, str(outs / "small"), "--quiet", "--max-memory", "64KiB"],
               ["merge", big, str(outs / "big"), "--quiet", "--max-memory", "1GiB"]]
    res = _run_child(tmp_path, [warm, *refused])
    assert res[0]["rc"] == 0 and res[0]["reads"] > 0, res[0]["stderr"]
    for r, est, budget in zip(res[1:], (est_small, est_big), ("64.0 KiB", "1.0 GiB"), strict=True):
        lines = r["stderr"].strip().splitlines()
        assert r["rc"] == 2 and len(lines) == 1, r["stderr"]
        assert lines[0].startswith("dfsmerge: error: ConfigError: merge_method="), lines[0]
        from dfsmerge.io.diskspace import human_bytes

        assert f"needs an estimated {human_bytes(est)}" in lines[0], lines[0]
        assert f"more than --max-memory {budget}" in lines[0] and "raise --max-memory" in lines[0], lines[0]
        assert r["reads"] == 0, "a tensor was read before the refusal"
        assert r["increase"] < 32 << 20, f"the refusal grew the process by {r['increase'] >> 20} MiB"
        assert r["hwm"] < 1 << 30
    assert "model.embed_tokens.weight whole" in res[2]["stderr"]  # the tensors in flight at the peak
    assert not list(outs.iterdir()), "a refused merge wrote something"


@pytest.mark.parametrize("method", ["ties", "dare_ties"])  # a tensor streamed in row chunks; one merged whole
def test_merge_within_budget_runs_and_the_estimate_bounds_its_peak(medium_models, tiny_models, tmp_path, method):
    """With --max-memory just above the estimate the merge runs, and its peak resident-set increase, read from the
    merging process's own VmHWM, is at most the estimate."""
    base, *others = medium_models
    recipe = _recipe(tmp_path / "r.yaml", method, base, others)
    est = _estimate(recipe)
    warm = _recipe(tmp_path / "warm.yaml", method, tiny_models["base"], [tiny_models["m1"], tiny_models["m2"]])
    res = _run_child(tmp_path, [["merge", warm, str(tmp_path / "warm"), "--quiet"],
                                ["merge", recipe, str(tmp_path / "out"), "--quiet", "--max-memory",
                                 str(est + (1 << 20))]])
    warm_res, r = res
    assert warm_res["rc"] == 0 and r["rc"] == 0, r["stderr"]
    assert (tmp_path / "out" / "config.json").is_file()
    print(f"{method}: estimate {est / 2**20:.0f} MiB, measured peak increase {r['increase'] / 2**20:.0f} MiB")
    assert r["increase"] <= est
    assert r["increase"] > est / 8  # the tensors set the peak: the measurement is not of an empty run


def test_merge_refusal_suggests_one_worker_when_that_fits(medium_models, tmp_path, capsys):
    base, *others = medium_models
    recipe = _recipe(tmp_path / "r.yaml", "dare_ties", base, others)
    two, one = _estimate(recipe, workers=2), _estimate(recipe, workers=1)
    assert one < two
    assert main(["merge", recipe, str(tmp_path / "out"), "--quiet", "--max-memory", str(one)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run with --workers 1 (estimated" in err[0], err
    assert not (tmp_path / "out").exists()


JOB_CHILD = textwrap.dedent('''
    import json, math, sys
    import dfsmerge.recipe.executor as R
    from dfsmerge.recipe.config import load_merge_config

    def status(key):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

    cfg = load_merge_config(sys.argv[1])
    plan = R.plan_merge(cfg, R.open_models(cfg))
    size = lambda j: math.prod(plan.readers[j.inputs[0][0]].get_shape(j.inputs[0][1]))
    job = max(plan.jobs, key=size)
    R.execute_job(plan, min(plan.jobs, key=size), chunk_bytes=None)  # code paths warmed up
    out = {}
    for mode, chunk_bytes in (("chunked", 32 << 20), ("whole", None)):
        estimate, how = R.job_memory(plan, job, chunk_bytes=chunk_bytes)
        chunked = R.job_chunking(plan, job, chunk_bytes=chunk_bytes)
        base = status("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        if chunked is None:
            t = R.execute_job(plan, job, chunk_bytes=None)
        else:
            for _, t in R.chunk_rows(plan, job, *chunked):  # the parts as the writer takes them, one at a time
                del t
        t = None
        # one merging thread: merge_memory's allowance for the free memory the allocator keeps
        estimate += min(R._ARENA_KEEP, estimate)
        out[mode] = {"how": how, "peak": status("VmHWM:") - base, "estimate": estimate}
    print(json.dumps(out))
''')


@pytest.mark.slow  # a process per method, each merging its largest tensor twice: minutes on 2 cores
@pytest.mark.parametrize("method", sorted(registered_methods()))
def test_every_method_merges_within_its_estimate(medium_models, tmp_path, method):
    """Each method's largest tensor (8192x1024, bf16), merged whole and in 32 MiB row chunks: the merging
    process's peak increase (VmHWM) is at most ``job_memory``'s estimate plus one thread's allocator allowance
    (as :func:`dfsmerge.recipe.executor.merge_memory` counts them)."""
    import os
    import subprocess
    import sys

    from dfsmerge.merge import get_method
    from tests.faults.conftest import REPO

    m = get_method(method)
    names = {p.name for p in m.params}
    per = {k: v for k, v in (("weight", 0.5), ("density", 0.5)) if k in names}
    base, *others = medium_models
    if m.max_non_base is not None:
        others = others[:m.max_non_base]
    if m.max_inputs is not None:
        others = others[:m.max_inputs - 1]
    d = {"merge_method": method, "dtype": "bfloat16", "parameters": {"t": 0.3} if "t" in names else {}}
    if m.base == "none":
        models = medium_models[:m.max_inputs] if m.max_inputs else medium_models
        d["models"] = [{"model": str(p), "parameters": per} for p in models]
    else:
        d["base_model"] = str(base)
        d["models"] = [{"model": str(p), "parameters": per} for p in others]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    (tmp_path / "child.py").write_text(JOB_CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "r.yaml")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    for mode, x in r.items():
        print(f"{method} {mode} ({x['how']}): peak {x['peak'] / 2**20:.0f} MiB, estimate "
              f"{x['estimate'] / 2**20:.0f} MiB")
        assert x["peak"] <= x["estimate"], f"{mode}: {x}"
