"""One dtype map (:mod:`dfsmerge.io.dtypes`), one tokenizer loader (:mod:`dfsmerge.io.tokenizer`) and one mergekit
parameter resolver (:func:`dfsmerge.recipe.config.tensor_parameters`): each checked against its reference (torch,
transformers, ``dfsmerge merge``'s plan), and a scan of the package's syntax trees that no second one exists
elsewhere."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from dfsmerge.errors import ConfigError
from dfsmerge.io.dtypes import DTYPES, canonical_dtype, dtype_bytes, dtype_name, parse_dtype, torch_dtype
from dfsmerge.io.tokenizer import has_tokenizer, load_tokenizer

PKG = Path(__file__).resolve().parents[2] / "dfsmerge"
DTYPE_MODULE = PKG / "io" / "dtypes.py"
TOKENIZER_MODULE = PKG / "io" / "tokenizer.py"
RESOLVER_MODULE = PKG / "recipe" / "config.py"
NOT_YET: dict = {}
"""Files allowed a tokenizer load of their own, with why (empty once the merge lands)."""


def _is_torch_attr(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch"


def dtype_maps(tree: ast.AST) -> list[int]:
    """Lines of a dict keyed by two or more dtype names or mapping one to a torch dtype, and of a ``"torch."``
    prefix stripped off a dtype's name."""
    names, out = set(DTYPES), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
            if len(keys & names) >= 2 or (keys & names and any(_is_torch_attr(v) for v in node.values)):
                out.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "removeprefix"
              and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "torch."):
            out.append(node.lineno)
    return out


def tokenizer_loads(tree: ast.AST) -> list[int]:
    """Lines of a ``*Tokenizer*.from_pretrained`` call and of a function named ``*load_tokenizer*`` or
    ``*has_tokenizer*``."""
    out = []
    for node in ast.walk(tree):
        call = (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "from_pretrained" and isinstance(node.func.value, ast.Name)
                and "Tokenizer" in node.func.value.id)
        named = isinstance(node, ast.FunctionDef) and ("load_tokenizer" in node.name or "has_tokenizer" in node.name)
        if call or named:
            out.append(node.lineno)
    return out


def _is_len_minus_one(node: ast.AST) -> bool:
    return (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub) and isinstance(node.left, ast.Call)
            and isinstance(node.left.func, ast.Name) and node.left.func.id == "len"
            and isinstance(node.right, ast.Constant) and node.right.value == 1)


RESOLVER_NAME = re.compile(r"interp(?!reter)|resolve_parameter|evaluate_setting|tensor_parameters")


def parameter_resolvers(tree: ast.AST) -> list[int]:
    """Lines of a gradient's anchor position (``t * (len(values) - 1)``: mergekit's interpolation over layers) and
    of a function named like a parameter resolver or an interpolation (``*interp*``, ``resolve_parameter``,
    ``evaluate_setting``, ``tensor_parameters``)."""
    out = []
    for node in ast.walk(tree):
        anchor = (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult)
                  and (_is_len_minus_one(node.left) or _is_len_minus_one(node.right)))
        named = isinstance(node, ast.FunctionDef) and RESOLVER_NAME.search(node.name)
        if anchor or named:
            out.append(node.lineno)
    return out


def calls(tree: ast.AST, name: str) -> bool:
    return any(isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", None)) == name
               for n in ast.walk(tree))


def _scan(find, home: Path, skip=()) -> list[str]:
    return [f"{p.relative_to(PKG.parent)}:{line}" for p in sorted(PKG.rglob("*.py")) if p != home and p not in skip
            for line in find(ast.parse(p.read_text()))]


# ------------------------------------------------------------------------------------------------ dtypes
def test_each_dtype_name_agrees_with_torch():
    for name in DTYPES:
        dt = torch_dtype(name)
        assert isinstance(dt, torch.dtype)
        assert dtype_name(dt) == canonical_dtype(name), name
        assert dtype_bytes(name) == torch.empty((), dtype=dt).element_size(), name
        assert parse_dtype(name.upper()) is dt and parse_dtype(dt) is dt
    assert torch_dtype(None) is None and parse_dtype(None) is None and dtype_bytes("auto") == 4
    assert canonical_dtype("bf16") == "bfloat16" and canonical_dtype("int8") == "int8"
    with pytest.raises(ConfigError, match=r"dtype='int8' is not supported; use one of float32, .*bf16"):
        parse_dtype("int8")
    with pytest.raises(KeyError):
        torch_dtype("int8")


def test_no_second_dtype_map():
    """Outside io/dtypes.py (file formats' own codes, like safetensors' ``F32``, are not dtype names)."""
    snippet = 'M = {"fp16": torch.float16}\nN = {"float32": 4, "bf16": 2}\nQ = {"bf16": 1}\ns.removeprefix("torch.")'
    assert dtype_maps(ast.parse(snippet)) == [1, 2, 4]
    assert dtype_maps(ast.parse(DTYPE_MODULE.read_text())), "the scan must see the map it guards"
    offenders = _scan(dtype_maps, DTYPE_MODULE)
    assert offenders == [], f"dtype maps besides dfsmerge/io/dtypes.py (use it): {offenders}"


