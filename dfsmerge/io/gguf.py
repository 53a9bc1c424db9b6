"""GGUF files as sources: dequantised once through transformers into a cached Hugging Face checkpoint.

Many users hold their models as GGUF (llama.cpp's format). transformers reads a ``.gguf`` with the ``gguf``
package (``from_pretrained(dir, gguf_file=...)``), dequantising every tensor to fp32; dfsmerge turns that into an
ordinary checkpoint directory (safetensors, ``config.json``, tokenizer, chat template, generation config) so every
other part of dfsmerge reads it like any other model. Conversions are cached under
``$DFSMERGE_CACHE/gguf/<sha256 of the file>`` (default ``~/.cache/dfsmerge``): keyed by content, so a renamed or
moved file is not converted twice and a changed one never reuses a stale conversion.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dfsmerge.errors import CheckpointError, OutputExistsError

__all__ = ["cache_root", "cached_gguf_checkpoint", "convert_gguf", "file_sha256", "gguf_model_type", "is_gguf"]

_DONE = ".dfsmerge-gguf.json"  # written last: a directory without it is an interrupted conversion


def cache_root() -> Path:
    """dfsmerge's cache directory: ``$DFSMERGE_CACHE`` if set, else ``~/.cache/dfsmerge``."""
    env = os.environ.get("DFSMERGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dfsmerge"


def is_gguf(ref: str | Path) -> bool:
    p = Path(str(ref)).expanduser()
    return p.suffix.lower() == ".gguf" and p.is_file()


def file_sha256(path: str | Path, *, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def gguf_model_type(path: str | Path) -> str:
    """The transformers ``model_type`` a GGUF file converts to, read from its metadata (no tensor is read).

    Raises:
        CheckpointError: not a GGUF file, or an architecture transformers cannot read from GGUF.
    """
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    except ImportError as e:
        raise CheckpointError(f"model {str(path)!r}: reading GGUF needs the gguf package ({e}); "
                              "pip install gguf") from None
    except (ValueError, KeyError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"model {str(path)!r}: transformers cannot read this GGUF file ({msg}); "
                              "convert it with llama.cpp's tools or use the original checkpoint") from None
    return str(parsed["config"]["model_type"])


def _check_supported(path: Path) -> str:
    from dfsmerge.arch import get_architecture

    model_type = gguf_model_type(path)
    get_architecture(model_type, source=str(path))  # one-line ArchitectureError naming the supported list
    return model_type


def _write_checkpoint(path: Path, out: Path, *, dtype: Any) -> None:
    """Dequantise ``path`` with transformers and save it as a plain checkpoint into ``out`` (an empty dir)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    kwargs = dict(gguf_file=path.name, dtype=dtype or torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the GGUF quantizer refuses save_pretrained until it is removed
        quantizer.remove_quantization_config(model)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.save_pretrained(str(out))
    if not (out / "generation_config.json").exists():
        with contextlib.suppress(ValueError):  # a config with nothing to generate with
            GenerationConfig.from_model_config(model.config).save_pretrained(str(out))


def convert_gguf(path: str | Path, out_dir: str | Path, *, dtype: Any = None, force: bool = False) -> Path:
    """Convert a ``.gguf`` file into a Hugging Face checkpoint directory (written atomically).

    Args:
        path: the GGUF file.
        out_dir: target directory; must not exist unless ``force``.
        dtype: torch dtype of the saved weights (default float32, what transformers dequantises to).
        force: replace an existing ``out_dir``.

    Returns:
        ``out_dir``.

    Raises:
        CheckpointError: no such file, or not a GGUF transformers can read.
        ArchitectureError: the model's architecture is not supported by dfsmerge.
        OutputExistsError: ``out_dir`` exists and ``force`` is False.
    """
    path = Path(str(path)).expanduser()
    out = Path(out_dir).expanduser()
    if not path.is_file():
        raise CheckpointError(f"gguf file {str(path)!r} does not exist; check the path")
    if out.exists() and not force:
        raise OutputExistsError(f"output {str(out)!r} already exists; pass --force to replace it or choose "
                                "another directory")
    model_type = _check_supported(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_checkpoint(path, tmp, dtype=dtype)
        (tmp / _DONE).write_text(json.dumps({"source": path.name, "model_type": model_type}) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def cached_gguf_checkpoint(path: str | Path, *, sha256: str | None = None) -> Path:
    """The converted checkpoint of a GGUF file, converting it on first use (cached by content hash).

    Args:
        sha256: the file's digest when the caller has just verified it (skips hashing it again).

    Raises:
        CheckpointError, ArchitectureError: as :func:`convert_gguf`.
    """
    path = Path(str(path)).expanduser().resolve()
    _check_supported(path)  # before hashing or converting: an unsupported family fails in a second
    target = cache_root() / "gguf" / (sha256 or file_sha256(path))[:32]
    if (target / _DONE).is_file():
        return target
    return convert_gguf(path, target, force=True)
