"""One dtype map (:mod:`dfsmerge.io.dtypes`), one tokenizer loader (:mod:`dfsmerge.io.tokenizer`), one mergekit
parameter resolver (:func:`dfsmerge.recipe.config.tensor_parameters`) and one mergekit-YAML builder
(:mod:`dfsmerge.genome.mergekit_yaml`): each checked against its reference (torch, transformers, ``dfsmerge merge``'s
plan, the export), and a scan of the package's syntax trees that no second one exists elsewhere."""

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
BUILDER_MODULE = PKG / "genome" / "mergekit_yaml.py"
RECIPE_WRITERS = {
    PKG / "genome" / "ps.py": "PSRecipe.to_mergekit, the PS recipe writing itself (the builder writes it as it is)",
    PKG / "zoo" / "layer_swap.py": "Layer Swapping's hand-made linear recipe, a baseline, not a candidate",
}
"""Files allowed a mergekit recipe dict of their own, with why."""
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


def mergekit_recipes(tree: ast.AST) -> list[int]:
    """Lines of a dict literal keyed ``merge_method`` or ``layer_range`` (a mergekit recipe or slice being built)
    and of a read of an architecture's ``residual_filters`` (what a passthrough's ``scale`` folds into)."""
    out = []
    for node in ast.walk(tree):
        keyed = isinstance(node, ast.Dict) and any(isinstance(k, ast.Constant) and k.value in ("merge_method",
                                                                                              "layer_range")
                                                   for k in node.keys)
        if keyed or (isinstance(node, ast.Attribute) and node.attr == "residual_filters"
                     and isinstance(node.ctx, ast.Load)):
            out.append(node.lineno)
    return out


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


# ------------------------------------------------------------------------------------------------ mergekit YAML
def test_no_second_mergekit_yaml_builder():
    """Outside genome/mergekit_yaml.py and the recipes that write themselves: a search's ``best/mergekit.yaml`` and
    an export's ``mergekit.yaml`` are built by it (each writer adds its own header comment)."""
    snippet = 'a = {"merge_method": "passthrough"}\nb = {"model": m, "layer_range": [0, 1]}\nc = {"model": m}\n' \
              "d = arch.residual_filters\n"
    assert mergekit_recipes(ast.parse(snippet)) == [1, 2, 4]
    assert mergekit_recipes(ast.parse(BUILDER_MODULE.read_text())), "the scan must see the builder it guards"
    assert all(mergekit_recipes(ast.parse(p.read_text())) for p in RECIPE_WRITERS), "RECIPE_WRITERS is stale"
    offenders = _scan(mergekit_recipes, BUILDER_MODULE, skip=RECIPE_WRITERS)
    assert offenders == [], f"mergekit recipes built besides genome/mergekit_yaml.py (use it): {offenders}"
    assert not (PKG / "export" / "mergekit_yaml.py").exists()
    for user in ("search/outputs.py", "export/card.py"):
        assert calls(ast.parse((PKG / user).read_text()), "passthrough"), user


def test_best_and_export_write_one_passthrough(four_layer_models, tmp_path):
    """A path's ``best/mergekit.yaml`` and the ``mergekit.yaml`` of its compact export (the same fold: ``D_k = C_k``,
    ``e = 1``) hold the same recipe; a path whose embedding is not the first slice's model gets none in ``best/``,
    with the reason."""
    import yaml

    from dfsmerge.export import export_plan
    from dfsmerge.genome.plan import PathPlan
    from dfsmerge.search.outputs import write_best

    m = four_layer_models
    path = {"models": {"A": m["a"], "B": m["b"]}, "base": "A",
            "path": [{"model": "A", "layer": 0, "scale": 1.3}, {"model": "B", "layer": 2, "scale": 0.7},
                     {"model": "B", "layer": 1, "scale": 1.0}, {"model": "A", "layer": 3, "scale": 0.9}]}
    write_best(tmp_path / "best", {"id": 0, "fitness": 0.0, "candidate": {"ps": None, "path": path}})
    best = yaml.safe_load((tmp_path / "best" / "mergekit.yaml").read_text())
    out = export_plan(PathPlan.from_dict(path), tmp_path / "out", format="compact")
    exported = list(yaml.safe_load_all((out / "mergekit.yaml").read_text()))[-1]
    assert best == exported
    assert [s["sources"][0]["parameters"]["scale"][0]["value"] for s in best["slices"]] == \
        [1 / 1.3, 1 / (1.3 * 0.7), 1 / (1.3 * 0.7), 1 / (1.3 * 0.7 * 0.9)]
    embed_b = {**path, "embed": "B"}
    write_best(tmp_path / "best_b", {"id": 0, "fitness": 0.0, "candidate": {"ps": None, "path": embed_b}})
    text = (tmp_path / "best_b" / "mergekit.yaml").read_text()
    assert "merge_method" not in text and "the embedding comes from model 'B'" in text
