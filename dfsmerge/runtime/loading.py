"""Turn what a user names on the command line into a model: a checkpoint directory, a hub id, a ``zoo:<name>``
reference or a plan file (a stitched model over a layer pool)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dfsmerge.errors import CheckpointError
from dfsmerge.genome.plan import PathPlan
from dfsmerge.io import open_checkpoint
from dfsmerge.runtime.pool import LayerPool
from dfsmerge.runtime.stitched import StitchedModel
from dfsmerge.zoo import resolve_zoo_model


def resolve_model_ref(ref: str, *, zoo_dir: str | Path | None = None) -> str:
    """A local path or hub id for ``ref`` (``zoo:<name>`` resolved against ``zoo_dir``, building it if missing)."""
    if isinstance(ref, str) and ref.startswith("zoo:"):
        return str(resolve_zoo_model(ref, zoo_dir))
    return str(ref)


def is_plan_file(ref: str | Path) -> bool:
    p = Path(ref)
    return p.is_file() and p.suffix in (".yaml", ".yml")


def load_model_or_plan(ref: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                       allow_pickle: bool = False, zoo_dir: str | Path | None = None) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for evaluation.

    Args:
        ref: checkpoint directory, hub id, ``zoo:<name>``, or a plan YAML (``models``/``base``/``path``).
        allow_pickle: allow ``*.bin`` checkpoints (loaded with ``weights_only=True``).
    Raises:
        CheckpointError: nothing loadable at ``ref``.
    """
    if is_plan_file(ref):
        plan = PathPlan.load(ref)
        models = {name: resolve_model_ref(src, zoo_dir=zoo_dir) for name, src in plan.models.items()}
        pool = LayerPool(models, base=plan.base, device=device, dtype=dtype)
        return StitchedModel.from_pool(pool, plan), pool.tokenizer
    from transformers import AutoModelForCausalLM  # only a checkpoint load needs transformers
    from transformers.utils import logging as hf_logging

    from dfsmerge.io.tokenizer import load_tokenizer

    path = open_checkpoint(resolve_model_ref(str(ref), zoo_dir=zoo_dir), allow_pickle=allow_pickle).path
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a local load (any download is done): transformers' per-tensor bar is noise
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=not allow_pickle or None)
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"model {str(ref)!r}: transformers cannot load {path} ({str(e).splitlines()[0]})") \
            from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model.to(device).eval(), tokenizer
