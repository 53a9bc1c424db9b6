"""``eval_dtype: auto``: which dtype a search scores its candidates in, decided by a rule from the hardware and the
model, never by a timing, so the same search on the same machine always makes the same choice (issue 26: a choice
made on ~0.1 s timings kept bfloat16 on one slow moment and sent a toy search to 29.8 instead of 44.3).

The rule (:func:`bf16_rule`) proposes bfloat16 where it is measured to be faster; the search then scores its first
candidates in both dtypes and keeps bfloat16 only when every score agrees (:func:`verify_scores`): scores are
deterministic, so that check is too.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

#: A CPU with native bfloat16 dot products runs a model this wide (``hidden_size``) or wider faster in bfloat16.
#: Measured by ``python benchmarks/eval_dtype_rule.py`` (benchmarks/results/eval_dtype_rule.md: AMD EPYC with
#: avx512_bf16, 1 thread, random 2-layer models, 16 x 24 tokens, min of 5 alternating runs; bf16 speed / fp32, small
#: vocabulary): llama hidden 64 0.99x (the toy zoo's shape; its searches measured 0.75-0.78x with the runtime around
#: it), 128: 1.39x, 256: 1.84x, 576: 1.95x (SmolLM2's width; its searches measured ~1.9x); qwen2 128-768:
#: 1.7-2.1x; gemma3_text 128: 1.08x, 256-768: 1.5-1.9x.
BF16_MIN_HIDDEN = 128
#: ... or whose output head is this large (``vocab_size * hidden_size``): llama hidden 64 with a 49152-token
#: vocabulary ran 2.14x faster in bfloat16, the head's matmul dominating.
BF16_MIN_HEAD = 1 << 20
#: bfloat16 is kept only when every objective score of the checked candidates agrees within this (relative above 1).
EVAL_DTYPE_MAX_SCORE_DIFF = 0.02
#: candidates of the first generation scored in both dtypes to check that agreement.
EVAL_DTYPE_CHECK_CANDIDATES = 3


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (x86 ``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo); False
    where that cannot be read (bfloat16 is then emulated, or its speed unknown)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool(set(line.split(":", 1)[1].split()) & {"avx512_bf16", "amx_bf16"})
    return False


def bf16_rule(base: str, device: str, model_config: dict[str, Any], *, native_bf16: bool | None = None,
              cuda_bf16: bool | None = None) -> dict[str, Any]:
    """The dtype ``eval_dtype: auto`` proposes, from the device and model A's ``config.json``.

    Args:
        base: the search's ``dtype`` (what it scores in unless bfloat16 is proposed).
        device: ``cpu`` or ``cuda`` (``auto`` resolved).
        model_config: model A's config (``hidden_size``, ``vocab_size``; ``text_config`` for multimodal wrappers).
        native_bf16, cuda_bf16: the hardware facts (default: read from this machine).

    Returns:
        ``{"dtype": ..., "rule": why, "measured": False}``; ``dtype`` is ``bfloat16`` or ``base``.
    """
    if base != "float32":
        return {"dtype": base, "rule": f"dtype={base} is already 16-bit", "measured": False}
    cfg = model_config.get("text_config") or model_config
    hidden = int(cfg.get("hidden_size") or cfg.get("n_embd") or 0)
    vocab = int(cfg.get("vocab_size") or 0)
    if device.startswith("cuda"):
        if cuda_bf16 is None:
            import torch

            cuda_bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        ok, why = cuda_bf16, f"cuda {'with' if cuda_bf16 else 'without'} bfloat16 support"
    else:
        native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
        wide = hidden >= BF16_MIN_HIDDEN or vocab * hidden >= BF16_MIN_HEAD
        ok = native and wide
        why = (f"cpu {'with' if native else 'without'} native bfloat16 (avx512_bf16/amx_bf16), hidden_size={hidden}, "
               f"vocab_size={vocab}: bfloat16 is faster from hidden_size {BF16_MIN_HIDDEN} or a head of "
               f"{BF16_MIN_HEAD} weights on such a cpu")
    return {"dtype": "bfloat16" if ok else base, "rule": why, "measured": False}


def verify_scores(proposal: dict[str, Any], base: str, results_base: list, results_fast: list) -> dict[str, Any]:
    """Keep the proposed 16-bit dtype when every objective score of the same candidates scored in ``base`` and in
    it agrees within :data:`EVAL_DTYPE_MAX_SCORE_DIFF` (a candidate failing in one dtype only disagrees); else
    ``base``. Returns the proposal with ``dtype``, ``max_score_diff`` and ``candidates`` set."""
    diff = 0.0
    for a, b in zip(results_base, results_fast, strict=True):
        if (a.error is None) != (b.error is None):
            diff = math.inf
            continue
        if a.error is not None:
            continue
        for k, va in a.scores.items():
            vb = b.scores.get(k)
            if va is None or vb is None:
                diff = max(diff, 0.0 if va is vb else math.inf)
            else:
                diff = max(diff, abs(va - vb) / max(1.0, abs(va)))
    ok = diff <= EVAL_DTYPE_MAX_SCORE_DIFF
    return {**proposal, "dtype": proposal["dtype"] if ok else base, "proposed": proposal["dtype"],
            "max_score_diff": diff if math.isfinite(diff) else None, "candidates": len(results_base)}


def model_config(path: str) -> dict[str, Any]:
    """A model's ``config.json`` (empty when it cannot be read: the rule then keeps float32)."""
    try:
        from dfsmerge.io import open_checkpoint

        return dict(open_checkpoint(path).config)
    except Exception:  # noqa: BLE001 - an unreadable config only means no bfloat16 proposal
        return {}
