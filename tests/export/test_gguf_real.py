"""GGUF exports of the real SmolLM2-135M-Instruct (identity and a plan repeating layers with scales) and Gemma 3
270M, read back by transformers' GGUF loader: logits equal to the folded export (f32), and the file's tokenizer
gives the Hugging Face tokenizer's ids on a multilingual string."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dfsmerge.export import export_plan
from dfsmerge.genome.plan import LayerRef, PathPlan, Step
from dfsmerge.io.realmodels import real_model_dir

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("one_torch_thread")]
MULTILINGUAL = ("The capital of France is Paris. Grüße aus Köln! ¿Dónde está la estación? Привет, как дела? "
                "東京は今日も晴れです。 مرحبا بالعالم  नमस्ते 12 + 7 = 19\n\tdone 🚀")


def _repeat_plan(src: Path, n: int, block: list[int], scales: list[float]) -> PathPlan:
    """All ``n`` layers with ``block`` run a second time right after it, the repeats scaled."""
    order = [*range(block[-1] + 1), *block, *range(block[-1] + 1, n)]
    s = [1.0] * len(order)
    for j, sc in enumerate(scales):
        s[block[-1] + 1 + j] = sc
    return PathPlan(tuple(Step(LayerRef("S", i), x) for i, x in zip(order, s, strict=True)),
                    models={"S": str(src)}, base="S")


def _check(plan: PathPlan, src: Path, root: Path, tag: str) -> None:
    """The identity plan's folded export is the source's tensors copied unchanged, so it is compared with the source
    itself (one 1 GB export less for Gemma 3); other plans with their folded export."""
    identity = [s.layer.index for s in plan.steps] == list(range(len(plan.steps))) and set(plan.scales) == {1.0}
    folded = src if identity else export_plan(plan, root / f"{tag}-folded", format="folded", dtype="float32")
    out = export_plan(plan, root / f"{tag}-gguf", format="gguf")
    (name,) = [p.name for p in out.glob("*.gguf")]
    tok = AutoTokenizer.from_pretrained(str(src))
    ids = tok(MULTILINGUAL, return_tensors="pt").input_ids
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(str(folded), dtype=torch.float32).eval()(ids).logits
        back = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=name, dtype=torch.float32).eval()
        assert back.config.num_hidden_layers == len(plan.steps)
        got = back(ids).logits
    d = (got - want).abs()
    rel = (d.max() / want.abs().max()).item()
    assert rel <= 1e-5, f"{tag}: max rel {rel:.3g}, mean abs {d.mean().item():.3g}"
    gtok = AutoTokenizer.from_pretrained(str(out), gguf_file=name)
    assert gtok(MULTILINGUAL)["input_ids"] == tok(MULTILINGUAL)["input_ids"]
    assert gtok.chat_template == tok.chat_template


def test_smollm2_identity_and_repeat(tmp_path):
    src = real_model_dir("smollm2-135m")
    _check(PathPlan.identity("S", 30, models={"S": str(src)}), src, tmp_path, "smol-identity")
    _check(_repeat_plan(src, 30, [10, 11], [0.9, 1.1]), src, tmp_path, "smol-repeat")


def test_gemma3_identity(tmp_path):
    src = real_model_dir("gemma3-270m")
    _check(PathPlan.identity("S", 18, models={"S": str(src)}), src, tmp_path, "gemma-identity")


@pytest.mark.slow  # ~10 min on a busy 2-core machine (two 1 GB exports of a 262k-token vocabulary)
def test_gemma3_block_repeat(tmp_path):
    src = real_model_dir("gemma3-270m")
    # one whole 6-layer block (5 sliding : 1 full) run twice keeps Gemma 3's attention pattern
    _check(_repeat_plan(src, 18, list(range(6, 12)), [0.9] + [1.0] * 4 + [1.1]), src, tmp_path, "gemma-repeat")
