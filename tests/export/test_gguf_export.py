"""GGUF export against transformers' own GGUF loader: tiny random Llama, Mistral, Qwen2, Qwen3 and Gemma 3 models
(with byte-level BPE tokenizers trained here) exported with ``format="gguf"`` read back by
``from_pretrained(dir, gguf_file=...)`` to the folded export's logits, and their tokenizers to the same ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dfsmerge.errors import ConfigError
from dfsmerge.export import export_plan
from dfsmerge.export.gguf_out import chat_template_kind
from dfsmerge.genome.plan import LayerRef, PathPlan, Step
from dfsmerge.zoo.tiny import make_tiny_checkpoint

# the tokenizers trained here are no model llama.cpp knows, so the export warns that it writes pre-tokenizer 'default'
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:.*llama.cpp's pre-tokenizer:UserWarning")]

MULTILINGUAL = "Hello world! Grüße aus Köln, ¿qué tal? Привет, мир. 東京は晴れ 🌞 12+7=19\n\tdone"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Settings both loaders read the same way (transformers' GGUF config reader fills the rest with its defaults:
# Qwen3's head_dim 128, Gemma 3's query_pre_attn_scalar 256 and every-6th-layer global attention).
FAMILIES = {
    "llama": dict(num_hidden_layers=3, head_dim=16),
    "mistral": dict(num_hidden_layers=3, sliding_window=None, head_dim=16),
    "qwen2": dict(num_hidden_layers=3, tie_word_embeddings=True),
    "qwen3": dict(num_hidden_layers=3, head_dim=128, num_attention_heads=2, num_key_value_heads=1),
    "gemma3_text": dict(num_hidden_layers=6, head_dim=256, query_pre_attn_scalar=256, num_attention_heads=2,
                        num_key_value_heads=1, sliding_window=8, final_logit_softcapping=None),
}
T = 24  # longer than the Gemma 3 window (8)


def _train_tokenizer(out: Path) -> int:
    """A byte-level BPE tokenizer (GPT-2 split, 400 tokens) with ChatML specials, saved to ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [MULTILINGUAL, "the quick brown fox jumps over the lazy dog", "Grüße, Köln, qué, мир, 東京",
              "0123456789 + - = ( ) [ ] { } hello world again and again"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(str(out))
    return tok.get_vocab_size()


def _tiny(family: str, out: Path) -> Path:
    from transformers import AutoConfig

    tok_dir = out.parent / f"{out.name}-tok"
    vocab = _train_tokenizer(tok_dir)
    base = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-6, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
    cfg = AutoConfig.for_model(family, **{**base, **FAMILIES[family]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms near identity (Gemma's w of 1 + w near 0) and small biases, not exactly
                p.copy_((0.0 if family.startswith("gemma") or name.endswith("bias") else 1.0)
                        + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    model.save_pretrained(str(out))
    for f in tok_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_sources")
    return {fam: _tiny(fam, root / fam) for fam in FAMILIES}


def _plans(family: str, src: Path) -> dict[str, PathPlan]:
    n = FAMILIES[family]["num_hidden_layers"]
    ident = PathPlan.identity("S", n, models={"S": str(src)})
    if family == "gemma3_text":  # repeat the whole 6-layer block: the attention pattern stays Gemma 3's
        order, scales = [*range(n), *range(n)], [1.0] * n + [0.8] + [1.0] * (n - 2) + [1.25]
    else:
        order, scales = [0, 1, 1, 2, 1], [1.0, 1.0, 0.7, 1.3, 1.1]
    rep = PathPlan(tuple(Step(LayerRef("S", i), s) for i, s in zip(order, scales, strict=True)),
                   models={"S": str(src)}, base="S")
    return {"identity": ident, "repeat": rep}


def _ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 300, (2, T), generator=g)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _gguf_file(out: Path) -> str:
    (f,) = [p.name for p in out.glob("*.gguf")]
    return f


def _rel(got, want) -> tuple[float, float]:
    d = (got - want).abs()
    return (d.max() / want.abs().max()).item(), d.mean().item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_reads_back_equal_to_folded(family, sources, tmp_path):
    for kind, plan in _plans(family, sources[family]).items():
        folded = export_plan(plan, tmp_path / f"{kind}-folded", format="folded", dtype="float32")
        out = export_plan(plan, tmp_path / f"{kind}-gguf", format="gguf")
        name = _gguf_file(out)
        want = _logits(AutoModelForCausalLM.from_pretrained(str(folded), dtype=torch.float32).eval(), _ids())
        back = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=name, dtype=torch.float32).eval()
        assert back.config.num_hidden_layers == len(plan.steps)
        rel, mean = _rel(_logits(back, _ids()), want)
        assert rel <= 1e-5, f"{family} {kind}: max rel {rel:.3g}, mean abs {mean:.3g}"


def test_tokenizer_and_modelfile_read_back(sources, tmp_path):
    src = sources["llama"]
    out = export_plan(_plans("llama", src)["identity"], tmp_path / "g", format="gguf")
    name = _gguf_file(out)
    hf = AutoTokenizer.from_pretrained(str(src))
    back = AutoTokenizer.from_pretrained(str(out), gguf_file=name)
    assert back(MULTILINGUAL)["input_ids"] == hf(MULTILINGUAL)["input_ids"]
    assert back.chat_template == hf.chat_template
    msgs = [{"role": "user", "content": "Grüße?"}]
    assert back.apply_chat_template(msgs, tokenize=False) == hf.apply_chat_template(msgs, tokenize=False)
    text = (out / "Modelfile").read_text()
    assert f"FROM ./{name}" in text and '<|im_start|>{{ .Role }}' in text and 'PARAMETER stop "<|im_end|>"' in text
    assert {"README.md", "mergekit.yaml", "dfsmerge_plan.yaml"} <= {p.name for p in out.iterdir()}


def test_q8_0_within_quantisation_error(sources, tmp_path):
    """q8_0 stores each block of 32 weights as int8 times one f16 scale (error <= max|w| / 254 per weight); over
    three layers the logits move by well under 5% of their range."""
    import gguf

    plan = _plans("llama", sources["llama"])["repeat"]
    folded = export_plan(plan, tmp_path / "folded", format="folded", dtype="float32")
    out = export_plan(plan, tmp_path / "q8", format="gguf", quant="q8_0")
    reader = gguf.GGUFReader(str(out / _gguf_file(out)))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    want = _logits(AutoModelForCausalLM.from_pretrained(str(folded), dtype=torch.float32).eval(), _ids())
    back = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=_gguf_file(out), dtype=torch.float32).eval()
    rel, mean = _rel(_logits(back, _ids()), want)
    assert 0 < rel <= 5e-2, f"q8_0: max rel {rel:.3g}, mean abs {mean:.3g}"


def test_unsupported_family_one_line_error_before_work(tmp_path):
    src = make_tiny_checkpoint("phi3", tmp_path / "phi3", num_layers=2, hidden=32)
    with pytest.raises(ConfigError, match=r"model_type='phi3'.*supported: llama, mistral, qwen2, qwen3") as e:
        export_plan(PathPlan.identity("S", 2, models={"S": str(src)}), tmp_path / "out", format="gguf")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_bad_quant_and_dtype(sources, tmp_path):
    plan = _plans("llama", sources["llama"])["identity"]
    with pytest.raises(ConfigError, match=r"quant='q4_k'.*f32, f16, bf16, q8_0"):
        export_plan(plan, tmp_path / "o", format="gguf", quant="q4_k")
    with pytest.raises(ConfigError, match=r"dtype='float16'.*--quant"):
        export_plan(plan, tmp_path / "o", format="gguf", dtype="float16")
    assert not (tmp_path / "o").exists()


def test_cli_export_gguf(sources, tmp_path):
    from dfsmerge.cli import main

    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(_plans("qwen2", sources["qwen2"])["repeat"].to_yaml())
    assert main(["export", "--plan", str(plan_file), "--out", str(tmp_path / "m"), "--format", "gguf",
                 "--quant", "f16"]) == 0
    assert (tmp_path / "m" / "m-f16.gguf").is_file() and (tmp_path / "m" / "Modelfile").is_file()


def test_chat_template_kinds():
    assert chat_template_kind(CHATML) == "chatml"
    assert chat_template_kind("{{ '<start_of_turn>' + role }}{{ '<end_of_turn>' }}") == "gemma"
    assert chat_template_kind("[INST] {{ m }} [/INST]") is None


def test_run_candidates_export_as_gguf(sources, tmp_path):
    """``dfsmerge export RUN --candidate best|ID --format gguf``: a DFS best and a joint candidate whose plan runs
    over its PS merge ('@ps') read back equal to their folded exports."""
    import yaml

    from dfsmerge.export import export_candidate

    a = sources["llama"]
    b = tmp_path / "B"
    model = AutoModelForCausalLM.from_pretrained(str(a), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    model.save_pretrained(str(b))
    for f in a.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (b / f.name).write_bytes(f.read_bytes())
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    dfs = {"models": {"A": str(a), "B": str(b)}, "base": "A",
           "path": [{"model": "A", "layer": 0, "scale": 1.0}, {"model": "B", "layer": 1, "scale": 1.25},
                    {"model": "A", "layer": 1, "scale": 0.8}]}
    joint = {"models": {"merged": "@ps", "B": str(b)}, "base": "merged",
             "path": [{"model": "merged", "layer": 0, "scale": 1.0}, {"model": "B", "layer": 2, "scale": 1.5},
                      {"model": "merged", "layer": 0, "scale": 0.7}]}
    ps = {"merge_method": "linear", "dtype": "float32",
          "models": [{"model": str(a), "parameters": {"weight": 0.7}},
                     {"model": str(b), "parameters": {"weight": 0.3}}]}
    rows = [{"id": 0, "generation": 0, "candidate": {"ps": None, "path": dfs}, "objectives": {"acc": 0.5}},
            {"id": 1, "generation": 0, "candidate": {"ps": ps, "path": joint}, "objectives": {"acc": 0.75}}]
    (run / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "best" / "plan.yaml").write_text(yaml.safe_dump(dfs))
    for cand in ("best", "1"):
        folded = export_candidate(run, cand, tmp_path / f"{cand}-folded", dtype="float32")
        out = export_candidate(run, cand, tmp_path / f"{cand}-gguf", format="gguf")
        want = _logits(AutoModelForCausalLM.from_pretrained(str(folded), dtype=torch.float32).eval(), _ids())
        back = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=_gguf_file(out), dtype=torch.float32).eval()
        rel, mean = _rel(_logits(back, _ids()), want)
        assert rel <= 1e-5, f"candidate {cand}: max rel {rel:.3g}, mean abs {mean:.3g}"
        assert "| acc |" in (out / "README.md").read_text()
