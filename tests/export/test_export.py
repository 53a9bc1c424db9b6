"""Exports against the runtime: folded checkpoints in vanilla transformers, compact ones with trust_remote_code,
mergekit 0.1.5 on the emitted YAML, atomicity, and run-directory candidates."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dfsmerge.errors import ConfigError, OutputExistsError
from dfsmerge.export import export_candidate, export_plan, export_ps
from dfsmerge.export.card import draw_path
from dfsmerge.genome.plan import LayerRef, PathPlan, Step
from dfsmerge.runtime.pool import LayerPool
from dfsmerge.runtime.stitched import StitchedModel, hops_from_plan
from dfsmerge.zoo.tiny import make_tiny_checkpoint

FAMILIES = ("llama", "qwen2", "gemma2")
N_LAYERS = 3
T = 70  # longer than the tiny Gemma-2 sliding window (64), so sliding and full layers differ


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """``{family: (A, B)}``: two independent tiny models per family (embeddings of std 1, as real checkpoints)."""
    root = tmp_path_factory.mktemp("export_sources")
    return {fam: (make_tiny_checkpoint(fam, root / fam / "A", seed=0, num_layers=N_LAYERS, hidden=64, embed_std=1.0),
                  make_tiny_checkpoint(fam, root / fam / "B", seed=1, num_layers=N_LAYERS, hidden=64, embed_std=1.0))
            for fam in FAMILIES}


@pytest.fixture(scope="module")
def pools(sources):
    return {fam: LayerPool({"A": str(a), "B": str(b)}) for fam, (a, b) in sources.items()}


def random_plan(seed: int, a: Path, b: Path) -> PathPlan:
    """4..7 steps from A and B with at least one repeated layer, scales in [0.5, 2], random embed/base."""
    rng = random.Random(seed)
    n = rng.randint(4, 7)
    refs = [LayerRef(rng.choice("AB"), rng.randrange(N_LAYERS)) for _ in range(n - 1)]
    refs.insert(rng.randrange(n), refs[rng.randrange(n - 1)])  # a repeat
    steps = tuple(Step(r, rng.uniform(0.5, 2.0)) for r in refs)
    return PathPlan(steps, models={"A": str(a), "B": str(b)}, base=rng.choice("AB"), embed=rng.choice("AB"))


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 40, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, :5] = 0  # left padding in row 0
    return ids, mask


def _check_against_runtime(model, reference, *, use_cache: bool = True) -> None:
    """Logits within 1e-4 relative (fp32) and identical greedy generations of 32 tokens (KV cache on)."""
    ids, mask = _inputs()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = reference(ids, attention_mask=mask, position_ids=pos).logits
        got = model(ids, attention_mask=mask, position_ids=pos).logits
    keep = mask.bool()
    rel = _rel(got[keep], want[keep])
    assert rel < 1e-4, f"relative max diff {rel:.3g}, mean abs diff {(got - want)[keep].abs().mean():.3g}"
    prompt, pmask = ids[:, -8:].clone(), torch.ones(2, 8, dtype=torch.long)
    prompt[0, :3], pmask[0, :3] = 0, 0  # left padding, as generate expects
    want_ids = reference.generate(prompt, attention_mask=pmask, max_new_tokens=32, eos_token_id=2, pad_token_id=0)
    got_ids = model.generate(prompt, attention_mask=pmask, max_new_tokens=32, do_sample=False, eos_token_id=2,
                             pad_token_id=0, use_cache=use_cache)
    n = max(want_ids.shape[1], got_ids.shape[1])
    pad = lambda x: torch.nn.functional.pad(x, (0, n - x.shape[1]), value=0)  # noqa: E731
    assert torch.equal(pad(got_ids), pad(want_ids)), f"generations differ:\n{got_ids}\n{want_ids}"


# ---------------------------------------------------------------------------------------------- folded
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", [0, 1, 3])
def test_folded_matches_runtime(family, seed, sources, pools, tmp_path):
    plan = random_plan(seed, *sources[family])
    out = export_plan(plan, tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == len(plan.steps) and cfg["model_type"] == family
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert len(model.model.layers) == len(plan.steps)
    _check_against_runtime(model, StitchedModel.from_pool(pools[family], plan))


def test_folded_layer_types_follow_path(sources, tmp_path):
    """Gemma-2 alternates sliding/full layers; the export's layer_types follow the source layer of each step."""
    a, b = sources["gemma2"]
    plan = PathPlan((Step(LayerRef("A", 1)), Step(LayerRef("A", 1)), Step(LayerRef("B", 0))),
                    models={"A": str(a), "B": str(b)}, base="A")
    src = json.loads((a / "config.json").read_text())["layer_types"]
    cfg = json.loads((export_plan(plan, tmp_path / "o") / "config.json").read_text())
    assert cfg["layer_types"] == [src[1], src[1], src[0]]


