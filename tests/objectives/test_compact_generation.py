"""``compact_batches``: greedy decoding that drops finished rows from the batch and its KV cache gives each row the
same text as the unbatched reference decoder, with fewer token positions through the model."""

from __future__ import annotations

import random

import torch
from objectives_helpers import reference_greedy

from dfsmerge.objectives.lm_adapter import Scorer


def test_compact_batches_keep_each_rows_text_with_fewer_positions(tiny_model):
    model, tok = tiny_model
    rng = random.Random(5)
    prompts = [f"{rng.randint(0, 999)}+{rng.randint(0, 99)}=" + "ab" * rng.randint(0, 5) for _ in range(9)]
    # rows stop at different steps: each row's own stop string is the text its reference output reaches first
    until = [".", "?", "a", "b"]
    results, positions = {}, {}
    for compact in (False, True):
        sc = Scorer(tok, batch_size=9, compact_batches=compact)
        ids, mask = sc.encode_batch(prompts)
        seen = []
        h = model.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["input_ids"]).numel()),
                                            with_kwargs=True)
        try:
            with torch.no_grad():
                out = sc.greedy_generate(model, ids, mask, max_new_tokens=12, stop=until)
        finally:
            h.remove()
        results[compact] = [sc.decode(t) for t in out]
        positions[compact] = sum(seen)
    refs = [reference_greedy(model, tok, p, max_new=12, until=[]) for p in prompts]
    for text, ref in zip(results[True], refs, strict=True):
        assert ref.startswith(text.split(tok.eos_token)[0])
    assert results[True] == results[False]
    lengths = [len(t) for t in results[True]]
    assert len(set(lengths)) > 1  # the rows did finish at different steps
    assert positions[True] < positions[False]
