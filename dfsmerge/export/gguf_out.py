"""A Hugging Face checkpoint written as one GGUF file for llama.cpp, Ollama and LM Studio (docs/design.md section 6).

``dfsmerge export --format gguf`` first writes the folded export (:mod:`dfsmerge.export.exporter`: a plain
checkpoint, a path's repeated layers as copies, its scales folded into the weights, as mergekit's passthrough does),
then converts it here with the ``gguf`` package's writer:

- architecture metadata under llama.cpp's keys (``{arch}.block_count``, ``{arch}.attention.head_count``, ...),
  per-layer sliding-window flags for Gemma 3 (``gemma3.attention.sliding_window_pattern``, an array of bools);
- tensors renamed with ``gguf.get_tensor_name_map``; Llama-family q/k rows permuted from Hugging Face's
  half-split rotary layout to llama.cpp's interleaved one; Gemma's ``1 + w`` norm gains stored as ``1 + w``;
- the tokenizer: tokens, token types, merges (byte-level BPE: ``gpt2``) or scores (SentencePiece-style BPE with byte
  fallback: ``llama``), special ids, whether BOS is added, and the chat template;
- ``--quant``: ``f32`` (exact), ``f16``, ``bf16`` or ``q8_0`` (``gguf.quants``) for matrices; norms and biases stay
  f32, as llama.cpp's own converter keeps them.

Families: :data:`GGUF_FAMILIES`. What llama.cpp cannot compute is refused before any work (one-line ConfigError):
Gemma 3 with ``query_pre_attn_scalar`` other than ``head_dim`` or with attention-logit soft-capping, rope scaling
other than none or linear. Learnt from llama.cpp's ``convert_hf_to_gguf.py``; the code is dfsmerge's.

Beside the file, :func:`modelfile` writes an Ollama ``Modelfile`` (FROM, TEMPLATE in Go template syntax for
ChatML and Gemma turn templates, stop tokens, PARAMETERs from ``generation_config.json``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfsmerge.errors import ConfigError

GGUF_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3",
                 "gemma3": "gemma3"}
"""Hugging Face ``model_type`` -> llama.cpp architecture. Mistral is llama.cpp's ``llama`` (as its converter
writes it)."""

QUANTS = ("f32", "f16", "bf16", "q8_0")
_PERMUTE_QK = ("llama",)  # llama.cpp applies rotary to interleaved pairs for these; HF to halves
_NORM_PLUS_ONE = ("gemma3",)  # HF stores w of a (1 + w) gain; llama.cpp multiplies by the stored tensor

# llama.cpp picks the BPE pre-tokenizer by the ids its test string encodes to (sha256 of ``str(ids)``); the string
# and the three hashes below are the ones llama.cpp's converter lists for these tokenizers.
_PRE_CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis '
                   'concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 '
                   '?我想在apple工作1314151天～ ------======= нещо на Български '
                   '\'\'\'\'\'\'```````""""......!!!!!!?????? '
                   'I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? '
                   'We\'Ve a\'lL')
_PRE_BY_HASH = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
}


def check_quant(quant: str) -> str:
    if quant not in QUANTS:
        raise ConfigError(f"quant={quant!r} is not a GGUF tensor type dfsmerge writes; use one of {', '.join(QUANTS)}")
    return quant