def test_tied_base_with_foreign_embedding_is_untied(tmp_path):
    """A tied base whose path reads another model's embedding needs a separate head: the export unties it."""
    a = make_tiny_checkpoint("llama", tmp_path / "A", seed=0, num_layers=2, hidden=64, tie=True)
    b = make_tiny_checkpoint("llama", tmp_path / "B", seed=1, num_layers=2, hidden=64, tie=True)
    plan = PathPlan((Step(LayerRef("B", 0), 1.5), Step(LayerRef("A", 1), 0.8)), models={"A": str(a), "B": str(b)},
                    base="A", embed="B")
    out = export_plan(plan, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    _check_against_runtime(model, StitchedModel.from_pool(LayerPool({"A": str(a), "B": str(b)}), plan))


def test_fold_formula_on_tensors(sources, tmp_path):
    """Independent restatement of the fold: the (untied) embedding absorbs e = s_1; step k's residual outputs are
    divided by D_k = s_1...s_k / e (llama), or their gain 1 + w is (gemma2); other tensors are copied."""
    for family in ("llama", "gemma2"):
        a, _ = sources[family]
        s1, s2 = 2.0, 0.75
        plan = PathPlan((Step(LayerRef("A", 2), s1), Step(LayerRef("A", 0), s2)), models={"A": str(a)})
        out = export_plan(plan, tmp_path / family)
        got, src = load_file(out / "model.safetensors"), load_file(a / "model.safetensors")
        emb = "model.embed_tokens.weight"
        torch.testing.assert_close(got[emb].double(), src[emb].double() * s1, rtol=1e-6, atol=1e-7)
        for k, (ref, d) in enumerate(zip(plan.layers, (1.0, s2), strict=True)):
            if family == "llama":
                name = "model.layers.{}.mlp.down_proj.weight"
                want = src[name.format(ref.index)].double() / d
            else:
                name = "model.layers.{}.post_feedforward_layernorm.weight"
                want = (1 + src[name.format(ref.index)].double()) / d - 1
            torch.testing.assert_close(got[name.format(k)].double(), want, rtol=1e-6, atol=1e-7)
            q = "model.layers.{}.self_attn.q_proj.weight"
            assert torch.equal(got[q.format(k)], src[q.format(ref.index)])


def test_embedding_absorbs_first_scale_small_hidden_states(tmp_path):
    """With tiny embeddings (mean(h^2) ~ 1e-6 = eps) the eps is not negligible: absorbing s_1 into the embedding
    keeps a one-step path exact, where dividing its branch outputs by C_1 would not be."""
    a = make_tiny_checkpoint("llama", tmp_path / "A", seed=0, num_layers=2, hidden=64, embed_std=1e-3)
    plan = PathPlan((Step(LayerRef("A", 1), 3.0), Step(LayerRef("A", 0), 1.0)), models={"A": str(a)})
    model = AutoModelForCausalLM.from_pretrained(str(export_plan(plan, tmp_path / "out")), dtype=torch.float32)
    ids, _ = _inputs()
    with torch.no_grad():
        want = StitchedModel.from_pool(LayerPool({"A": str(a)}), plan)(ids).logits
        rel = _rel(model(ids).logits, want)
    assert rel < 1e-4, f"relative max diff {rel:.3g}"


def test_nonpositive_cumulative_scale_refused_folded_accepted_compact(sources, pools, tmp_path):
    a, b = sources["llama"]
    plan = PathPlan((Step(LayerRef("A", 0), 1.0), Step(LayerRef("B", 1), -0.5), Step(LayerRef("A", 2), 1.0)),
                    models={"A": str(a), "B": str(b)}, base="A")
    with pytest.raises(ConfigError, match="--format compact"):
        export_plan(plan, tmp_path / "folded")
    assert not (tmp_path / "folded").exists()
    out = export_plan(plan, tmp_path / "compact", format="compact")
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, trust_remote_code=True).eval()
    pool = pools["llama"]
    ref = StitchedModel(embedding=pool.embedding("A"), hops=hops_from_plan(pool, plan), final_norm=pool.final_norm(),
                        head=pool.head(), rotary=pool.rotary(), config=pool["A"].config)
    _check_against_runtime(model, ref)


