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

from dfsmerge.errors import CheckpointError, DfsmergeError, OutputExistsError
from dfsmerge.io.cache import build_once, cache_root

__all__ = ["cached_gguf_checkpoint", "check_gguf_file", "convert_gguf", "file_sha256", "gguf_model_type",
           "is_gguf"]

_DONE = ".dfsmerge-gguf.json"  # written last: a directory without it is an interrupted conversion


def is_gguf(ref: str | Path) -> bool:
    p = Path(str(ref)).expanduser()
    return p.suffix.lower() == ".gguf" and p.is_file()


def file_sha256(path: str | Path, *, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# GGUF value types (gguf.GGUFValueType) -> fixed byte size; 8 = string, 9 = array
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_KEY = 1 << 16  # a metadata key is a short dotted name
_MAX_DIMS = 4  # GGML_MAX_DIMS
_HEADER_CHUNK = 1 << 20


class _Cursor:
    """Bounded reads over a file: every declared size is checked against the bytes left before it is used."""

    def __init__(self, f, size: int, path: Path):
        self.f, self.size, self.path, self.pos = f, size, path, 0

    def bad(self, what: str) -> CheckpointError:
        return CheckpointError(f"model {str(self.path)!r}: not a valid GGUF file ({what}, at byte {self.pos} of "
                               f"{self.size}); it is corrupt or truncated, download it again")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.size - self.pos:
            raise self.bad(f"{what} needs {n} bytes, {self.size - self.pos} left")
        b = self.f.read(n)
        self.pos += n
        return b

    def skip(self, n: int, what: str) -> None:
        if n < 0 or n > self.size - self.pos:
            raise self.bad(f"{what} declares {n} bytes, {self.size - self.pos} left")
        self.pos += n
        self.f.seek(self.pos)

    def u(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "little")

    def string(self, what: str, *, keep: int | None) -> str | None:
        """A GGUF string (u64 length + bytes); read when at most ``keep`` bytes, else skipped."""
        n = self.u(8, f"{what} length")
        if keep is not None and n <= keep:
            return self.take(n, what).decode("utf-8", errors="replace")
        if keep is not None and what == "key":
            raise self.bad(f"a metadata key of {n} bytes")
        self.skip(n, what)
        return None


def check_gguf_file(path: str | Path) -> dict[str, Any]:
    """Validate a GGUF file's header against the file's size before any library reads it (GGUF files come from the
    internet: a crafted count, string length or shape must not make a reader loop or allocate at its word).

    Every count is bounded by the bytes that are left (each entry takes at least its fixed part), tensor ranks by
    GGML's 4, every tensor's data range must lie inside the file; nothing is allocated beyond a key or a short
    string value, so a check costs O(header) time and no memory whatever the file declares.

    Returns:
        ``{"version", "n_tensors", "n_kv", "architecture", "alignment", "data_offset"}``.

    Raises:
        CheckpointError: naming the first inconsistency.
    """
    from gguf import GGML_QUANT_SIZES

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb", buffering=_HEADER_CHUNK) as f:
        c = _Cursor(f, size, path)
        if (c.take(4, "magic") if size >= 4 else b"") != b"GGUF":
            raise c.bad("no GGUF magic number")
        version = c.u(4, "version")
        if version not in (2, 3):
            raise c.bad(f"version {version}; dfsmerge reads GGUF versions 2 and 3")
        n_tensors, n_kv = c.u(8, "tensor count"), c.u(8, "metadata count")
        # each metadata entry takes >= 8 (key length) + 4 (type) + 1 bytes, each tensor entry >= 8 + 4 + 4 + 8
        if n_kv * 13 > size - c.pos:
            raise c.bad(f"{n_kv} metadata entries declared, the file holds at most {(size - c.pos) // 13}")
        if n_tensors * 24 > size - c.pos:
            raise c.bad(f"{n_tensors} tensors declared, the file holds at most {(size - c.pos) // 24}")
        arch, alignment = None, 32
        for _ in range(n_kv):
            key = c.string("key", keep=_MAX_KEY)
            vtype = c.u(4, f"type of {key!r}")
            if vtype == _ARRAY:
                etype, count = c.u(4, f"{key!r} element type"), c.u(8, f"{key!r} length")
                if etype == _STRING:
                    if count * 8 > size - c.pos:
                        raise c.bad(f"{key!r} declares {count} strings")
                    for _ in range(count):
                        c.string(key, keep=None)
                elif etype in _SCALAR:
                    c.skip(count * _SCALAR[etype], key)
                else:
                    raise c.bad(f"{key!r} is an array of unknown type {etype}")
            elif vtype == _STRING:
                v = c.string(key, keep=4096)
                if key == "general.architecture":
                    arch = v
            elif vtype in _SCALAR:
                raw = c.take(_SCALAR[vtype], key)
                if key == "general.alignment":
                    alignment = int.from_bytes(raw, "little")
            else:
                raise c.bad(f"metadata {key!r} has unknown type {vtype}")
        if alignment <= 0 or alignment > 1 << 20 or alignment & (alignment - 1):
            raise c.bad(f"general.alignment={alignment} is not a power of two up to 1 MiB")
        tensors, n_elements = [], 0
        for _ in range(n_tensors):
            name = c.string("tensor name", keep=_MAX_KEY) or "?"
            n_dims = c.u(4, f"rank of {name!r}")
            if n_dims > _MAX_DIMS:
                raise c.bad(f"tensor {name!r} has rank {n_dims} (GGML allows {_MAX_DIMS})")
            dims = [c.u(8, f"shape of {name!r}") for _ in range(n_dims)]
            ttype, offset = c.u(4, f"type of {name!r}"), c.u(8, f"offset of {name!r}")
            if ttype not in GGML_QUANT_SIZES:
                raise c.bad(f"tensor {name!r} has unknown type {ttype}")
            block, nbytes_block = GGML_QUANT_SIZES[ttype]
            n = 1
            for d in dims:
                n *= d
            if n % block:
                raise c.bad(f"tensor {name!r} of shape {dims} is not a whole number of {block}-element blocks")
            tensors.append((name, offset, n // block * nbytes_block))
            n_elements += n
        data = c.pos + (-c.pos) % alignment
        for name, offset, nbytes in tensors:
            if data + offset + nbytes > size:
                raise CheckpointError(f"model {str(path)!r}: GGUF tensor {name!r} ends at byte {data + offset + nbytes}"
                                      f" of a {size}-byte file (truncated or corrupt); download it again")
    return {"version": version, "n_tensors": n_tensors, "n_kv": n_kv, "architecture": arch, "alignment": alignment,
            "data_offset": data, "n_elements": n_elements}


def _check_declared_size(path: Path, config: dict[str, Any], n_elements: int) -> None:
    """The model the metadata describe (built on the meta device: no memory) must be backed by the file's tensors:
    transformers allocates the model from the metadata before it reads a tensor, so a crafted file declaring a huge
    model (or one whose hyperparameters are missing and default to a 7B) would allocate it all."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    model_type = cfg.pop("model_type")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))
    n_params = sum(p.numel() for p in model.parameters())
    if n_params > 2 * n_elements:
        raise CheckpointError(f"model {str(path)!r}: the GGUF metadata describe a {model_type} of {n_params:,} "
                              f"parameters but the file's tensors hold {n_elements:,} values; it is corrupt or "
                              "crafted (missing or wrong hyperparameters), download it again")


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def gguf_model_type(path: str | Path) -> str:
    """The transformers ``model_type`` a GGUF file converts to, read from its metadata (no tensor is read).

    Raises:
        CheckpointError: not a GGUF file, or an architecture transformers cannot read from GGUF.
    """
    try:
        header = check_gguf_file(path)  # before the gguf package trusts any declared size
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        with _quiet_transformers():  # its warnings about a crafted file's gaps would precede our one-line error
            parsed = load_gguf_checkpoint(str(path), return_tensors=False)
        _check_declared_size(Path(path), parsed["config"], header["n_elements"])
    except ImportError as e:
        raise CheckpointError(f"model {str(path)!r}: reading GGUF needs the gguf package ({e}); "
                              "pip install gguf") from None
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - an untrusted file: whatever the reader trips on is the file's fault
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
    from transformers import AutoModelForCausalLM, GenerationConfig

    from dfsmerge.io.tokenizer import load_tokenizer

    kwargs = dict(gguf_file=path.name, dtype=dtype or torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the GGUF quantizer refuses save_pretrained until it is removed
        quantizer.remove_quantization_config(model)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer = load_tokenizer(path.parent, gguf_file=path.name)
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
        try:
            _write_checkpoint(path, tmp, dtype=dtype)
        except (DfsmergeError, OSError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - a valid header over bad content: the file's fault, in one line
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"model {str(path)!r}: the GGUF file's content cannot be converted "
                                  f"({type(e).__name__}: {msg}); it is corrupt, download it again") from None
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
    if not path.is_file():
        raise CheckpointError(f"gguf file {str(path)!r} does not exist; check the path")
    target = cache_root() / "gguf" / (sha256 or file_sha256(path))[:32]
    # (convert_gguf checks the family before dequantising anything)
    return build_once(target, lambda: _reuse(target, path), lambda: convert_gguf(path, target, force=True))


def _reuse(target: Path, path: Path) -> bool:
    """Whether ``target`` holds a finished conversion, its family checked from the record the conversion wrote.

    Reading the family from the file again would parse its whole metadata, vocabulary included (4-6 s for a
    49k-token vocabulary), on every use of a cached model: a search opens its sources a dozen times.
    """
    try:
        done = json.loads((target / _DONE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(done, dict) or not isinstance(done.get("model_type"), str):
        return False  # an older or damaged record: converted again
    from dfsmerge.arch import get_architecture

    get_architecture(done["model_type"], source=str(path))  # a family this version does not support: one line
    return True