def gguf_arch(config: Mapping[str, Any], *, source: str = "model") -> str:
    """llama.cpp's architecture name for a Hugging Face config.

    Raises:
        ConfigError: a family the GGUF export does not support (names the supported ones), or a setting llama.cpp
            cannot compute for it.
    """
    mt = config.get("model_type")
    if mt not in GGUF_FAMILIES:
        raise ConfigError(f"model {source!r} has model_type={mt!r}, which the GGUF export does not support; "
                          f"supported: {', '.join(GGUF_FAMILIES)} (use --format folded for the others)")
    arch = GGUF_FAMILIES[mt]
    if arch == "gemma3":
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        if config.get("query_pre_attn_scalar", head_dim) != head_dim:
            raise ConfigError(f"model {source!r}: query_pre_attn_scalar={config['query_pre_attn_scalar']} differs "
                              f"from head_dim={head_dim}; llama.cpp's gemma3 scales queries by 1/sqrt(head_dim), so "
                              "this model cannot be written as GGUF; use --format folded")
        if config.get("attn_logit_softcapping"):
            raise ConfigError(f"model {source!r}: attn_logit_softcapping={config['attn_logit_softcapping']} is not "
                              "computed by llama.cpp's gemma3; use --format folded")
    for kind, rope in _rope_params(config).items():
        rtype = rope.get("rope_type", rope.get("type", "default"))
        if rtype not in ("default", "linear"):
            raise ConfigError(f"model {source!r}: rope_type={rtype!r} ({kind}) is not written to GGUF by dfsmerge; "
                              "supported: default, linear; use --format folded")
    return arch


