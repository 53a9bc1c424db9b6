"""How close base + extracted LoRA adapter gets to the fine-tune's logits as the rank grows.

Builds a tiny random Llama base (hidden 128, 4 layers) and two fine-tunes of it: "low-rank" (every matrix moved
by a rank-8 update plus 1% full-rank noise, the shape real fine-tune deltas tend to have) and "full-rank" (Gaussian
noise on every weight, the worst case for a low-rank adapter). For each rank, `dfsmerge extract-lora` writes an
adapter, PEFT loads it onto the base, and the logits on random token sequences are compared with the fine-tune's:
relative error ||z_adapter - z_ft|| / ||z_base - z_ft|| (1 = no better than the base, 0 = exact), KL(ft || adapter)
of the next-token distributions, and the top-1 agreement with the fine-tune.

    python benchmarks/extract_lora.py [--ranks 1,2,4,8,16,32,64,128] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

HIDDEN, LAYERS, TRUE_RANK = 128, 4, 8


def make_models(root: Path) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    from dfsmerge.zoo.tiny import make_tiny_checkpoint, save_tiny_tokenizer

    base = make_tiny_checkpoint("llama", root / "base", seed=0, num_layers=LAYERS, hidden=HIDDEN)
    full = make_tiny_checkpoint("llama", root / "full-rank", seed=1, like=base, delta_std=0.1)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name and "lm_head" not in name:
                scale = float(p.std())
                u = torch.randn(p.shape[0], TRUE_RANK, generator=g)
                v = torch.randn(TRUE_RANK, p.shape[1], generator=g)
                p.add_(0.3 * scale * (u @ v) / TRUE_RANK**0.5 + 0.01 * scale * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(root / "low-rank"))
    save_tiny_tokenizer(root / "low-rank")
    return {"base": base, "low-rank": root / "low-rank", "full-rank": full}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dfsmerge.tools.lora import extract_lora

    torch.set_num_threads(1)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="dfsmerge-lora-"))
    models = make_models(root)
    ids = torch.randint(5, 45, (8, 64), generator=torch.Generator().manual_seed(0))

    def logits(model):
        with torch.no_grad():
            return model(ids).logits.double()

    base_z = logits(AutoModelForCausalLM.from_pretrained(str(models["base"]), dtype=torch.float32))
    print(f"tiny llama, hidden {HIDDEN}, {LAYERS} layers, 8 x 64 tokens; rel = ||z - z_ft|| / ||z_base - z_ft||")
    print("| fine-tune | rank | rel. logit error | KL(ft || adapter) | top-1 agreement | extract s | adapter MB |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("low-rank", "full-rank"):
        ft_z = logits(AutoModelForCausalLM.from_pretrained(str(models[kind]), dtype=torch.float32))
        ref = float((base_z - ft_z).norm())
        p_ft = ft_z.log_softmax(-1)
        rows = [("base", base_z, 0.0, 0.0)]
        for rank in [int(r) for r in args.ranks.split(",")]:
            out = root / f"{kind}-r{rank}"
            t = time.perf_counter()
            extract_lora(models[kind], models["base"], out, rank=rank, progress=False, force=True)
            dt = time.perf_counter() - t
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                base = AutoModelForCausalLM.from_pretrained(str(models["base"]), dtype=torch.float32)
                z = logits(PeftModel.from_pretrained(base, str(out)))
            mb = (out / "adapter_model.safetensors").stat().st_size / 1e6
            rows.append((str(rank), z, dt, mb))
        for label, z, dt, mb in rows:
            kl = float((p_ft.exp() * (p_ft - z.log_softmax(-1))).sum(-1).mean())
            top1 = float((z.argmax(-1) == ft_z.argmax(-1)).double().mean())
            rel = float((z - ft_z).norm()) / ref
            extra = "- | -" if label == "base" else f"{dt:.2f} | {mb:.2f}"
            print(f"| {kind} | {label} | {rel:.4f} | {kl:.5f} | {top1:.3f} | {extra} |")
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
