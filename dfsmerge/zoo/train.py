"""Training and scoring of the toy zoo's models: plain PyTorch loops over ``transformers.LlamaForCausalLM``.

The recipe is round 3 of ``shared/notes/toy-zoo-findings.md``: a base trained on generic tasks in E, a math
expert fine-tuned from it with frozen embeddings, and a language expert in two phases (only the B-digit embedding
rows, then blocks / final norm / head on B-in/B-out generic tasks with embeddings frozen) so that its changes
overlap and conflict with the math expert's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dfsmerge.zoo import tasks as T


@dataclass(frozen=True, slots=True)
class ModelShape:
    num_layers: int
    hidden: int
    intermediate: int
    heads: int


@dataclass(frozen=True, slots=True)
class Phase:
    """One training phase: ``steps`` AdamW steps at peak ``lr`` (cosine, linear warmup) on ``mixture``.

    ``trainable``: ``all``, ``no_embed`` (everything but the input embedding), ``b_rows`` (only the B-digit
    rows of the input embedding: the others receive a zero gradient and, with no weight decay, never move) or
    ``b_rows_l0`` (the B-digit rows and decoder layer 0).
    """

    name: str
    mixture: str
    steps: int
    lr: float
    trainable: str
    warmup: int = 50


def llama_config(shape: ModelShape):
    """The zoo's ``LlamaConfig`` (untied head, vocabulary :data:`tasks.VOCAB`)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(T.VOCAB), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.02,
        pad_token_id=T.TOKEN_ID[T.PAD], bos_token_id=T.TOKEN_ID[T.BOS], eos_token_id=T.TOKEN_ID[T.EOS],
    )


def make_batch(samples: Sequence[T.Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``<s> prompt answer </s>`` ids (B, L) and the answer mask (B, L) of positions to predict.

    ``mask[b, t]`` is True where token ``t + 1`` belongs to the answer or the closing ``</s>``, i.e. where the
    logits at ``t`` are scored.
    """
    seqs, starts = [], []
    for s in samples:
        p = [T.TOKEN_ID[T.BOS], *T.encode(s.prompt)]
        seqs.append(p + T.encode(s.answer) + [T.TOKEN_ID[T.EOS]])
        starts.append(len(p))
    L = max(len(q) for q in seqs)
    ids = torch.full((len(seqs), L), T.TOKEN_ID[T.PAD], dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.bool)
    for b, (q, st) in enumerate(zip(seqs, starts, strict=True)):
        ids[b, :len(q)] = torch.tensor(q)
        mask[b, st - 1:len(q) - 1] = True
    return ids, mask


def _answer_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # right padding + causal attention: pads come after every real token, so no attention mask is needed
    h = model.model(input_ids=ids).last_hidden_state  # (B, L, D)
    targets = ids[:, 1:][mask[:, :-1]]  # (N,)
    logits = model.lm_head(h[:, :-1][mask[:, :-1]])  # (N, V)
    return logits, targets


def _set_trainable(model, trainable: str) -> list[torch.nn.Parameter]:
    emb = model.model.embed_tokens.weight
    for p in model.parameters():
        p.requires_grad_(trainable in ("all", "no_embed"))
    if trainable == "no_embed":
        emb.requires_grad_(False)
    elif trainable in ("b_rows", "b_rows_l0"):
        emb.requires_grad_(True)
        for p in model.model.layers[0].parameters():
            p.requires_grad_(trainable == "b_rows_l0")
    elif trainable != "all":
        raise ValueError(f"trainable={trainable!r}; use all, no_embed, b_rows or b_rows_l0")
    return [p for p in model.parameters() if p.requires_grad]


def train_phase(model, phase: Phase, *, seed: int, batch_size: int, math_train: np.ndarray,
                heldout: set[tuple[str, str]], on_step: Callable[[float], None] | None = None) -> float:
    """Run ``phase`` on ``model`` in place; returns the mean loss of the last 50 steps.

    Deterministic for a seed and thread count: data come from a NumPy generator seeded by (seed, phase name).
    """
    rng = np.random.default_rng([seed, *phase.name.encode()])
    stream = T.training_stream(phase.mixture, rng, math_train, heldout)
    params = _set_trainable(model, phase.trainable)
    opt = torch.optim.AdamW(params, lr=phase.lr, betas=(0.9, 0.98), weight_decay=0.0)
    b_rows = torch.zeros(model.config.vocab_size, 1)
    b_rows[list(T.B_TOKEN_IDS)] = 1.0

    def lr_at(step: int) -> float:  # linear warmup, then cosine to 0
        if step < phase.warmup:
            return phase.lr * (step + 1) / phase.warmup
        progress = (step - phase.warmup) / max(1, phase.steps - phase.warmup)
        return phase.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    model.train()
    losses: list[float] = []
    for step in range(phase.steps):
        ids, mask = make_batch([next(stream) for _ in range(batch_size)])
        logits, targets = _answer_logits(model, ids, mask)
        loss = F.cross_entropy(logits, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if phase.trainable in ("b_rows", "b_rows_l0"):
            model.model.embed_tokens.weight.grad.mul_(b_rows)  # (V, D) * (V, 1)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(losses[-1])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return float(np.mean(losses[-50:]))


@torch.no_grad()
def exact_match(model, samples: Sequence[T.Sample], *, batch_size: int = 500) -> np.ndarray:
    """Per-sample exact match (bool array) from one teacher-forced forward per batch.

    A sample counts when the argmax at every answer position and at the closing ``</s>`` is the target, which is
    exactly when greedy decoding emits the answer and stops (ties aside), i.e. lm-eval's greedy exact match.
    """
    model.eval()
    out = []
    for i in range(0, len(samples), batch_size):
        ids, mask = make_batch(samples[i:i + batch_size])
        h = model.model(input_ids=ids).last_hidden_state  # (B, L, D)
        pred = model.lm_head(h[:, :-1]).argmax(-1)  # (B, L-1)
        wrong = (pred != ids[:, 1:]) & mask[:, :-1]
        out.append((~wrong.any(dim=1)).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)
