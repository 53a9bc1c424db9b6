"""Tiny random Hugging Face checkpoints for tests, demos and benchmarks (built offline, in seconds).

Every supported family gets a small config; weights are random with embeddings of std ``embed_std`` so hidden
states have realistic size (the folded export's accuracy depends on it, see ``dfsmerge.export``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma", "gemma3_text", "phi3", "olmo2", "olmo3",
            "granite", "cohere", "cohere2", "starcoder2", "smollm3", "glm4", "exaone4", "helium", "ministral",
            "seed_oss", "mixtral", "qwen2_moe", "qwen3_moe", "phi", "gpt_neox", "gpt2")
"""Families with tiny random checkpoints; every one is a key of :data:`dfsmerge.arch.families.FAMILIES`."""

_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", " "] + list("abcdefghijklmnopqrstuvwxyz0123456789+-=.,?!:")

# Per-family settings on top of the common ones: small sliding windows and mixed layer types so short test
# sequences cross the window; non-trivial multipliers so the family's extra operations are exercised.
_WINDOWED = dict(sliding_window=8)
_EXTRA: dict[str, dict] = {
    "gemma2": dict(sliding_window=64, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(sliding_window=8, sliding_window_pattern=2, final_logit_softcapping=30.0),
    "mistral": dict(sliding_window=None),
    "olmo3": dict(_WINDOWED, layer_types=None),
    "cohere": dict(logit_scale=0.5, use_qk_norm=True),
    "cohere2": dict(_WINDOWED, sliding_window_pattern=2, logit_scale=0.5),
    "granite": dict(embedding_multiplier=2.0, logits_scaling=4.0, residual_multiplier=0.5, attention_multiplier=0.2),
    "smollm3": dict(no_rope_layer_interval=2),
    "exaone4": dict(_WINDOWED, sliding_window_pattern=2),
    "ministral": dict(_WINDOWED),
    "starcoder2": dict(use_bias=True),
    "phi": dict(partial_rotary_factor=0.5),
    "gpt_neox": dict(rotary_pct=0.5, use_parallel_residual=True),
    "mixtral": dict(num_local_experts=3, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=3, num_experts_per_tok=2, moe_intermediate_size=48,
                      shared_expert_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[1]),
    "qwen3_moe": dict(num_experts=3, num_experts_per_tok=2, moe_intermediate_size=48),  # mergekit: no dense layers
}
_HEAD_DIM = ("qwen3", "gemma", "gemma2", "gemma3_text", "ministral", "olmo3", "exaone4", "helium", "seed_oss",
             "glm4", "smollm3", "cohere2", "qwen3_moe")
_QUERY_SCALAR = ("gemma2", "gemma3_text")


def tiny_config(family: str, *, num_layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 128, tie: bool = False, vocab_size: int | None = None):
    """A small ``transformers`` config of ``family`` (one of :data:`FAMILIES`)."""
    from transformers import AutoConfig

    vocab = vocab_size or len(_VOCAB)
    common = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6,
    )
    if family in _HEAD_DIM:
        common["head_dim"] = hidden // heads
    if family in _QUERY_SCALAR:
        common["query_pre_attn_scalar"] = hidden // heads
    if family == "gpt2":
        common = dict(vocab_size=vocab, n_embd=hidden, n_layer=num_layers, n_head=heads, n_inner=intermediate,
                      n_positions=256, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    common.update(_EXTRA.get(family, {}))
    return AutoConfig.for_model(family, **common)


def save_tiny_tokenizer(out_dir: str | Path) -> None:
    """Save a character-level ``tokenizers`` tokenizer loadable by ``AutoTokenizer``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(str(out_dir))


def make_tiny_checkpoint(family: str, out_dir: str | Path, *, seed: int = 0, num_layers: int = 4,
                         hidden: int = 64, tie: bool = False, embed_std: float = 1.0, dtype=torch.float32,
                         max_shard_size: str | int = "10GB", like: str | Path | None = None,
                         delta_std: float = 0.0) -> Path:
    """Write a random checkpoint of ``family`` with a tokenizer to ``out_dir`` and return the path.

    Args:
        like: an existing tiny checkpoint to perturb (a "fine-tune" of it) instead of drawing fresh weights;
            every tensor gets Gaussian noise of std ``delta_std`` times its own std.
        max_shard_size: passed to ``save_pretrained`` (small values give multi-shard checkpoints).
    """
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    gen = torch.Generator().manual_seed(seed)
    if like is not None:
        model = AutoModelForCausalLM.from_pretrained(str(like), dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                scale = float(p.float().std()) if p.numel() > 1 else 1.0
                p.add_(torch.randn(p.shape, generator=gen) * delta_std * (scale or 1.0))
    else:
        from dfsmerge.arch.families import FAMILIES as FACTS

        offset = FACTS[family].norm_offset
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(family, num_layers=num_layers, hidden=hidden, tie=tie),
                                                 dtype=torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 1 and name.endswith("bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
                elif p.ndim == 1:  # norms: around their identity value (w = 0 for Gemma's 1 + w), not exactly it
                    p.copy_(1.0 - offset + 0.1 * torch.randn(p.shape, generator=gen))
                elif p is model.get_input_embeddings().weight:
                    p.copy_(torch.randn(p.shape, generator=gen) * embed_std)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    model = model.to(dtype)
    model.save_pretrained(str(out_dir), max_shard_size=max_shard_size)
    save_tiny_tokenizer(out_dir)
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["model_type"] == family
    return out_dir