# ---------------------------------------------------------------------------------------------- compact
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", [0, 5])
def test_compact_matches_runtime(family, seed, sources, pools, tmp_path):
    plan = random_plan(seed, *sources[family])
    out = export_plan(plan, tmp_path / "out", format="compact")
    cfg = json.loads((out / "config.json").read_text())
    stored = list(dict.fromkeys(plan.layers))
    assert cfg["num_hops"] == len(plan.steps) and cfg["input_scales"] == list(plan.scales)
    assert [stored[i] for i in cfg["input_layers"]] == list(plan.layers)
    n_stored = {k.split(".")[2] for k in load_file(out / "model.safetensors") if k.startswith("model.layers.")}
    assert len(n_stored) == len(stored) < len(plan.steps)  # each distinct layer once
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, trust_remote_code=True).eval()
    assert type(model).__name__ == "DfsCompactForCausalLM"
    _check_against_runtime(model, StitchedModel.from_pool(pools[family], plan))
    with torch.no_grad():  # its own KV-cache slot per hop
        o = model(torch.tensor([[5, 6, 7]]), use_cache=True)
    assert len(o.cache.layers) == len(plan.steps)


@pytest.mark.parametrize("family", ["mistral", "qwen3"])
def test_other_families_folded_and_compact(family, tmp_path):
    """The other supported families, and the compact model under the eager attention backend."""
    a = make_tiny_checkpoint(family, tmp_path / "A", seed=0, num_layers=N_LAYERS, hidden=64)
    b = make_tiny_checkpoint(family, tmp_path / "B", seed=1, num_layers=N_LAYERS, hidden=64)
    plan = random_plan(0, a, b)
    ref = StitchedModel.from_pool(LayerPool({"A": str(a), "B": str(b)}), plan)
    folded = export_plan(plan, tmp_path / "folded")
    _check_against_runtime(AutoModelForCausalLM.from_pretrained(str(folded), dtype=torch.float32).eval(), ref)
    compact = export_plan(plan, tmp_path / "compact", format="compact")
    model = AutoModelForCausalLM.from_pretrained(str(compact), dtype=torch.float32, trust_remote_code=True,
                                                 attn_implementation="eager").eval()
    assert model.model.config._attn_implementation == "eager"
    _check_against_runtime(model, ref)


def test_compact_cache_matches_no_cache(sources, tmp_path):
    plan = random_plan(5, *sources["gemma2"])
    out = export_plan(plan, tmp_path / "out", format="compact")
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, trust_remote_code=True).eval()
    prompt = torch.randint(5, 40, (2, 60), generator=torch.Generator().manual_seed(1))
    a = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    b = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- mergekit
