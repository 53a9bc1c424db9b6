"""PEFT LoRA adapters as sources: an adapter directory resolves to a cached full checkpoint (base + adapter).

Most fine-tunes are published as LoRA adapters. Wherever dfsmerge takes a model (merge recipes, plans, search
configs, ``eval``) it may be given

- an adapter directory (one holding ``adapter_config.json``): applied to its ``base_model_name_or_path``, or
- ``BASE+ADAPTER`` (mergekit's model-reference syntax): applied to ``BASE`` instead (the override).

The adapter is applied once, tensor by tensor, as PEFT's ``merge_and_unload`` does: ``W + B @ A * scaling`` for each
LoRA module, with ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), per-module ``r`` and
``lora_alpha`` from ``rank_pattern`` / ``alpha_pattern``; embedding factors (``lora_embedding_A/B``) give
``(B @ A)^T * scaling``; ``modules_to_save`` tensors replace the base's; ``lora_B.bias`` is added only when
``lora_bias`` is set (PEFT ignores it otherwise). The sum is computed in fp32 and rounded once to the base's dtype.
The result is cached under ``$DFSMERGE_CACHE/adapters/<hash>`` (default ``~/.cache/dfsmerge``), keyed by the
adapter's content (config and weights, sha256) and the base's identity (its resolved path and the size and
modification time of its files), written atomically and reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from dfsmerge.errors import CheckpointError
from dfsmerge.io.cache import build_once, cache_root
from dfsmerge.io.checkpoint import CheckpointReader
from dfsmerge.io.formats import TOKENIZER_FILES
from dfsmerge.io.gguf import file_sha256
from dfsmerge.io.writer import ShardedWriter

__all__ = ["ADAPTER_CONFIG", "adapter_base_ref", "adapter_source", "apply_adapter", "cached_adapter_checkpoint",
           "is_adapter_dir"]

ADAPTER_CONFIG = "adapter_config.json"
_WEIGHTS = "adapter_model.safetensors"
_DONE = ".dfsmerge-adapter.json"  # written last: a cache entry without it is an interrupted build
_FORMAT = 1  # bump when the way an adapter is applied changes, so old cache entries are not reused


def is_adapter_dir(p: str | Path) -> bool:
    p = Path(str(p)).expanduser()
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file()


def adapter_source(ref: str | Path) -> tuple[Path, str | None] | None:
    """``(adapter_dir, base_override)`` when ``ref`` names an adapter (``DIR`` or ``BASE+DIR``), else None."""
    s = str(ref)
    if is_adapter_dir(s):
        return Path(s).expanduser(), None
    if "+" in s and not Path(s).expanduser().exists():
        base, lora = s.split("+", 1)
        if is_adapter_dir(lora):
            return Path(lora).expanduser(), base
    return None


_MAX_CONFIG = 1 << 20  # PEFT writes about a kilobyte; an adapter from the internet is read only up to this


def _bad_config(adapter_dir: Path, what: str) -> CheckpointError:
    return CheckpointError(f"adapter {str(adapter_dir)!r}: {ADAPTER_CONFIG} {what}; re-save the adapter with PEFT")


def _read_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / ADAPTER_CONFIG
    if path.stat().st_size > _MAX_CONFIG:
        raise _bad_config(adapter_dir, f"is {path.stat().st_size} bytes (a PEFT config is a few kilobytes)")
    try:
        cfg = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise _bad_config(adapter_dir, f"is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(cfg, dict):
        raise _bad_config(adapter_dir, f"holds a {type(cfg).__name__}, not an object")
    for key in ("r", "lora_alpha"):
        v = cfg.get(key, 8)
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < 1e9:
            raise _bad_config(adapter_dir, f"has {key}={v!r}; it must be a positive number")
    for key in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(key) or {}
        if not isinstance(pat, dict) or not all(isinstance(k, str) and len(k) < 1024 and isinstance(v, int | float)
                                                and not isinstance(v, bool) and 0 < v < 1e9 for k, v in pat.items()):
            raise _bad_config(adapter_dir, f"has a {key} that is not {{module pattern: positive number}}")
        for k in pat:
            try:
                re.compile(k)
            except re.error as e:
                raise _bad_config(adapter_dir, f"has {key} key {k[:80]!r}, not a regular expression ({e})") from None
    kind = cfg.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise CheckpointError(f"adapter {str(adapter_dir)!r}: peft_type={kind!r} is not supported; only LoRA "
                              "adapters can be sources (merge it with peft's merge_and_unload and pass the result)")
    if cfg.get("use_dora"):
        raise CheckpointError(f"adapter {str(adapter_dir)!r}: use_dora=true is not supported; merge it with peft's "
                              "merge_and_unload and pass the merged checkpoint")
    if not (adapter_dir / _WEIGHTS).is_file():
        raise CheckpointError(f"adapter {str(adapter_dir)!r}: no {_WEIGHTS}; adapters are read from safetensors "
                              "(convert adapter_model.bin with peft and save_pretrained)")
    return cfg


def adapter_base_ref(adapter_dir: str | Path, override: str | None = None) -> str:
    """The reference of the model the adapter applies to: ``override``, else its ``base_model_name_or_path`` (taken
    relative to the adapter when it exists there); the caller resolves it to a directory.

    Raises:
        CheckpointError: not a LoRA adapter, or no base named anywhere.
    """
    adapter_dir = Path(adapter_dir).expanduser()
    return _base_ref(adapter_dir, _read_config(adapter_dir), override)


def _base_ref(adapter_dir: Path, cfg: dict[str, Any], override: str | None) -> str:
    ref = override or cfg.get("base_model_name_or_path")
    if not ref:
        raise CheckpointError(f"adapter {str(adapter_dir)!r}: adapter_config.json names no base_model_name_or_path; "
                              f"give the base as BASE+{adapter_dir}")
    if not override and not Path(ref).expanduser().exists() and (adapter_dir / ref).exists():
        ref = str(adapter_dir / ref)  # a base given relative to the adapter
    return ref


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():  # PEFT's rule: the first pattern matching a suffix of the module path
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _scaling(cfg: dict[str, Any], module: str) -> float:
    r = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8))
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _adapter_index(names: list[str]) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """``({module: {"A": key, "B": key, "bias": key, "embedding": "1"?}}, {tensor name: key})`` of an adapter file:
    LoRA factors per module and full tensors (``modules_to_save``) per target tensor name."""
    lora: dict[str, dict[str, str]] = {}
    full: dict[str, str] = {}
    for key in names:
        name = key.removeprefix("base_model.model.")
        m = re.match(r"(.+)\.lora_(embedding_)?([AB])(?:\.[^.]+)?\.(weight|bias)$", name) or \
            re.match(r"(.+)\.lora_(embedding_)?([AB])()$", name)
        if m:
            mod, emb, ab, kind = m.groups()
            entry = lora.setdefault(mod, {})
            entry["bias" if kind == "bias" else ab] = key
            if emb:
                entry["embedding"] = "1"
        else:
            full[re.sub(r"\.(modules_to_save(\.[^.]+)?|base_layer)\.", ".", name)] = key
    return lora, full


def apply_adapter(adapter_dir: str | Path, out_dir: str | Path, base_path: str | Path, *, base_ref: str | None = None,
                  force: bool = False, allow_pickle: bool = False) -> Path:
    """Write base + LoRA adapter as a full checkpoint into ``out_dir`` (atomically, one tensor at a time).

    Args:
        adapter_dir: a PEFT LoRA directory (``adapter_config.json``, ``adapter_model.safetensors``).
        base_path: the base model's checkpoint directory (see :func:`adapter_base_ref`; resolved by the caller).
        base_ref: how the base was named, for messages (default ``base_path``).
    Returns:
        ``out_dir``.
    Raises:
        CheckpointError: not a LoRA adapter, or factors that do not fit the base's tensors.
    """
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir).expanduser()
    cfg = _read_config(adapter_dir)
    base_ref = base_ref or str(base_path)
    reader = CheckpointReader(base_path, allow_pickle=allow_pickle, name=base_ref)
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
    try:
        h = safe_open(str(adapter_dir / _WEIGHTS), framework="pt")  # checks header size and offsets vs. the file
    except Exception as e:  # noqa: BLE001 - safetensors' own errors on a corrupt file
        raise CheckpointError(f"adapter {str(adapter_dir)!r}: {_WEIGHTS} is not a valid safetensors file "
                              f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}); it is corrupt or "
                              "truncated, download it again") from None
    with h:
        lora, full = _adapter_index(list(h.keys()))
        targets = {f"{mod}.weight": mod for mod in lora}
        unknown = [t for t in list(targets) + list(full) if t not in reader]
        if unknown:
            raise CheckpointError(f"adapter {str(adapter_dir)!r}: tensor {unknown[0]!r} is not in base "
                                  f"{base_ref!r}; give the adapter's own base as BASE+{adapter_dir}")
        config = dict(reader.config)
        with ShardedWriter(out_dir, force=force) as w:
            for name in reader.keys():  # noqa: SIM118 - a reader, not a dict
                t = reader.get_tensor(name)
                if name in full:
                    shape = tuple(h.get_slice(full[name]).get_shape())
                    resized = name.endswith("embed_tokens.weight") or name.endswith("lm_head.weight")
                    if shape != tuple(t.shape) and not (resized and shape[1:] == tuple(t.shape[1:])):
                        raise CheckpointError(f"adapter {str(adapter_dir)!r}: saved tensor {name} has shape {shape} "
                                              f"but the base's has {tuple(t.shape)}; use the adapter's own base")
                    new = h.get_tensor(full[name]).to(t.dtype)
                    if name.endswith("embed_tokens.weight") and new.shape != t.shape:
                        config["vocab_size"] = new.shape[0]
                    t = new
                if name in targets:  # after a saved base layer (PEFT saves targeted embeddings whole)
                    t = _apply_lora(h, lora[targets[name]], t, _scaling(cfg, targets[name]), fan_in_fan_out,
                                    name=name, adapter=adapter_dir)
                elif name.endswith(".bias") and name[:-5] in lora and cfg.get("lora_bias") \
                        and "bias" in lora[name[:-5]]:
                    t = (t.float() + h.get_tensor(lora[name[:-5]]["bias"]).float()).to(t.dtype)
                w.add_tensor(name, t)
            w.write_json("config.json", config)
            tok_src = adapter_dir if any((adapter_dir / f).is_file() for f in TOKENIZER_FILES) else reader.path
            for f in TOKENIZER_FILES:
                if (tok_src / f).is_file():
                    w.copy_file(tok_src / f, f)
            if (reader.path / "generation_config.json").is_file():
                w.copy_file(reader.path / "generation_config.json")
            w.write_json(_DONE, {"adapter": str(adapter_dir.resolve()), "base": base_ref, "format": _FORMAT})
    return Path(out_dir)


def _apply_lora(h, entry: dict[str, str], weight: torch.Tensor, scaling: float, fan_in_fan_out: bool, *,
                name: str, adapter: Path) -> torch.Tensor:
    if "A" not in entry or "B" not in entry:
        raise CheckpointError(f"adapter {str(adapter)!r}: {name} has only one LoRA factor; the adapter file is "
                              "incomplete, re-save it")
    # shapes from the header first: factors of the wrong sizes would make a product of any size
    sa, sb = tuple(h.get_slice(entry["A"]).get_shape()), tuple(h.get_slice(entry["B"]).get_shape())
    want = tuple(weight.shape)[::-1] if "embedding" in entry or fan_in_fan_out else tuple(weight.shape)
    if len(sa) != 2 or len(sb) != 2 or sb[1] != sa[0] or (sb[0], sa[1]) != want:
        raise CheckpointError(f"adapter {str(adapter)!r}: LoRA factors of {name} have shapes A {sa} and B {sb}, "
                              f"which do not make the base tensor's {tuple(weight.shape)}; use the adapter's own base")
    a, b = h.get_tensor(entry["A"]).float(), h.get_tensor(entry["B"]).float()
    delta = b @ a  # (out, r) @ (r, in) -> (out, in); embeddings: (D, r) @ (r, V) -> (D, V)
    if "embedding" in entry or fan_in_fan_out:
        delta = delta.T
    if delta.shape != weight.shape:
        raise CheckpointError(f"adapter {str(adapter)!r}: LoRA delta of {name} has shape {tuple(delta.shape)} but "
                              f"the base tensor has {tuple(weight.shape)}; use the adapter's own base")
    return (weight.float() + delta * scaling).to(weight.dtype)


def _fingerprint(adapter_dir: Path, base_path: Path, override: str | None) -> str:
    h = hashlib.sha256(f"dfsmerge-adapter-{_FORMAT}\n".encode())
    h.update((adapter_dir / ADAPTER_CONFIG).read_bytes())
    h.update(file_sha256(adapter_dir / _WEIGHTS).encode())
    h.update(f"\nbase={base_path.resolve()}\noverride={override}\n".encode())
    for f in sorted(base_path.iterdir()):
        if f.is_file() and f.suffix in (".json", ".safetensors", ".bin"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def cached_adapter_checkpoint(adapter_dir: str | Path, base_path: str | Path, override: str | None = None) -> Path:
    """The full checkpoint of the base at ``base_path`` + the LoRA adapter, built on first use.

    Args:
        base_path: the resolved directory of :func:`adapter_base_ref` ``(adapter_dir, override)``.
        override: the base given as ``BASE+ADAPTER`` (part of the cache key), or None.
    Raises:
        CheckpointError: as :func:`apply_adapter`.
    """
    adapter_dir = Path(adapter_dir).expanduser().resolve()
    base_path = Path(base_path)
    target = cache_root() / "adapters" / _fingerprint(adapter_dir, base_path, override)
    return build_once(target, (target / _DONE).is_file, lambda: apply_adapter(
        adapter_dir, target, base_path, base_ref=adapter_base_ref(adapter_dir, override), force=True))
