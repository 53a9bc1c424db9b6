"""Training and scoring of the toy zoo's models: plain PyTorch loops over ``transformers.LlamaForCausalLM``.

Phases choose what they train (embedding rows, decoder layers, head), an LR for the embedding relative to the
rest, and optional weight-noise training (flat minima that survive merging). The recipes are in
``dfsmerge.zoo.build`` and their measured effects in ``NOTES.md`` beside this file.
"""

from __future__ import annotations

import math
import re
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
    rows of the input embedding: the others receive a zero gradient and, with no weight decay, never move),
    ``b_rows_l0`` (the B-digit rows and decoder layer 0), or parts joined by ``+``: ``embed`` (the whole input
    embedding), ``b_rows``, ``blocks`` (every decoder layer), ``blocks:I-J`` (decoder layers I..J inclusive),
    ``head`` (final norm and LM head).
    """

    name: str
    mixture: str
    steps: int
    lr: float
    trainable: str
    warmup: int = 50
    embed_lr_scale: float = 1.0  # the input embedding's LR relative to ``lr``
    weight_noise: float = 0.0  # train at weights + N(0, (weight_noise * rms of each matrix)^2): flat, robust minima


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


_ALIASES = {"all": "embed+blocks+head", "no_embed": "blocks+head", "b_rows_l0": "b_rows+blocks:0-0"}


def _parse_trainable(trainable: str, num_layers: int) -> tuple[bool, bool, set[int], bool]:
    """``trainable`` -> (whole embedding, B-digit rows, decoder layer indices, final norm and head)."""
    embed = b_rows = head = False
    layers: set[int] = set()
    for part in _ALIASES.get(trainable, trainable).split("+"):
        if part == "embed":
            embed = True
        elif part == "b_rows":
            b_rows = True
        elif part == "head":
            head = True
        elif part == "blocks":
            layers |= set(range(num_layers))
        elif part.startswith("blocks:") and re.fullmatch(r"\d+-\d+", part[7:]):
            i, j = (int(v) for v in part[7:].split("-"))
            if not 0 <= i <= j < num_layers:
                raise ValueError(f"trainable={trainable!r}: layers {i}-{j} are outside 0-{num_layers - 1}")
            layers |= set(range(i, j + 1))
        else:
            raise ValueError(f"trainable={trainable!r}; use all, no_embed, b_rows_l0 or parts joined by '+': "
                             f"embed, b_rows, blocks, blocks:I-J, head")
    return embed, b_rows and not embed, layers, head


def _set_trainable(model, trainable: str) -> tuple[list[torch.nn.Parameter], bool]:
    """Freeze all but what ``trainable`` names; returns the trainable parameters and whether only the B-digit
    rows of the embedding may move."""
    embed, b_rows, layers, head = _parse_trainable(trainable, len(model.model.layers))
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(embed or b_rows)
    for i in layers:
        for p in model.model.layers[i].parameters():
            p.requires_grad_(True)
    if head:
        for p in (*model.model.norm.parameters(), *model.lm_head.parameters()):
            p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad], b_rows


def train_phase(model, phase: Phase, *, seed: int, batch_size: int, math_train: np.ndarray,
                heldout: set[tuple[str, str]], on_step: Callable[[float], None] | None = None) -> float:
    """Run ``phase`` on ``model`` in place; returns the mean loss of the last 50 steps.

    Deterministic for a seed and thread count: data come from a NumPy generator seeded by (seed, phase name).
    """
    rng = np.random.default_rng([seed, *phase.name.encode()])
    stream = T.training_stream(phase.mixture, rng, math_train, heldout)
    params, only_b_rows = _set_trainable(model, phase.trainable)
    emb = model.model.embed_tokens.weight
    groups = [{"params": [p for p in params if p is not emb], "scale": 1.0},
              {"params": [p for p in params if p is emb], "scale": phase.embed_lr_scale}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=phase.lr, betas=(0.9, 0.98), weight_decay=0.0)
    b_rows = torch.zeros(model.config.vocab_size, 1)
    b_rows[list(T.B_TOKEN_IDS)] = 1.0

    def lr_at(step: int) -> float:  # linear warmup, then cosine to 0
        if step < phase.warmup:
            return phase.lr * (step + 1) / phase.warmup
        progress = (step - phase.warmup) / max(1, phase.steps - phase.warmup)
        return phase.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    noisy = [p for p in params if p.dim() == 2 and p is not emb]
    gen = torch.Generator().manual_seed(int(rng.integers(2**31))) if phase.weight_noise else None
    model.train()
    losses: list[float] = []
    for step in range(phase.steps):
        ids, mask = make_batch([next(stream) for _ in range(batch_size)])
        clean = []
        if phase.weight_noise:  # gradient at a random point near the weights, applied to the clean weights
            with torch.no_grad():
                for p in noisy:
                    clean.append(p.detach().clone())
                    p.add_(torch.randn(p.shape, generator=gen) * (phase.weight_noise * p.pow(2).mean().sqrt()))
        logits, targets = _answer_logits(model, ids, mask)
        loss = F.cross_entropy(logits, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clean:
            with torch.no_grad():
                for p, c in zip(noisy, clean, strict=True):
                    p.copy_(c)
        if only_b_rows:
            model.model.embed_tokens.weight.grad.mul_(b_rows)  # (V, D) * (V, 1)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step) * g["scale"]
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