# ------------------------------------------------------------------------------------------------ tokenizer
def test_no_second_tokenizer_loader():
    """Outside io/tokenizer.py (building a tokenizer from a ``tokenizers`` object, as the zoo does, is not loading
    one)."""
    assert tokenizer_loads(ast.parse(TOKENIZER_MODULE.read_text())), "the scan must see the loader it guards"
    assert all(p.is_file() and tokenizer_loads(ast.parse(p.read_text())) for p in NOT_YET), "NOT_YET is stale"
    offenders = _scan(tokenizer_loads, TOKENIZER_MODULE, skip=NOT_YET)
    assert offenders == [], f"tokenizer loaders besides dfsmerge/io/tokenizer.py (use load_tokenizer): {offenders}"


def test_loader_loads_a_checkpoint_tokenizer_and_names_a_missing_one(tmp_path):
    from transformers import AutoTokenizer

    from dfsmerge.zoo.tiny import save_tiny_tokenizer

    save_tiny_tokenizer(tmp_path / "tok")
    assert has_tokenizer(tmp_path / "tok") and not has_tokenizer(tmp_path)
    got, want = load_tokenizer(tmp_path / "tok"), AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert got.get_vocab() == want.get_vocab() and got("a b?").input_ids == want("a b?").input_ids
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as e:
        load_tokenizer(tmp_path / "empty", name="zoo:math", fix="add tokenizer.json")
    msg = str(e.value)
    assert msg.startswith("model 'zoo:math' has no loadable tokenizer (") and msg.endswith("); add tokenizer.json")
    assert "\n" not in msg
    with pytest.raises(Exception) as raw:  # noqa: PT011 - without a fix, transformers' own error propagates
        load_tokenizer(tmp_path / "empty")
    assert not isinstance(raw.value, ConfigError)


# ------------------------------------------------------------------------------------------------ parameter resolver
def test_no_second_parameter_resolver():
    """Outside recipe/config.py: the PS genome's runtime merge and ``dfsmerge merge`` both call its
    ``tensor_parameters`` (the merge registry's ``resolve_params``, which checks and defaults the values of one
    merge, is another fact)."""
    snippet = "def _interp(v, t):\n    return v[int(t * (len(v) - 1))]\ndef interpreter_enabled(): ...\n"
    assert parameter_resolvers(ast.parse(snippet)) == [1, 2]
    assert parameter_resolvers(ast.parse(RESOLVER_MODULE.read_text())), "the scan must see the resolver it guards"
    offenders = _scan(parameter_resolvers, RESOLVER_MODULE)
    assert offenders == [], f"parameter resolvers besides recipe/config.py (use tensor_parameters): {offenders}"
    for user in ("genome/ps.py", "recipe/executor.py"):
        assert calls(ast.parse((PKG / user).read_text()), "tensor_parameters"), user


@pytest.fixture(scope="module")
def four_layer_models(tmp_path_factory):
    from dfsmerge.zoo.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("four_layers")
    base = make_tiny_checkpoint("llama", root / "base", seed=0, num_layers=4, hidden=32)
    return {"base": str(base), **{k: str(make_tiny_checkpoint("llama", root / k, seed=i, like=base, delta_std=0.2))
                                  for i, k in ((1, "a"), (2, "b"))}}


@pytest.mark.parametrize("kw", [
    {"merge_method": "linear", "smooth": True, "layer_granularity": 2, "filters": ("self_attn", "mlp")},
    {"merge_method": "ties", "layer_granularity": 2, "filters": ("mlp",), "base_model": "base"},
    {"merge_method": "dare_ties", "smooth": True, "layer_granularity": 1, "base_model": "base"},
    {"merge_method": "slerp", "layer_granularity": 2, "base_model": "a"},
], ids=["linear-smooth-filters", "ties-groups", "dare_ties-smooth", "slerp"])
def test_ps_recipe_parameters_are_the_merge_plans(kw, four_layer_models):
    """Every tensor's parameters as the search merges them (:meth:`PSRecipe.tensor_params`) equal the ones
    ``dfsmerge merge`` plans from the recipe's mergekit YAML: gradients, filters, groups, pre/post-layer tensors."""
    import numpy as np

    from dfsmerge.genome import PSGenome
    from dfsmerge.recipe.config import load_merge_config
    from dfsmerge.recipe.executor import open_models, plan_merge

    m = four_layer_models
    extra = {"base": m["base"]} if kw.get("base_model") == "base" else {}
    genome = PSGenome({"a": m["a"], "b": m["b"]}, num_layers=4, extra_models=extra, **kw)
    lo, hi = genome.bounds
    recipe = genome.decode(lo + (hi - lo) * np.random.default_rng(0).uniform(0.1, 0.9, genome.dim))
    config = load_merge_config(recipe.to_mergekit())
    plan = plan_merge(config, open_models(config))
    arch, cfg = plan.arch, plan.out_config
    post = set(arch.post_tensor_names(cfg))
    assert {j.out_name for j in plan.jobs} >= {f"model.layers.{i}.mlp.up_proj.weight" for i in range(4)}
    for job in plan.jobs:
        want = [dict(p) for p in job.params], dict(job.global_params)
        got = recipe.tensor_params(job.out_name, arch.layer_index(job.out_name), post=job.out_name in post)
        assert got == want, job.out_name
