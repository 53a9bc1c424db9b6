"""The tiny zoo: what zoo.json describes exists, loads in vanilla transformers, follows the task definitions,
and is reproducible and resolvable."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dfsmerge.errors import CheckpointError, ConfigError, OutputExistsError
from dfsmerge.zoo import COMBINED_TASK, build_zoo, default_zoo_dir, load_zoo, resolve_zoo_model
from dfsmerge.zoo.build import FORMAT_VERSION
from dfsmerge.zoo.tasks import B_DIGITS, B_TOKEN_IDS, Sample, read_jsonl
from dfsmerge.zoo.train import exact_match, make_batch

B_TO_E = {b: str(i) for i, b in enumerate(B_DIGITS)}


def _to_e(s: str) -> str:
    return "".join(B_TO_E.get(c, c) for c in s)


def _reference_answer(prompt: str) -> str:
    """Answer of a zoo prompt in E digits, from the task definitions (written independently of the zoo)."""
    body = _to_e(prompt[1:-1])
    if prompt[0] == "M":
        op = "+" if "+" in body else "-"
        a, b = (int(x[::-1]) for x in body.split(op))  # operands are written least-significant digit first
        r = (a + b) % 100 if op == "+" else (a - b) % 100
        return f"{r:02d}"[::-1]
    return {"C": body, "R": body[::-1], "S": "".join(sorted(body)),
            "N": "".join(str((int(c) + 1) % 10) for c in body)}[prompt[0]]


def _lang(s: str) -> str:
    digits = [c for c in s if c.isdigit() or c in B_TO_E]
    if all(c.isdigit() for c in digits):
        return "E"
    return "B" if all(c in B_TO_E for c in digits) else "X"


def test_zoo_json_describes_what_is_on_disk(tiny_zoo):
    meta = json.loads((tiny_zoo.root / "zoo.json").read_text())
    assert {"base", "math", "language"} <= set(meta["models"])
    assert meta["models"]["base"]["role"] == "base"
    for m in meta["models"].values():
        d = tiny_zoo.root / m["path"]
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (d / f).is_file(), d / f
    assert [n for n, t in meta["tasks"].items() if t["combined"]] == [COMBINED_TASK] == [meta["combined_task"]]
    for name, t in meta["tasks"].items():
        assert (tiny_zoo.root / t["yaml"]).is_file()
        assert set(t["data_files"]) == {"train", "validation", "test"}
        for split, rel in t["data_files"].items():
            rows = read_jsonl(tiny_zoo.root / rel)
            assert len(rows) == t["sizes"][split] > 0, (name, split)
    assert set(meta["metrics"]) == set(meta["models"])


def test_checkpoints_load_with_auto_classes_and_tokenize_as_in_training(tiny_zoo):
    for name in ("base", "math", "language"):
        path = tiny_zoo.model_path(name)
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        assert model.config.model_type == "llama"
        assert model.config.vocab_size == len(tok)
        for task in tiny_zoo.tasks.values():
            samples = read_jsonl(task.data_files["test"])[:5]
            ids, _ = make_batch(samples)
            for b, s in enumerate(samples):
                want = tok(s.prompt + s.answer).input_ids + [tok.eos_token_id]
                assert ids[b, :len(want)].tolist() == want
                assert tok.decode(tok(s.answer, add_special_tokens=False).input_ids) == s.answer


def test_task_answers_follow_the_definitions(tiny_zoo):
    langs = {"zoo_math_e": ("E", "E"), "zoo_lang_b": ("B", "B"), "zoo_math_b": ("B", "E"),
             "zoo_math_bb": ("B", "B"), "zoo_generic_e": ("E", "E"), "zoo_read_b": ("B", "E")}
    for name, task in tiny_zoo.tasks.items():
        for split, path in task.data_files.items():
            for s in read_jsonl(path):
                assert _to_e(s.answer) == _reference_answer(s.prompt), (name, split, s)
                assert (_lang(s.prompt), _lang(s.answer)) == langs[name], (name, s)


def test_splits_are_disjoint_and_shared_across_languages(tiny_zoo):
    keys = {n: {sp: [_to_e(s.prompt) for s in read_jsonl(p)] for sp, p in t.data_files.items()}
            for n, t in tiny_zoo.tasks.items()}
    for name, by_split in keys.items():
        sets = {sp: set(v) for sp, v in by_split.items()}
        assert not sets["test"] & sets["validation"], name
        assert not (sets["test"] | sets["validation"]) & sets["train"], name
    for split in ("train", "validation", "test"):
        assert keys["zoo_math_e"][split] == keys["zoo_math_b"][split] == keys["zoo_math_bb"][split]
        assert keys["zoo_lang_b"][split] == keys["zoo_generic_e"][split] == keys["zoo_read_b"][split]
    assert sum(len(v) for v in keys["zoo_math_e"].values()) == 20000


def test_experts_change_what_the_recipe_says(tiny_zoo):
    w = {n: load_file(tiny_zoo.model_path(n) / "model.safetensors") for n in ("base", "math", "language")}
    emb = "model.embed_tokens.weight"
    assert torch.equal(w["math"][emb], w["base"][emb])  # math expert: embeddings frozen
    changed_rows = (w["language"][emb] != w["base"][emb]).any(dim=1).nonzero().flatten().tolist()
    assert changed_rows == sorted(B_TOKEN_IDS)  # language phase 1 trains only the B-digit rows
    for name in ("math", "language"):  # both experts move the blocks and the head: their changes overlap
        assert not torch.equal(w[name]["lm_head.weight"], w["base"]["lm_head.weight"])
        assert not torch.equal(w[name]["model.layers.0.mlp.down_proj.weight"],
                               w["base"]["model.layers.0.mlp.down_proj.weight"])


def _greedy(model, prompt: str, max_new: int = 8) -> list[int]:
    ids = [1] + [int(i) for i in make_batch([Sample(prompt, "")])[0][0, 1:-1]]
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == model.config.eos_token_id:
                break
    return out


def test_teacher_forced_exact_match_equals_greedy(tiny_zoo):
    """exact_match(prompt, a) is True iff greedy decoding from the prompt emits a then </s>: checked for every
    prefix of the greedy output of a model with a noisy head (so outputs are varied and of varied length)."""
    from collections import Counter

    from dfsmerge.zoo.tasks import VOCAB

    model = AutoModelForCausalLM.from_pretrained(tiny_zoo.model_path("language")).eval()
    prompts = [s.prompt for t in tiny_zoo.tasks.values() for s in read_jsonl(t.data_files["test"])[:4]]
    gen = torch.Generator().manual_seed(0)
    W = model.lm_head.weight  # (V, D)
    with torch.no_grad():
        W.copy_(torch.randn(W.shape, generator=gen))
        W[[0, 1, 3]] = -4 * W[4:].mean(0)  # <pad>, <s>, <unk>: never chosen
        later = Counter(i for p in prompts for i in _greedy(model, p, max_new=10)[2:]).most_common(1)[0][0]
        W[2] = W[later] + 0.5 * torch.randn(W.shape[1], generator=gen)  # </s> competes with a common symbol
    eos = model.config.eos_token_id
    samples, expect = [], []
    for p in prompts:
        out = _greedy(model, p, max_new=10)
        for k in range(len(out)):
            if any(i < 4 for i in out[:k]):
                break  # specials cannot be written in an answer string
            samples.append(Sample(p, "".join(VOCAB[i] for i in out[:k])))
            expect.append(out[k] == eos)
    assert sum(expect) >= 3 and len(expect) - sum(expect) >= 3, "too few cases of either kind; pick another seed"
    assert exact_match(model, samples).tolist() == expect


def test_reuse_and_conflicts(tiny_zoo):
    marker = tiny_zoo.root / "BUILD_COMPLETE.json"
    before = marker.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = build_zoo(tiny_zoo.root, size="tiny", seed=0, progress=False)
    assert time.perf_counter() - t0 < 2.0 and marker.stat().st_mtime_ns == before
    assert again.checksums() == tiny_zoo.checksums()
    with pytest.raises(OutputExistsError, match="seed"):
        build_zoo(tiny_zoo.root, size="tiny", seed=1, progress=False)
    with pytest.raises(ConfigError, match="size"):
        build_zoo(tiny_zoo.root, size="huge")


def test_foreign_directory_is_not_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="force"):
        build_zoo(tmp_path, size="tiny", progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(CheckpointError, match="build_zoo"):
        load_zoo(tmp_path)


def test_resolution_builds_a_missing_zoo_with_identical_checksums(tiny_zoo, tmp_path, monkeypatch):
    """zoo: references resolve against $DFSMERGE_ZOO; a missing zoo is built, byte-identical for the seed."""
    target = tmp_path / "env-zoo"
    monkeypatch.setenv("DFSMERGE_ZOO", str(target))
    assert default_zoo_dir("tiny", 0) == target
    path = resolve_zoo_model("zoo:math", size="tiny", seed=0, progress=False)  # trains on the caller's 1 thread
    assert path == target.resolve() / "models" / "math"
    assert load_zoo(target).checksums() == tiny_zoo.checksums()
    assert resolve_zoo_model("zoo:language", tiny_zoo.root) == tiny_zoo.root / "models" / "language"
    for bad in ("math", "zoo:", "zoo:nope"):
        with pytest.raises(ConfigError):
            resolve_zoo_model(bad, tiny_zoo.root)


def test_default_dir_without_env(monkeypatch, tmp_path):
    monkeypatch.delenv("DFSMERGE_ZOO", raising=False)
    monkeypatch.delenv("DFSMERGE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_zoo_dir("tiny", 3) == tmp_path / ".cache" / "dfsmerge" / "zoo" / f"tiny-seed3-v{FORMAT_VERSION}"
    monkeypatch.setenv("DFSMERGE_CACHE", str(tmp_path / "elsewhere"))  # the one cache setting moves the zoo too
    assert default_zoo_dir("tiny", 3) == tmp_path / "elsewhere" / "zoo" / f"tiny-seed3-v{FORMAT_VERSION}"


def test_moved_zoo_points_its_tasks_at_the_new_place(tiny_zoo, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(tiny_zoo.root, moved)
    zoo = load_zoo(moved)
    text = zoo.tasks[COMBINED_TASK].yaml.read_text()
    assert str(moved.resolve() / "data") in text and str(tiny_zoo.root) not in text


@pytest.mark.slow
@pytest.mark.integration
def test_default_zoo_has_the_round5_shape():
    """The default zoo (minutes to build; reused from the default location) has the shape of
    dfsmerge/zoo/NOTES.md: no source solves the combined task, each expert masters its own skill."""
    zoo = build_zoo(default_zoo_dir("default", 0), size="default", seed=0)
    m = zoo.metrics
    for name in ("base", "math", "language"):
        assert m[name][f"{COMBINED_TASK}/test"] <= 1.5, (name, m[name])
    assert m["math"]["zoo_math_e/test"] >= 98.0
    assert m["language"]["zoo_lang_b/test"] >= 85.0  # 90.1 / 89.2 for seeds 0 / 1 (phase 2 trains 3 of 4 layers)
    assert m["base"]["zoo_generic_e/test"] >= 98.0


@pytest.mark.parametrize("trainable", ["b_rows", "b_rows_l0", "no_embed", "blocks", "blocks:1-1+head",
                                       "b_rows+blocks:0-0+head"])
@pytest.mark.parametrize("noise", [0.0, 0.4])
def test_phase_trains_only_what_it_names(trainable, noise):
    import numpy as np
    from transformers import LlamaForCausalLM

    from dfsmerge.zoo.tasks import math_splits
    from dfsmerge.zoo.train import ModelShape, Phase, llama_config, train_phase

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(ModelShape(num_layers=2, hidden=16, intermediate=32, heads=2)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_phase(model, Phase("p", "lang1", 3, 1e-2, trainable, 1, weight_noise=noise), seed=0, batch_size=8,
                math_train=math_splits(0)["train"], heldout=set())
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    emb = "model.embed_tokens.weight"
    layer = {i: {k for k in before if k.startswith(f"model.layers.{i}.")} for i in (0, 1)}
    head = {"model.norm.weight", "lm_head.weight"}
    expected = {"b_rows": {emb}, "b_rows_l0": {emb} | layer[0], "no_embed": set(before) - {emb},
                "blocks": layer[0] | layer[1], "blocks:1-1+head": layer[1] | head,
                "b_rows+blocks:0-0+head": {emb} | layer[0] | head}[trainable]
    assert moved == expected, sorted(moved ^ expected)  # weight noise never leaks into a frozen tensor
    if emb in expected:
        rows = (model.state_dict()[emb] != before[emb]).any(dim=1).nonzero().flatten().tolist()
        assert rows == sorted(B_TOKEN_IDS) and np.all(np.diff(rows) == 1)


def test_embedding_lr_scale_and_weight_noise_change_the_training():
    """embed_lr_scale=0 freezes the B rows while layer 0 still trains; weight noise changes the weights reached
    (a gradient taken at perturbed weights) but is deterministic for a seed."""
    from transformers import LlamaForCausalLM

    from dfsmerge.zoo.tasks import math_splits
    from dfsmerge.zoo.train import ModelShape, Phase, llama_config, train_phase

    def run(**kw):
        torch.manual_seed(0)
        model = LlamaForCausalLM(llama_config(ModelShape(num_layers=2, hidden=16, intermediate=32, heads=2)))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        train_phase(model, Phase("p", "lang1", 4, 1e-2, "b_rows_l0", 1, **kw), seed=0, batch_size=8,
                    math_train=math_splits(0)["train"], heldout=set())
        return before, model.state_dict()

    before, after = run(embed_lr_scale=0.0)
    emb, q0 = "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(after[emb], before[emb]) and not torch.equal(after[q0], before[q0])
    _, plain = run()
    _, noisy = run(weight_noise=0.3)
    _, noisy2 = run(weight_noise=0.3)
    assert not torch.equal(plain[q0], noisy[q0])
    assert all(torch.equal(noisy[k], noisy2[k]) for k in noisy)


@pytest.mark.parametrize("bad", ["blocks:2-3", "blocks:1", "head+mlp", "blocks:1-0"])
def test_bad_trainable_names_the_fix(bad):
    from dfsmerge.zoo.train import _parse_trainable

    with pytest.raises(ValueError, match="trainable="):
        _parse_trainable(bad, 2)
