"""LoRA extraction: a fine-tune's difference from its base as a PEFT LoRA adapter (what ``mergekit-extract-lora``
does).

For every linear (and, with ``embed_lora``, embedding) module the task vector ``delta = W_ft - W_base`` is
factored by a truncated SVD, ``delta ≈ U_r diag(s_r) V_r^T`` (Eckart-Young: the best rank-r approximation in
Frobenius norm), and stored as ``lora_A = diag(sqrt s_r) V_r^T`` and ``lora_B = U_r diag(sqrt s_r)`` with
``lora_alpha = r`` so PEFT's scaling is 1 and ``B @ A`` is the approximation itself. Embeddings and the output head
are saved at full rank in ``modules_to_save`` unless ``embed_lora``; modules that are neither linear nor embedding
(norms) are saved at full rank too, or skipped with ``skip_undecomposable``. Tensors are read one at a time, so
memory stays near one module's matrices plus the (small) adapter.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dfsmerge.errors import CheckpointError, ConfigError, OutputExistsError


@dataclass(frozen=True, slots=True)
class _Module:
    name: str          # module path, e.g. "model.layers.0.self_attn.q_proj"
    kind: str          # "lora" | "embedding" | "full"
    has_bias: bool


def _plan_modules(model_dir: Path, *, embed_lora: bool, modules_to_save: list[str],
                  include: Sequence[str], exclude: Sequence[str], skip_undecomposable: bool) -> list[_Module]:
    """Which modules to decompose and which to save at full rank, from a meta-device build of the model (module
    types come from the model class, not from names). ``modules_to_save`` grows in place as mergekit's does."""
    import torch.nn as nn
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    embed_in, embed_out = model.get_input_embeddings(), model.get_output_embeddings()

    def wanted(name: str) -> bool:
        if include and not any(re.search(r, name) for r in include):
            return False
        return not any(re.search(r, name) for r in exclude)

    plan = []
    for name, module in model.named_modules():
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        key = name.split(".")[-1]
        has_bias = isinstance(getattr(module, "bias", None), torch.Tensor)
        is_embed = module is embed_in or module is embed_out or isinstance(module, nn.Embedding)
        if not embed_lora and is_embed and not any(re.search(r, name) for r in exclude) \
                and key not in modules_to_save:
            modules_to_save.append(key)
        if name in modules_to_save or key in modules_to_save:
            plan.append(_Module(name, "full", has_bias))
        elif wanted(name):
            if isinstance(module, nn.Linear):
                plan.append(_Module(name, "lora", has_bias))
            elif isinstance(module, nn.Embedding):
                plan.append(_Module(name, "embedding", has_bias))
            elif not skip_undecomposable:
                if key not in modules_to_save:
                    modules_to_save.append(key)
                plan.append(_Module(name, "full", has_bias))
    return plan