def _run_mergekit(yaml_text: str, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    os.environ["HF_HUB_OFFLINE"] = "1"
    cfg = MergeConfiguration.model_validate(yaml.safe_load(yaml_text))
    run_merge(cfg, str(out), options=MergeOptions(copy_tokenizer=False, write_model_card=False))
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def test_mergekit_reproduces_folded_llama(sources, tmp_path):
    a, b = sources["llama"]
    plan = PathPlan((Step(LayerRef("A", 0), 1.3), Step(LayerRef("B", 2), 0.6), Step(LayerRef("A", 0), 1.7),
                     Step(LayerRef("B", 1), 1.0), Step(LayerRef("A", 1), 0.9)),
                    models={"A": str(a), "B": str(b)}, base="A")
    out = export_plan(plan, tmp_path / "out")
    text = (out / "mergekit.yaml").read_text()
    assert "NOT EXACT" not in text
    ours = load_file(out / "model.safetensors")
    theirs = _run_mergekit(text, tmp_path / "mk")
    assert set(theirs) == set(ours)
    for k, v in ours.items():
        torch.testing.assert_close(theirs[k], v, rtol=1e-6, atol=1e-8, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("family,base,reason", [("llama", "B", "last slice's model"), ("qwen2", "A", "layer_types"),
                                                ("gemma2", "A", "1 + w")])
def test_mergekit_header_says_why_not(family, base, reason, sources, tmp_path):
    a, b = sources[family]
    plan = PathPlan((Step(LayerRef("A", 0), 1.0), Step(LayerRef("A", 1), 1.4)), models={"A": str(a), "B": str(b)},
                    base=base)
    text = (export_plan(plan, tmp_path / "out") / "mergekit.yaml").read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    assert "NOT EXACT" in header and reason in header


# ---------------------------------------------------------------------------------------------- atomicity
def test_existing_output_refused_and_untouched(sources, tmp_path):
    a, _ = sources["llama"]
    plan = PathPlan.identity("A", N_LAYERS, models={"A": str(a)})
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="--force"):
        export_plan(plan, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"] and (target / "keep.txt").read_text() == "precious"
    export_plan(plan, target, force=True)
    assert not (target / "keep.txt").exists() and (target / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left beside it


def test_killed_midway_leaves_no_directory(sources, tmp_path):
    """SIGKILL while tensors are being written: nothing appears at the target."""
    a, b = sources["llama"]
    plan = random_plan(0, a, b)
    plan_file = tmp_path / "plan.yaml"
    plan.save(plan_file)
    target, flag = tmp_path / "out", tmp_path / "started"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from dfsmerge.io import ShardedWriter
        from dfsmerge.export import export_plan
        orig = ShardedWriter.add_tensor
        def slow(self, name, t):
            orig(self, name, t)
            Path({str(flag)!r}).touch()
            time.sleep(0.5)
        ShardedWriter.add_tensor = slow
        export_plan({str(plan_file)!r}, {str(target)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert proc.poll() is None, "export process ended before writing"
            assert time.monotonic() < deadline, "export never started writing"
            time.sleep(0.05)
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()


# ---------------------------------------------------------------------------------------------- runs, card, cli
PS_RECIPE_METHOD = "linear"


def _ps_recipe(a: Path, b: Path) -> dict:
    return {"merge_method": PS_RECIPE_METHOD, "dtype": "float32",
            "models": [{"model": str(a), "parameters": {"weight": 0.7}},
                       {"model": str(b), "parameters": {"weight": 0.3}}]}


@pytest.fixture
def run_dir(sources, tmp_path):
    a, b = sources["llama"]
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    dfs = {"models": {"A": str(a), "B": str(b)}, "base": "A",
           "path": [{"model": "A", "layer": 0, "scale": 1.0}, {"model": "B", "layer": 1, "scale": 1.25},
                    {"model": "A", "layer": 1, "scale": 0.8}]}
    joint = {"models": {"merged": "@ps", "B": str(b)}, "base": "merged",
             "path": [{"model": "merged", "layer": 0, "scale": 1.0}, {"model": "B", "layer": 2, "scale": 1.5},
                      {"model": "merged", "layer": 0, "scale": 0.7}, {"model": "merged", "layer": 2, "scale": 1.1}]}
    rows = [{"id": 0, "generation": 0, "candidate": {"ps": None, "path": dfs}, "objectives": {"acc": 0.5}},
            {"id": 1, "generation": 0, "candidate": {"ps": _ps_recipe(a, b), "path": joint},
             "objectives": {"acc": 0.75}},
            {"id": 2, "generation": 1, "candidate": {"ps": _ps_recipe(a, b), "path": None},
             "objectives": {"acc": 0.6}}]
    (run / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "best" / "plan.yaml").write_text(yaml.safe_dump(dfs))
    return run


def test_export_best_dfs_candidate(run_dir, pools, tmp_path):
    out = export_candidate(run_dir, "best", tmp_path / "best")
    card = (out / "README.md").read_text()
    assert "| acc | 0.5 |" in card and "embed(A) -> A[0] -> B[1] x1.25 -> A[1] x0.8 -> head(A)" in card
    plan = PathPlan.load(out / "dfsmerge_plan.yaml")
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    _check_against_runtime(model, StitchedModel.from_pool(pools["llama"], plan))


def test_export_joint_candidate_materializes_ps(run_dir, sources, tmp_path):
    """A plan model '@ps' is the candidate's PS merge: reference = runtime over dfsmerge merge's output."""
    from dfsmerge.recipe.config import load_merge_config
    from dfsmerge.recipe.executor import run_merge

    a, b = sources["llama"]
    out = export_candidate(run_dir, 1, tmp_path / "joint")
    merged = run_merge(load_merge_config(_ps_recipe(a, b)), tmp_path / "merged", progress=False)
    plan = PathPlan.load(out / "dfsmerge_plan.yaml")
    assert dict(plan.models)["merged"] == "@ps"
    ref_plan = PathPlan(plan.steps, models={"merged": str(merged), "B": str(b)}, base="merged")
    pool = LayerPool({"merged": str(merged), "B": str(b)})
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    _check_against_runtime(model, StitchedModel.from_pool(pool, ref_plan))
    text = (out / "mergekit.yaml").read_text()
    docs = list(yaml.safe_load_all(text))
    assert docs[0]["name"] == "ps_merged" and docs[1]["slices"][0]["sources"][0]["model"] == "ps_merged"
    assert "mergekit-multi" in text
    # mergekit 0.1.5 runs both documents (PS merge, then passthrough with scale filters) to the same tensors
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([str(Path(sys.executable).parent / "mergekit-multi"), str(out / "mergekit.yaml"), "-I",
                    str(tmp_path / "mk_inter"), "--out-path", str(tmp_path / "mk"), "--no-copy-tokenizer"],
                   check=True, env=env, cwd=tmp_path, capture_output=True)
    theirs = {}
    for f in sorted((tmp_path / "mk").glob("*.safetensors")):
        theirs.update(load_file(f))
    ours = load_file(out / "model.safetensors")
    assert set(theirs) == set(ours)
    for k, v in ours.items():
        torch.testing.assert_close(theirs[k], v, rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temporary PS model removed


def test_export_ps_only_candidate_equals_merge(run_dir, sources, tmp_path):
    from dfsmerge.recipe.config import load_merge_config
    from dfsmerge.recipe.executor import run_merge

    a, b = sources["llama"]
    out = export_candidate(run_dir, "2", tmp_path / "ps")
    merged = run_merge(load_merge_config(_ps_recipe(a, b)), tmp_path / "merged", progress=False)
    ours, want = load_file(out / "model.safetensors"), load_file(merged / "model.safetensors")
    assert set(ours) == set(want) and all(torch.equal(ours[k], want[k]) for k in want)
    assert yaml.safe_load((out / "mergekit.yaml").read_text()) == _ps_recipe(a, b)
    assert "| acc | 0.6 |" in (out / "README.md").read_text()
    with pytest.raises(OutputExistsError):
        export_ps(_ps_recipe(a, b), out)


def test_unknown_candidate_names_ids(run_dir, tmp_path):
    with pytest.raises(ConfigError, match="ids: 0, 1, 2"):
        export_candidate(run_dir, "7", tmp_path / "x")


def test_draw_path():
    plan = PathPlan((Step(LayerRef("A", 0)), Step(LayerRef("A", 1), 1.2), Step(LayerRef("B", 3), 0.5)),
                    models={"A": "a", "B": "b"}, base="A", embed="B")
    assert draw_path(plan) == "embed(B) -> A[0] -> A[1] x1.2 -> B[3] x0.5 -> head(A)"


def test_cli_plan_and_run(run_dir, sources, tmp_path, capsys):
    from dfsmerge.cli import build_parser

    parser = build_parser()
    a, b = sources["llama"]
    plan_file = tmp_path / "plan.yaml"
    random_plan(1, a, b).save(plan_file)
    args = parser.parse_args(["export", "--plan", str(plan_file), "--out", str(tmp_path / "p"), "--format", "compact"])
    assert args.handler(args) == 0 and (tmp_path / "p" / "compact_modeling.py").is_file()
    args = parser.parse_args(["export", str(run_dir), "--candidate", "best", "--out", str(tmp_path / "r")])
    assert args.handler(args) == 0 and (tmp_path / "r" / "config.json").is_file()
    rel = random_plan(1, Path("..") / a.parent.name / a.name, Path("..") / b.parent.name / b.name)
    (a.parent.parent / "plans").mkdir(exist_ok=True)
    rel.save(a.parent.parent / "plans" / "rel.yaml")  # model paths relative to the plan file's directory
    args = parser.parse_args(["export", "--plan", str(a.parent.parent / "plans" / "rel.yaml"), "--out",
                              str(tmp_path / "rel")])
    assert args.handler(args) == 0
    got = load_file(tmp_path / "rel" / "model.safetensors")
    want = load_file(export_plan(random_plan(1, a, b), tmp_path / "abs") / "model.safetensors")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    args = parser.parse_args(["export", str(run_dir), "--plan", str(plan_file), "--out", str(tmp_path / "z")])
    with pytest.raises(ConfigError, match="not both"):
        args.handler(args)


def test_sharded_output_and_dtype(sources, pools, tmp_path):
    """Small shards get an index that vanilla transformers follows; --dtype converts every tensor."""
    plan = random_plan(3, *sources["qwen2"])
    out = export_plan(plan, tmp_path / "out", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    _check_against_runtime(model, StitchedModel.from_pool(pools["qwen2"], plan))
    bf = export_plan(plan, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((bf / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(bf / "model.safetensors").values()} == {torch.bfloat16}


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("format", ["folded", "compact"])
def test_tied_base_stays_tied_or_head_written(family, format, tmp_path):
    """A tied base reading its own embedding stays tied (folded; the embedding absorbs nothing, e = 1); compact
    always writes the head."""
    a = make_tiny_checkpoint(family, tmp_path / "A", seed=0, num_layers=2, hidden=64, tie=True)
    plan = PathPlan((Step(LayerRef("A", 1), 1.5), Step(LayerRef("A", 1), 0.8), Step(LayerRef("A", 0), 1.2)),
                    models={"A": str(a)}, base="A")
    out = export_plan(plan, tmp_path / "out", format=format)
    tensors = load_file(out / "model.safetensors")
    assert ("lm_head.weight" in tensors) == (format == "compact")
    emb = "model.embed_tokens.weight"
    assert torch.equal(tensors[emb], load_file(a / "model.safetensors")[emb])
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32,
                                                 trust_remote_code=format == "compact").eval()
    _check_against_runtime(model, StitchedModel.from_pool(LayerPool({"A": str(a)}), plan))


def test_ps_marker_without_recipe_refused(sources, tmp_path):
    a, _ = sources["llama"]
    plan = PathPlan((Step(LayerRef("merged", 0)),), models={"merged": "@ps"}, base="merged")
    with pytest.raises(ConfigError, match="@ps"):
        export_plan(plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_large_cumulative_scale_warns(sources, tmp_path):
    a, _ = sources["llama"]
    plan = PathPlan(tuple(Step(LayerRef("A", i % N_LAYERS), 2000.0) for i in range(3)), models={"A": str(a)})
    with pytest.warns(UserWarning, match="compact"):
        export_plan(plan, tmp_path / "out")
