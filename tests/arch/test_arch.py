"""Layouts read from transformers agree with real checkpoints; every supported family declares its facts."""

from __future__ import annotations

import fnmatch
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from dfsmerge.arch import attention_types, get_architecture, hf_config, layout_reader, supported_model_types
from dfsmerge.arch.families import FAMILIES as FACTS
from dfsmerge.errors import ArchitectureError
from dfsmerge.io import open_checkpoint
from dfsmerge.zoo.tiny import FAMILIES, tiny_config


def _stored_names(path) -> set[str]:
    names: set[str] = set()
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            names |= set(sf.keys())
    return names


def test_every_family_has_facts_and_tiny_checkpoints():
    assert set(FAMILIES) == set(FACTS), f"facts without tiny checkpoints or the reverse: {set(FAMILIES) ^ set(FACTS)}"
    assert supported_model_types() == tuple(sorted(FACTS))


@pytest.mark.parametrize("family", FAMILIES)
def test_declared_facts_name_tensors_the_family_has(family):
    """A residual or expert entry that matches no tensor (a typo, a renamed module) fails here."""
    facts = FACTS[family]
    config = tiny_config(family, num_layers=2, hidden=32).to_dict()
    if facts.dense_layers_key:  # an MoE family with a dense layer too
        config[facts.dense_layers_key] = [1]
    arch = get_architecture(config)
    layer = [t.removeprefix(arch.layer_prefix) for t in arch.layer_templates + arch.optional_layer_templates]
    for pattern in facts.residual + facts.experts:
        assert any(t == pattern or fnmatch.fnmatchcase(t, pattern + ".*") for t in layer), \
            f"{family}: {pattern!r} matches no tensor"
    assert (facts.residual_kind is None) == (not facts.residual), f"{family}: residual_kind and residual disagree"
    for kind in (facts.residual_kind,) if facts.residual_kind == "norm" else ():
        assert all("norm" in t for t in arch.residual_outputs), f"{family}: {kind} residuals must be norms"


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_matches_the_saved_checkpoint(family, tiny_family_models):
    """The names read from transformers on meta are exactly what ``save_pretrained`` wrote."""
    path = tiny_family_models[family]["base"]
    config = json.loads((path / "config.json").read_text())
    arch = get_architecture(config)
    want = _stored_names(path)
    got = arch.all_tensor_names(config)
    assert len(got) == len(set(got)), "a tensor is listed twice"
    # converted families (fused MoE experts, GPT-NeoX's head) name the model layout; the checkpoint stores sources
    stored = {s for n in got for s in arch.checkpoint_sources.get(n, (n,))}
    assert stored == want, f"discovered vs stored differ: {sorted(stored ^ want)}"
    assert arch.converted == bool(arch.checkpoint_sources)
    assert arch.num_layers(config) == 2


@pytest.mark.parametrize("family", [f for f in FAMILIES if FACTS[f].experts or f == "gpt_neox"])
def test_layout_reader_gives_transformers_own_tensors(family, tiny_family_models):
    """A converted family's checkpoint, read in the model layout, equals what transformers' loader builds."""
    path = tiny_family_models[family]["ft1"]
    reader = layout_reader(open_checkpoint(path))
    want = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).state_dict()
    assert get_architecture(reader.config).converted
    names = reader.keys()
    assert names
    for name in names:
        assert reader.get_shape(name) == tuple(want[name].shape), name
        assert torch.equal(reader.get_tensor(name), want[name]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_types_are_transformers_own(family):
    cfg = tiny_config(family, num_layers=4, hidden=32)
    arch = get_architecture(cfg.to_dict())
    want = list(getattr(cfg, "layer_types", None) or [])
    if want:
        assert list(arch.attention_types) == want
    else:  # families without layer_types pick the mask on sliding_window alone (see their model's forward)
        kind = "sliding_attention" if getattr(cfg, "sliding_window", None) is not None else "full_attention"
        assert list(arch.attention_types) == [kind] * 4


def test_qwen2_use_sliding_window_follows_max_window_layers():
    """The bug of the old export: a raw config.json with use_sliding_window and no layer_types."""
    raw = tiny_config("qwen2", num_layers=4, hidden=32).to_dict()
    raw.pop("layer_types", None)
    raw.update(use_sliding_window=True, sliding_window=8, max_window_layers=2)
    want = hf_config(raw).layer_types
    assert want == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    assert list(get_architecture(raw).attention_types) == want
    assert attention_types(hf_config(raw)) == want


@pytest.mark.parametrize("model_type", ["mamba", "qwen3_next", "jamba", "no_such_family"])
def test_unsupported_family_is_one_line_naming_the_supported(model_type):
    with pytest.raises(ArchitectureError) as err:
        get_architecture({"model_type": model_type, "num_hidden_layers": 2})
    msg = str(err.value)
    assert "\n" not in msg and repr(model_type) in msg and "gemma3_text" in msg and "llama" in msg


def test_missing_model_type_is_named():
    with pytest.raises(ArchitectureError, match="no model_type"):
        get_architecture({"num_hidden_layers": 2}, source="m")


def test_gemma3_layout():
    """The real-model target's layout: q/k norms, post-norms folded as 1 + w, two rotary bases, tied head."""
    cfg = tiny_config("gemma3_text", num_layers=6, hidden=32)
    arch = get_architecture(cfg.to_dict())
    assert arch.rotary_takes_type and arch.residual_kind == "norm" and arch.norm_offset == 1.0
    assert "model.layers.{}.self_attn.q_norm.weight" in arch.layer_templates
    assert arch.residual_outputs == ("model.layers.{}.post_attention_layernorm.weight",
                                     "model.layers.{}.post_feedforward_layernorm.weight")
    assert list(arch.attention_types) == cfg.layer_types
    assert set(cfg.layer_types) == {"sliding_attention", "full_attention"}