def decompose(delta: torch.Tensor, rank: int, *, distribute_scale: bool = True,
              sv_epsilon: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of ``delta`` (out, in) as LoRA factors ``A`` (r, in) and ``B`` (out, r), ``B @ A ≈ delta``.

    Args:
        rank: the largest rank kept (capped at ``min(out, in)``).
        distribute_scale: split the singular values as ``sqrt(s)`` between A and B (else all into A).
        sv_epsilon: also drop singular values not above this threshold.
    Returns:
        ``(A, B)`` in ``delta``'s dtype, computed in fp32.
    """
    u, s, vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)  # (o, k), (k,), (k, i)
    r = min(rank, s.shape[0])
    if sv_epsilon > 0:
        r = min(int((s > sv_epsilon).sum()), r)
    if distribute_scale:
        root = s[:r].sqrt()
        a, b = root[:, None] * vh[:r], u[:, :r] * root[None, :]  # (r, i), (o, r)
    else:
        a, b = s[:r, None] * vh[:r], u[:, :r]
    return a.to(delta.dtype), b.to(delta.dtype)


def extract_lora(finetuned: str | Path, base: str | Path, out: str | Path, *, rank: int,
                 exclude: Iterable[str] = (), include: Iterable[str] = (), modules_to_save: Iterable[str] = (),
                 embed_lora: bool = False, distribute_scale: bool = True, sv_epsilon: float = 0.0,
                 skip_undecomposable: bool = False, lora_bias: bool = False, device: str = "cpu",
                 allow_pickle: bool = False, force: bool = False, progress: bool = True) -> Path:
    """Extract a PEFT LoRA adapter of ``finetuned`` relative to ``base`` into ``out``.

    Args:
        finetuned, base: checkpoint directories or hub ids of one architecture.
        rank: largest LoRA rank (``--rank``); modules whose delta has lower rank get it in ``rank_pattern``.
        exclude / include: regexes over module names to skip / to restrict extraction to.
        modules_to_save: module names (or their last component) saved at full rank.
        embed_lora: decompose embeddings too (mergekit's ``--embed-lora``) instead of saving them at full rank.
        lora_bias: set PEFT's ``lora_bias`` so the bias deltas (``lora_B.bias``, written either way, as mergekit
            does) are applied when loaded; PEFT then cannot merge modules whose base layer has no bias. Off by
            default, as in mergekit, so PEFT ignores the bias deltas.
    Returns:
        The adapter directory (``adapter_config.json``, ``adapter_model.safetensors``, ``README.md``).
    Raises:
        ConfigError: bad rank or regex. CheckpointError: unreadable models or mismatched shapes.
        OutputExistsError: ``out`` exists and ``force`` is False.
    """
    from dfsmerge.io import open_checkpoint

    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank={rank!r} is not a positive integer; pass --rank 16 (or another rank >= 1)")
    exclude, include = list(exclude), list(include)
    for field, pats in (("exclude", exclude), ("include", include)):
        for p in pats:
            try:
                re.compile(p)
            except re.error as e:
                raise ConfigError(f"{field} regex {p!r} is invalid ({e}); fix the pattern") from None
    out = Path(out).expanduser().resolve()
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists; choose another path or pass --force to replace it")
    ft = open_checkpoint(finetuned, allow_pickle=allow_pickle)
    bs = open_checkpoint(base, allow_pickle=allow_pickle)
    saved = list(modules_to_save)
    if ft.config.get("vocab_size") != bs.config.get("vocab_size"):
        embed_lora = False  # a delta of embeddings needs one vocabulary: saved at full rank, as mergekit does
    plan = _plan_modules(ft.path, embed_lora=embed_lora, modules_to_save=saved, include=include,
                         exclude=exclude, skip_undecomposable=skip_undecomposable)
    for m in plan:  # shapes checked before any SVD
        if m.kind != "full" and f"{m.name}.weight" in ft and f"{m.name}.weight" in bs:
            a, b = ft.get_shape(f"{m.name}.weight"), bs.get_shape(f"{m.name}.weight")
            if a != b:
                raise CheckpointError(f"{m.name}.weight has shape {a} in {ft.name!r} but {b} in base {bs.name!r}; "
                                      "extract only between a fine-tune and its own base")

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    it = plan
    if progress:
        from tqdm import tqdm
        it = tqdm(plan, desc="extract-lora", unit="module")
    for m in it:
        w = f"{m.name}.weight"
        if w not in ft:  # tied output head: nothing stored, nothing to save
            continue
        if m.kind == "full":
            tensors[f"base_model.model.{w}"] = ft.get_tensor(w)
            if m.has_bias and f"{m.name}.bias" in ft:
                tensors[f"base_model.model.{m.name}.bias"] = ft.get_tensor(f"{m.name}.bias")
            continue
        tv = ft.get_tensor(w).to(device) - bs.get_tensor(w).to(device)
        if m.kind == "embedding":  # PEFT stores embedding factors transposed: delta^T = B @ A
            a, b = decompose(tv.T, rank, distribute_scale=distribute_scale, sv_epsilon=sv_epsilon)
            tensors[f"base_model.model.{m.name}.lora_embedding_A"] = a.cpu()
            tensors[f"base_model.model.{m.name}.lora_embedding_B"] = b.cpu()
        else:
            a, b = decompose(tv, rank, distribute_scale=distribute_scale, sv_epsilon=sv_epsilon)
            tensors[f"base_model.model.{m.name}.lora_A.weight"] = a.cpu()
            tensors[f"base_model.model.{m.name}.lora_B.weight"] = b.cpu()
        ranks[m.name] = a.shape[0]
        bname = f"{m.name}.bias"
        if bname in ft and bname in bs:  # the bias delta on lora_B, as mergekit writes it
            tensors[f"base_model.model.{m.name}.lora_B.bias"] = (ft.get_tensor(bname) - bs.get_tensor(bname)).cpu()
        elif lora_bias:  # PEFT's lora_bias gives every target a lora_B bias: zeros where the model has none
            tensors[f"base_model.model.{m.name}.lora_B.bias"] = torch.zeros(b.shape[0], dtype=b.dtype)
    if not ranks:
        raise ConfigError(f"no module of {ft.name!r} was decomposed (include={include}, exclude={exclude}); "
                          "loosen the patterns")
    max_rank = max(ranks.values())
    different = {k: v for k, v in ranks.items() if v != max_rank}
    adapter_config = {
        "base_model_name_or_path": str(base), "peft_type": "LORA", "use_rslora": False,
        "target_modules": sorted({k.split(".")[-1] for k in ranks}), "modules_to_save": saved or None,
        "task_type": "CAUSAL_LM", "r": max_rank, "lora_alpha": max_rank, "rank_pattern": different,
        "alpha_pattern": different, "lora_dropout": 0.0, "fan_in_fan_out": False, "inference_mode": True,
        "bias": "none", "lora_bias": lora_bias,
    }
    card = (f"# LoRA adapter extracted by dfsmerge\n\nBase model: `{base}`\n\nFine-tuned model: `{finetuned}`\n\n"
            f"Rank: {max_rank} (requested {rank}); scaling 1 (`lora_alpha = r`). Modules at full rank: "
            f"{', '.join(saved) or 'none'}.\n\nLoad with `peft.PeftModel.from_pretrained(base_model, this_dir)`.\n")
    _write_adapter(out, tensors, adapter_config, card, force=force)
    return out


def _write_adapter(out: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], card: str, *,
                   force: bool) -> None:
    """Adapter files into a temporary directory beside ``out``, renamed into place at the end."""
    from safetensors.torch import save_file

    from dfsmerge.io.writer import fsync_dir

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(card)
        fsync_dir(tmp)
        if out.exists():
            if not force:
                raise OutputExistsError(f"output {out} already exists; choose another path or pass --force")
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
