"""Tokenizer merging (``tokenizer_source`` / ``tokenizer:``) against mergekit 0.1.5, the test oracle.

Tiny Llama checkpoints whose vocabularies differ in size and in added tokens (plain and special, one padded to a
multiple of 8) are merged by both tools; the saved tokenizers must have the same vocabulary and every embedding and
head row must agree within 1e-6 in float32. mergekit orders the models of a union by a set's (hash-seeded) order,
so the ids of tokens that come from different non-base models can differ between runs of mergekit itself: rows are
compared per token, and the vocabularies as token -> id maps when the recipe has one non-base model.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dfsmerge.errors import ConfigError
from dfsmerge.recipe.config import load_merge_config
from dfsmerge.recipe.executor import run_merge
from dfsmerge.zoo.tiny import make_tiny_checkpoint
from tests.mergekit_oracle import run_mergekit

pytest.importorskip("mergekit.merge", reason="mergekit 0.1.5 is the test oracle")

TOL = 1e-6
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _variant(root: Path, name: str, base: Path, seed: int, add: list[str], special: list[str],
             pad: int | None = None) -> Path:
    """A fine-tune of ``base`` with ``add`` / ``special`` tokens added and random rows for them."""
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = make_tiny_checkpoint("llama", root / name, like=base, seed=seed, delta_std=0.1)
    tok = AutoTokenizer.from_pretrained(str(d))
    tok.add_tokens(add)
    tok.add_tokens([AddedToken(s, special=True) for s in special])
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    n0 = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tok), pad_to_multiple_of=pad, mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            w[n0:] = torch.randn(w[n0:].shape, generator=g)
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """``base`` (49 tokens); ``a``: + xy, zz, special <tool> (52); ``b``: + zz, qq, <tool>, <im> (53, 56 rows)."""
    root = tmp_path_factory.mktemp("tok_zoo")
    base = make_tiny_checkpoint("llama", root / "base", seed=0, num_layers=2)
    return {"base": base,
            "a": _variant(root, "a", base, 1, ["xy", "zz"], ["<tool>"]),
            "b": _variant(root, "b", base, 2, ["zz", "qq"], ["<tool>", "<im>"], pad=8)}


def _recipe(method: str, zoo: dict[str, Path], models: list[str], **extra) -> dict:
    params = {"linear": lambda i: {"weight": 0.5 - 0.1 * i}, "ties": lambda i: {"weight": 0.6, "density": 0.5},
              "slerp": lambda i: {}}[method]
    recipe = {"merge_method": method, "base_model": str(zoo["base"]), "dtype": "float32",
              "models": [{"model": str(zoo[m]), "parameters": params(i)} for i, m in enumerate(models)]}
    if method == "ties":
        recipe["parameters"] = {"normalize": True}
    if method == "slerp":
        recipe["parameters"] = {"t": 0.3}
    recipe.update(extra)
    return recipe


def _mergekit(recipe: dict, out: Path) -> Path:
    return run_mergekit(recipe, out, copy_tokenizer=True)


def _ours(recipe: dict, out: Path) -> Path:
    return run_merge(load_merge_config(recipe), out, progress=False)


def _vocab(d: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d)).get_vocab()


def _assert_same(ours: Path, theirs: Path, *, same_ids: bool) -> None:
    va, vb = _vocab(ours), _vocab(theirs)
    assert set(va) == set(vb), f"vocabularies differ: {sorted(set(va) ^ set(vb))}"
    if same_ids:
        assert va == vb, {t: (va[t], vb[t]) for t in va if va[t] != vb[t]}
    cfg_a, cfg_b = (json.loads((d / "config.json").read_text()) for d in (ours, theirs))
    assert cfg_a["vocab_size"] == cfg_b["vocab_size"]
    a, b = load_file(str(ours / "model.safetensors")), load_file(str(theirs / "model.safetensors"))
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, (k, a[k].shape, b[k].shape)
        x, y = a[k].double(), b[k].double()
        if k in VOCAB_TENSORS:  # rows by token (then the padding rows beyond the vocabulary)
            tokens = sorted(va)
            x = torch.cat([x[[va[t] for t in tokens]], x[len(va):]])
            y = torch.cat([y[[vb[t] for t in tokens]], y[len(vb):]])
        d = (x - y).abs()
        assert d.max().item() <= TOL, f"{k}: max |diff| {d.max().item():.3g}, mean {d.mean().item():.3g}"


CASES = {
    "linear-union-3": ("linear", ["base", "a", "b"], {"tokenizer_source": "union"}),
    "ties-union-3": ("ties", ["base", "a", "b"], {"tokenizer_source": "union"}),
    "ties-union-2": ("ties", ["a"], {"tokenizer_source": "union"}),
    "linear-base": ("linear", ["base", "a", "b"], {"tokenizer_source": "base"}),
    "ties-model-b": ("ties", ["a", "b"], {"tokenizer_source": "<b>"}),
    "slerp-union-embed_slerp": ("slerp", ["a"], {"tokenizer_source": "union", "parameters": {"t": 0.3,
                                                                                              "embed_slerp": True}}),
    "linear-tokens": ("linear", ["base", "a", "b"], {"tokenizer": {
        "source": "union", "pad_to_multiple_of": 8,
        "tokens": {"<tool>": {"source": "<a>", "force": True},  # every model takes a's row
                   "<new>": {"source": {"kind": "zero"}},  # in no model: added, zero rows
                   "zz": {"source": {"kind": "model_token", "model": "<b>", "token": "q"}},  # base lacks zz
                   "qq": {"source": {"kind": "model_token", "model": "<base>", "token_id": 7}}}}}),
    "ties-tokens-base": ("ties", ["a", "b"], {"tokenizer": {
        "source": "base", "pad_to_multiple_of": 16, "tokens": {"a": {"source": "<b>", "force": True}}}}),
}


def _fill(value, zoo: dict[str, Path]):
    """Recipe values with ``<name>`` replaced by that model's path."""
    if isinstance(value, dict):
        return {_fill(k, zoo) if k.startswith("<") and k[1:-1] in zoo else k: _fill(v, zoo) for k, v in value.items()}
    if isinstance(value, str) and value.startswith("<") and value[1:-1] in zoo:
        return str(zoo[value[1:-1]])
    return value