def _rope_params(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"full_attention": {...}, "sliding_attention": {...}}`` from transformers 5's ``rope_parameters`` (one
    dict or one per attention type) or the older ``rope_theta`` / ``rope_scaling`` / ``rope_local_base_freq``."""
    rp = config.get("rope_parameters")
    if isinstance(rp, Mapping) and rp and all(isinstance(v, Mapping) for v in rp.values()):
        return {k: dict(v) for k, v in rp.items()}
    if isinstance(rp, Mapping) and rp:
        return {"full_attention": dict(rp)}
    full = dict(config.get("rope_scaling") or {})
    full.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    out = {"full_attention": full}
    if config.get("rope_local_base_freq") is not None:
        out["sliding_attention"] = {"rope_type": "default", "rope_theta": config["rope_local_base_freq"]}
    return out


# ====================================================================== tensors
def _permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q/k rows of each head from HF's (first half, second half) rotary layout to llama.cpp's interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _encode(t: torch.Tensor, quant: str) -> tuple[np.ndarray, Any]:
    """``(data, raw_dtype)`` for ``GGUFWriter.add_tensor``: vectors in f32, matrices in ``quant`` (q8_0 only where
    rows split into blocks of 32, else f32)."""
    import gguf

    a = t.detach().to(torch.float32).contiguous().numpy()
    if a.ndim < 2 or quant == "f32":
        return a, None
    if quant == "f16":
        return a.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType.BF16 if quant == "bf16" else gguf.GGMLQuantizationType.Q8_0
    if qtype == gguf.GGMLQuantizationType.Q8_0 and a.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return a, None
    return gguf.quants.quantize(a, qtype), qtype


def _tensors(folded: Path):
    """(name, tensor) of every tensor of a safetensors checkpoint directory."""
    from safetensors import safe_open

    files = sorted(folded.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield name, st.get_tensor(name)


# ====================================================================== tokenizer
@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer as GGUF stores it."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE)
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    special: dict[str, int]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None
    chat_template: str | None


def _merges_as_strings(merges: list[Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _is_byte_level(tj: Mapping[str, Any]) -> bool:
    def has(node: Any) -> bool:
        if not isinstance(node, Mapping):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has(x) for x in node.get("pretokenizers", []) or node.get("decoders", []) or [])

    return has(tj.get("pre_tokenizer")) or has(tj.get("decoder"))


def _add_space_prefix(tj: Mapping[str, Any]) -> bool:
    def metaspace(node: Any) -> bool:
        if not isinstance(node, Mapping):
            return False
        if node.get("type") == "Metaspace":
            return node.get("prepend_scheme", "always") != "never" and node.get("add_prefix_space", True)
        if node.get("type") == "Prepend":
            return True
        return any(metaspace(x) for x in node.get("pretokenizers", []) or node.get("normalizers", []) or [])

    return metaspace(tj.get("pre_tokenizer")) or metaspace(tj.get("normalizer"))


def read_vocab(model_dir: str | Path, vocab_size: int, *, source: str | None = None) -> GGUFVocab:
    """The tokenizer of a checkpoint directory as GGUF stores it, padded to the model's ``vocab_size``.

    Raises:
        ConfigError: no ``tokenizer.json``, or a tokenizer model GGUF cannot describe (only BPE is written).
    """
    import gguf

    from dfsmerge.io.tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    tj_path = model_dir / "tokenizer.json"
    if not tj_path.is_file():
        raise ConfigError(f"{model_dir}: no tokenizer.json; the GGUF export writes fast (tokenizers) BPE tokenizers "
                          "only; save the tokenizer with a fast tokenizer first")
    tj = json.loads(tj_path.read_text())
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ConfigError(f"{model_dir}: tokenizer model type={model.get('type')!r} cannot be written to GGUF by "
                          "dfsmerge; supported: BPE (byte-level, or SentencePiece-style with byte fallback)")
    tok = load_tokenizer(model_dir)
    byte_level = _is_byte_level(tj) and not model.get("byte_fallback")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        vocab[a["content"]] = i
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [int(gguf.TokenType.UNUSED)] * n
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = int(gguf.TokenType.NORMAL)
    merges = _merges_as_strings(model.get("merges", []))
    scores = None
    if not byte_level:
        rank = {m.replace(" ", ""): r for r, m in reversed(list(enumerate(merges)))}
        scores = [0.0] * n
        for text, i in vocab.items():
            if text in rank:  # llama.cpp's SPM tokenizer merges the highest-scoring pair first: score = -rank
                scores[i] = -float(rank[text]) - 1.0
            if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                types[i] = int(gguf.TokenType.BYTE)
    unk = model.get("unk_token")
    for i, a in added.items():
        types[i] = int(gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    if unk in vocab:
        types[vocab[unk]] = int(gguf.TokenType.UNKNOWN)
    special = {k: getattr(tok, f"{k}_token_id") for k in ("bos", "eos", "unk", "pad")}
    special = {k: int(v) for k, v in special.items() if v is not None}
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        extra = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None and e != special.get("eos")]
        if extra:
            special["eot"] = int(extra[0])
    probe = tok("a", add_special_tokens=True)["input_ids"]
    add_bos = "bos" in special and bool(probe) and probe[0] == special["bos"]
    add_eos = "eos" in special and bool(probe) and probe[-1] == special["eos"]
    pre = None
    if byte_level:
        digest = sha256(str(tok.encode(_PRE_CHECK_TEXT, add_special_tokens=False)).encode()).hexdigest()
        pre = _PRE_BY_HASH.get(digest)
        if pre is None:
            warnings.warn(f"{source or model_dir}: llama.cpp's pre-tokenizer for this BPE tokenizer is not known "
                          f"to dfsmerge (check hash {digest[:16]}...); writing 'default', which may split text "
                          "differently from the Hugging Face tokenizer", UserWarning, stacklevel=3)
            pre = "default"
    template = tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None
    return GGUFVocab(model="gpt2" if byte_level else "llama", pre=pre, tokens=tokens, types=types, scores=scores,
                     merges=merges if byte_level else None, special=special, add_bos=add_bos, add_eos=add_eos,
                     add_space_prefix=None if byte_level else _add_space_prefix(tj), chat_template=template)


def _write_vocab(w: Any, v: GGUFVocab) -> None:
    w.add_tokenizer_model(v.model)
    if v.pre is not None:
        w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    if v.merges is not None:
        w.add_token_merges(v.merges)
    setters = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id,
               "pad": w.add_pad_token_id, "eot": w.add_eot_token_id}
    for k, i in v.special.items():
        setters[k](i)
    w.add_add_bos_token(v.add_bos)
    w.add_add_eos_token(v.add_eos)
    if v.add_space_prefix is not None:
        w.add_add_space_prefix(v.add_space_prefix)
    if v.chat_template:
        w.add_chat_template(v.chat_template)


# ====================================================================== the file
def _file_type(quant: str) -> int:
    import gguf

    return int({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant])


def _write_hparams(w: Any, arch: str, c: Mapping[str, Any], n_layers: int) -> None:
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    w.add_context_length(int(c.get("max_position_embeddings", 2048)))
    w.add_embedding_length(int(c["hidden_size"]))
    w.add_block_count(n_layers)
    w.add_feed_forward_length(int(c["intermediate_size"]))
    w.add_head_count(int(heads))
    w.add_head_count_kv(int(kv))
    w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(int(c["vocab_size"]))
    rope = _rope_params(c)
    full = rope.get("full_attention", {})
    w.add_rope_freq_base(float(full.get("rope_theta", 10000.0)))
    if full.get("rope_type", full.get("type")) == "linear":
        w.add_rope_scaling_type(__import__("gguf").RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(full["factor"]))
    if arch == "llama":
        w.add_rope_dimension_count(int(head_dim))
    if arch == "llama" and head_dim * heads != c["hidden_size"] or arch in ("qwen3", "gemma3"):
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
    if arch == "gemma3":
        types = c.get("layer_types") or []
        if c.get("sliding_window") and types:
            w.add_sliding_window(int(c["sliding_window"]))
            w.add_sliding_window_pattern([t == "sliding_attention" for t in types])
            if "sliding_attention" in rope:
                w.add_rope_freq_base_swa(float(rope["sliding_attention"].get("rope_theta", 10000.0)))
        if c.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(c["final_logit_softcapping"]))


def write_gguf(model_dir: str | Path, out_file: str | Path, *, quant: str = "f32", name: str | None = None,
               vocab: GGUFVocab | None = None) -> Path:
    """Convert a Hugging Face checkpoint directory (safetensors, ``config.json``, fast tokenizer) into one GGUF file.

    Args:
        model_dir: the checkpoint (a folded export: plain architecture, one config).
        out_file: the ``.gguf`` path to write (overwritten; callers write into a temporary directory).
        quant: tensor type of the matrices: ``f32``, ``f16``, ``bf16`` or ``q8_0``.
        name: ``general.name``.
        vocab: the tokenizer as :func:`read_vocab` returns it (read from ``model_dir`` when None).

    Returns:
        ``out_file`` as a Path.

    Raises:
        ConfigError: unsupported family, setting, tokenizer or quant (:func:`gguf_arch`, :func:`read_vocab`).
    """
    import gguf

    check_quant(quant)
    model_dir, out_file = Path(model_dir), Path(out_file)
    config = json.loads((model_dir / "config.json").read_text())
    arch = gguf_arch(config, source=str(model_dir))
    n_layers = int(config["num_hidden_layers"])
    if arch == "gemma3" and config.get("layer_types"):
        default = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)]
        if list(config["layer_types"]) != default:
            warnings.warn("the path's attention types (sliding/full per layer) are not Gemma 3's every-6th-layer "
                          "pattern; they are written per layer (gemma3.attention.sliding_window_pattern), which "
                          "llama.cpp reads but older llama.cpp/Ollama builds and transformers' GGUF loader ignore",
                          UserWarning, stacklevel=2)
    window = config.get("sliding_window")
    if arch != "gemma3" and window and config.get("use_sliding_window", True) and \
            window < config.get("max_position_embeddings", 0):
        warnings.warn(f"sliding_window={window}: llama.cpp's {arch} attends to the whole context, so the GGUF file "
                      f"computes the same only for sequences up to {window} tokens", UserWarning, stacklevel=2)
    vocab = vocab or read_vocab(model_dir, int(config["vocab_size"]), source=name)
    name_map = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), n_layers)
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    w = gguf.GGUFWriter(str(out_file), arch)
    try:
        w.add_name(name or model_dir.name)
        w.add_file_type(_file_type(quant))
        _write_hparams(w, arch, config, n_layers)
        _write_vocab(w, vocab)
        for hf_name, t in _tensors(model_dir):
            if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
                continue
            stem, _, suffix = hf_name.rpartition(".")
            target = name_map.get_name(stem)
            if target is None:
                raise ConfigError(f"tensor {hf_name!r} of {model_dir} has no llama.cpp name for architecture {arch!r}; "
                                  "this checkpoint cannot be written as GGUF")
            if arch in _PERMUTE_QK and stem.endswith(("self_attn.q_proj", "self_attn.k_proj")):
                t = _permute_rows(t, heads if stem.endswith("q_proj") else kv)
            if arch in _NORM_PLUS_ONE and stem.endswith("norm") and suffix == "weight":
                t = t.to(torch.float32) + 1.0
            data, raw = _encode(t, quant)
            w.add_tensor(f"{target}.{suffix}", data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    return out_file


# ====================================================================== Ollama
_CHATML = ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
           '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
           '<|im_start|>assistant\n')
_GEMMA = ('{{- range $i, $_ := .Messages }}{{- if eq .Role "user" }}<start_of_turn>user\n'
          '{{ if and (eq $i 0) $.System }}{{ $.System }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n'
          '{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n{{ end }}'
          '{{- end }}<start_of_turn>model\n')
_GO_TEMPLATES = {"chatml": (("<|im_start|>", "<|im_end|>"), _CHATML, ["<|im_start|>", "<|im_end|>"]),
                 "gemma": (("<start_of_turn>", "<end_of_turn>"), _GEMMA, ["<end_of_turn>"])}


def chat_template_kind(template: str | None) -> str | None:
    """``"chatml"``, ``"gemma"`` or None: the turn format a Jinja chat template writes, when Ollama's Go template
    for it is known."""
    if not template:
        return None
    for kind, (markers, _, _) in _GO_TEMPLATES.items():
        if all(m in template for m in markers):
            return kind
    return None


def modelfile(gguf_name: str, vocab: GGUFVocab, generation: Mapping[str, Any] | None = None) -> str:
    """An Ollama ``Modelfile`` for a GGUF file in the same directory.

    The chat template is converted for ChatML (``<|im_start|>``/``<|im_end|>``: SmolLM2, Qwen) and Gemma turns
    (``<start_of_turn>``); a default system message the Jinja template writes, tool calls and other template
    logic are not carried over. Other templates are left out (a comment says so): Ollama then uses the template
    in the GGUF metadata where it recognises it.
    """
    lines = ["# ollama create NAME -f Modelfile   (written by dfsmerge export --format gguf)", f"FROM ./{gguf_name}"]
    kind = chat_template_kind(vocab.chat_template)
    stops: list[str] = []
    if kind is not None:
        _, go, stops = _GO_TEMPLATES[kind]
        lines.append(f'TEMPLATE """{go}"""')
    elif vocab.chat_template:
        lines.append("# TEMPLATE: this chat template has no Go-template conversion in dfsmerge (only ChatML and "
                     "Gemma turns); it is stored in the GGUF metadata (tokenizer.chat_template)")
    eos = vocab.special.get("eos")
    if eos is not None and vocab.tokens[eos] not in stops:
        stops.append(vocab.tokens[eos])
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    gen = dict(generation or {})
    params = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repeat_penalty"}
    for hf, ol in params.items():
        if gen.get(hf) is not None and gen.get("do_sample", True):
            lines.append(f"PARAMETER {ol} {gen[hf]}")
    return "\n".join(lines) + "\n"


__all__ = ["GGUFVocab", "GGUF_FAMILIES", "QUANTS", "chat_template_kind", "check_quant", "gguf_arch", "modelfile",
           "read_vocab", "write_gguf"]
