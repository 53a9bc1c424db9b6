"""Model references to checkpoint directories, opened for lazy reading (:func:`open_checkpoint`).

A model is a local directory, a ``.gguf`` file (converted once, :mod:`dfsmerge.io.gguf`), a PEFT LoRA adapter
(``DIR`` or ``BASE+DIR``, applied once, :mod:`dfsmerge.io.adapter`), a ``real:<name>`` fixture or a Hugging Face
hub id; with no network a hub id gets an error that says so plainly. The reader itself is
:class:`~dfsmerge.io.checkpoint.CheckpointReader` (re-exported here).

Imports go one way: this module uses the adapter builder, the GGUF converter and the reader; none of them imports it
(the adapter builder is handed its base model's resolved directory).
"""

from __future__ import annotations

import re
from pathlib import Path

from dfsmerge.errors import CheckpointError
from dfsmerge.io.checkpoint import CheckpointReader
from dfsmerge.io.formats import TOKENIZER_FILES

__all__ = ["TOKENIZER_FILES", "CheckpointReader", "open_checkpoint", "resolve_model_path"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_model_path(ref: str | Path, *, revision: str | None = None) -> Path:
    """A local directory for ``ref``: the directory itself, a ``.gguf`` file's cached conversion, a ``real:<name>``
    fixture (:mod:`dfsmerge.io.realmodels`), or a hub snapshot (cache first, then download).

    Raises:
        CheckpointError: ``ref`` is neither a directory, a GGUF file nor a reachable hub id.
        ArchitectureError: a GGUF file of an unsupported architecture.
    """
    if str(ref).startswith("real:"):
        from dfsmerge.io.realmodels import real_model_dir

        return real_model_dir(str(ref)[len("real:"):])
    p = Path(str(ref)).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        from dfsmerge.io.gguf import cached_gguf_checkpoint

        return cached_gguf_checkpoint(p)
    if (p / "adapter_config.json").is_file() or "+" in str(ref):  # a PEFT LoRA adapter (DIR or BASE+DIR)
        from dfsmerge.io.adapter import adapter_base_ref, adapter_source, cached_adapter_checkpoint

        if (src := adapter_source(ref)) is not None:
            adapter_dir, override = src
            base_path = resolve_model_path(adapter_base_ref(adapter_dir, override))
            return cached_adapter_checkpoint(adapter_dir, base_path, override)
    if p.exists():
        return p
    ref = str(ref)
    if not _HUB_ID.match(ref):
        raise CheckpointError(f"model {ref!r}: no such directory, and not a Hugging Face hub id (org/name); "
                              "check the path")
    from huggingface_hub import snapshot_download
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(ref, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(ref, revision=revision, allow_patterns=patterns))
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"model {ref!r}: not a local directory and could not be downloaded from the Hugging Face hub "
            f"({type(e).__name__}: {msg}); with no network, download it elsewhere and pass its local directory"
        ) from None


def open_checkpoint(ref: str | Path, *, allow_pickle: bool = False, revision: str | None = None,
                    name: str | None = None) -> CheckpointReader:
    """Open a model given as a local directory or a hub id for lazy reading.

    Args:
        ref: local checkpoint directory or hub id.
        allow_pickle: permit ``*.bin`` checkpoints (loaded with ``weights_only=True``).
    Returns:
        A :class:`CheckpointReader`.
    Raises:
        CheckpointError: missing path, unreachable hub id, no weights, pickle without permission.
    """
    return CheckpointReader(resolve_model_path(ref, revision=revision), allow_pickle=allow_pickle,
                            name=name or str(ref))