@pytest.mark.filterwarnings("ignore:parameters.embed_slerp is ignored")
@pytest.mark.parametrize("case", CASES)
def test_equals_mergekit(case, zoo, tmp_path):
    method, models, extra = CASES[case]
    recipe = _recipe(method, zoo, models, **_fill(extra, zoo))
    source = recipe["tokenizer"].get("source", "union") if "tokenizer" in recipe else recipe["tokenizer_source"]
    non_base = {m for m in models if m != "base"}
    _assert_same(_ours(recipe, tmp_path / "ours"), _mergekit(recipe, tmp_path / "theirs"),
                 same_ids=len(non_base) <= 1 or source != "union")


def test_union_rows_and_config(zoo, tmp_path):
    """Independent of mergekit: a token only ``a`` has keeps a's row in every model; the config says the size."""
    from transformers import AutoModelForCausalLM

    recipe = _recipe("linear", zoo, ["base", "a", "b"], tokenizer={"source": "union", "pad_to_multiple_of": 8})
    out = _ours(recipe, tmp_path / "out")
    vocab = _vocab(out)
    assert {"xy", "zz", "qq", "<tool>", "<im>"} <= set(vocab)
    rows = load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows.shape[0] == 56  # 54 tokens -> x8
    a = load_file(str(zoo["a"] / "model.safetensors"))["model.embed_tokens.weight"]
    # every model's row for xy is a's (the only model with it), so any normalised linear merge returns it
    torch.testing.assert_close(rows[vocab["xy"]], a[_vocab(zoo["a"])["xy"]], rtol=0, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert model(torch.tensor([[1, vocab["<im>"], vocab["xy"]]])).logits.shape[-1] == 56


def _cli_merge(recipe: dict, tmp_path: Path) -> tuple[int, str, Path]:
    import yaml

    from dfsmerge.cli import main

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["merge", str(path), str(tmp_path / "out")])
    return rc, err.getvalue(), tmp_path / "out"


@pytest.mark.parametrize("bad", ["unknown-model", "no-tokenizer", "token-missing", "bad-token-id"])
def test_errors_are_one_line_before_output(bad, zoo, tmp_path):
    extra = {
        "unknown-model": {"tokenizer": {"tokens": {"<x>": {"source": str(tmp_path / "elsewhere")}}}},
        "no-tokenizer": {"tokenizer_source": "union"},
        "token-missing": {"tokenizer": {"tokens": {"xy": {"source": str(zoo["b"])}}}},  # b has no xy
        "bad-token-id": {"tokenizer": {"tokens": {"xy": {"source": {"kind": "model_token", "model": str(zoo["b"]),
                                                                    "token_id": 56}}}}},
    }[bad]
    models = ["a", "b"]
    if bad == "no-tokenizer":
        bare = tmp_path / "bare"
        shutil.copytree(zoo["a"], bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
        zoo = {**zoo, "bare": bare}
        models = ["bare", "b"]
    recipe = _recipe("linear", zoo, models, **extra)
    with pytest.raises(ConfigError) as err:
        _ours(recipe, tmp_path / "direct")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "direct").exists()
    rc, stderr, out = _cli_merge(recipe, tmp_path)
    assert rc == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
