"""``dfsmerge extract-lora`` against mergekit-extract-lora 0.1.5 (the oracle, run in-process) and PEFT."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from dfsmerge.cli import main as cli_main
from dfsmerge.errors import ConfigError, OutputExistsError
from dfsmerge.tools.lora import extract_lora


def _mergekit_extract(ft, base, out, rank):
    pytest.importorskip("mergekit")
    from mergekit.scripts.extract_lora import main as mk_main

    mk_main.main(["--model", str(ft), "--base-model", str(base), "--out-path", str(out), "--max-rank", str(rank)],
                 standalone_mode=False)
    return out


def _deltas(adapter_dir) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """``({module: B @ A * scaling}, {full-rank tensor: value}, config)`` of a PEFT adapter."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    sd = load_file(str(adapter_dir / "adapter_model.safetensors"))
    lora, full = {}, {}
    for k, v in sd.items():
        name = k.removeprefix("base_model.model.")
        if ".lora_A." in k:
            mod = name.split(".lora_A.")[0]
            b = sd[k.replace(".lora_A.", ".lora_B.")]
            r = cfg["rank_pattern"].get(mod, cfg["r"])
            alpha = cfg["alpha_pattern"].get(mod, cfg["lora_alpha"])
            lora[mod] = (b.double() @ v.double()) * (alpha / r)
        elif ".lora_B." not in k:
            full[name] = v
    return lora, full, cfg


@pytest.mark.parametrize(("family", "rank"), [("llama", 4), ("llama", 16), ("qwen2", 4), ("qwen2", 16)])
def test_extract_matches_mergekit(tiny_family_models, tmp_path, family, rank, one_torch_thread):
    m = tiny_family_models[family]
    ref = _mergekit_extract(m["ft1"], m["base"], tmp_path / "mk", rank)
    ours = extract_lora(m["ft1"], m["base"], tmp_path / "ours", rank=rank, progress=False)
    ref_lora, ref_full, ref_cfg = _deltas(ref)
    our_lora, our_full, our_cfg = _deltas(ours)
    assert sorted(our_lora) == sorted(ref_lora)
    worst = 0.0
    for mod, want in ref_lora.items():
        rel = float((our_lora[mod] - want).norm() / want.norm())
        worst = max(worst, rel)
        assert rel < 1e-4, f"{mod}: relative error {rel:.2e} (max abs {float((our_lora[mod] - want).abs().max()):.2e})"
    assert worst < 1e-4
    assert sorted(our_full) == sorted(ref_full)
    for k, v in ref_full.items():
        torch.testing.assert_close(our_full[k], v, rtol=0, atol=0)
    ref_bias = {k: v for k, v in load_file(str(ref / "adapter_model.safetensors")).items() if k.endswith("B.bias")}
    our_sd = load_file(str(ours / "adapter_model.safetensors"))
    for k, v in ref_bias.items():
        torch.testing.assert_close(our_sd[k], v, rtol=0, atol=1e-7)
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "peft_type"):
        assert our_cfg[key] == ref_cfg[key], key
    assert sorted(our_cfg["target_modules"]) == sorted(ref_cfg["target_modules"])
    assert sorted(our_cfg["modules_to_save"]) == sorted(ref_cfg["modules_to_save"])


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_peft_loads_and_full_rank_reproduces_finetune(tiny_family_models, tmp_path, one_torch_thread):
    """At full rank (32 = the smaller side of every matrix) base + adapter is the fine-tune itself (llama has no
    biases); at rank 4 PEFT loads every tensor and lands between base and fine-tune."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    m = tiny_family_models["llama"]
    ids = torch.randint(5, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    ft_logits = _logits(AutoModelForCausalLM.from_pretrained(str(m["ft1"]), dtype=torch.float32), ids)
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(str(m["base"]), dtype=torch.float32), ids)
    errs = {}
    for rank in (4, 32):
        out = extract_lora(m["ft1"], m["base"], tmp_path / f"r{rank}", rank=rank, progress=False)
        base = AutoModelForCausalLM.from_pretrained(str(m["base"]), dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # a missing or unexpected key is a UserWarning in PEFT
            model = peft.PeftModel.from_pretrained(base, str(out))
        errs[rank] = float((_logits(model, ids) - ft_logits).abs().max())
    base_err = float((base_logits - ft_logits).abs().max())
    assert errs[32] < 1e-4, errs
    assert errs[4] < base_err, (errs, base_err)


def test_bad_inputs_fail_before_work(tiny_family_models, tmp_path):
    m = tiny_family_models["llama"]
    with pytest.raises(ConfigError, match="rank=0"):
        extract_lora(m["ft1"], m["base"], tmp_path / "a", rank=0)
    with pytest.raises(ConfigError, match="exclude regex"):
        extract_lora(m["ft1"], m["base"], tmp_path / "a", rank=4, exclude=["("])
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError):
        extract_lora(m["ft1"], m["base"], tmp_path / "exists", rank=4)
    assert not (tmp_path / "a").exists()


def test_cli_extract_lora(tiny_family_models, tmp_path, capsys, one_torch_thread):
    m = tiny_family_models["llama"]
    out = tmp_path / "ad"
    assert cli_main(["extract-lora", str(m["ft1"]), str(m["base"]), str(out), "--rank", "8", "--quiet",
                     "-e", "mlp"]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and "gate_proj" not in cfg["target_modules"] and "q_proj" in cfg["target_modules"]
    assert cli_main(["extract-lora", str(m["ft1"]), str(m["base"]), str(out), "--rank", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "OutputExistsError" in err[0]
