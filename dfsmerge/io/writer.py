"""Sharded, atomic checkpoint writing.

Everything is written into a temporary directory beside the target and renamed into place at the end, so a
killed process never leaves a half-written model where a good one was (or where none was). Shards are streamed:
each tensor goes to disk as it arrives, so peak memory stays near one tensor, not one shard.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import uuid
from pathlib import Path
from typing import Any

import torch

from dfsmerge.errors import OutputExistsError
from dfsmerge.io.formats import TOKENIZER_FILES, TORCH_TO_SAFETENSORS

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes of ``size`` given as an int or a string like ``"5GB"`` / ``"500MiB"``."""
    if isinstance(size, int):
        return size
    s = size.strip().upper().replace(" ", "")
    for unit in sorted(_UNITS, key=len, reverse=True):
        if s.endswith(unit) and s[: -len(unit)].replace(".", "", 1).isdigit():
            return int(float(s[: -len(unit)]) * _UNITS[unit])
    if s.isdigit():
        return int(s)
    raise ValueError(f"max_shard_size={size!r} is not a size; use e.g. 5GB, 500MB or a number of bytes")


class _PlannedShard:
    """One safetensors file whose header is known up front (from a manifest): header first, data streamed in
    place, no second copy."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str]):
        self.path = path
        self.header: dict[str, Any] = {}
        self.expected: list[tuple[str, tuple[int, ...], torch.dtype]] = list(entries)
        offset = 0
        for name, shape, dtype in entries:
            n = math.prod(shape) * _itemsize(dtype)
            self.header[name] = {"dtype": TORCH_TO_SAFETENSORS[dtype], "shape": list(shape),
                                 "data_offsets": [offset, offset + n]}
            offset += n
        self.nbytes = offset
        head = json.dumps({"__metadata__": metadata, **self.header}, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        try:
            self._file.write(struct.pack("<Q", len(head)))
            self._file.write(head)
        except BaseException:
            self._file.close()
            raise
        self._next = 0
        self._rows_done = 0  # rows of expected[_next] written so far (add_rows)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        want_name, want_shape, want_dtype = self._want(name)
        if self._rows_done:
            raise RuntimeError(f"tensor {name!r} given whole while {want_name!r} is half written ({self._rows_done} "
                               f"of {want_shape[0]} rows)")
        t = tensor.detach().to("cpu").contiguous()
        if name != want_name or tuple(t.shape) != tuple(want_shape) or t.dtype != want_dtype:
            raise RuntimeError(f"writer manifest expected {want_name} {tuple(want_shape)} {want_dtype}, got {name} "
                               f"{tuple(t.shape)} {t.dtype}")
        self._write(t)
        self._next += 1

    def add_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Rows ``start : start + len(rows)`` (dim 0) of tensor ``name``, written where they belong in the file:
        parts arrive in row order and the next tensor begins once every row is written."""
        want_name, want_shape, want_dtype = self._want(name)
        t = rows.detach().to("cpu").contiguous()
        if (name != want_name or t.dtype != want_dtype or not want_shape or tuple(t.shape[1:]) != tuple(want_shape[1:])
                or start != self._rows_done or start + t.shape[0] > want_shape[0]):
            raise RuntimeError(f"writer manifest expected rows {self._rows_done}: of {want_name} {tuple(want_shape)} "
                               f"{want_dtype}, got rows {start}:{start + (t.shape[0] if t.dim() else 0)} of {name} "
                               f"{tuple(t.shape)} {t.dtype}")
        self._write(t)
        self._rows_done += t.shape[0]
        if self._rows_done == want_shape[0]:
            self._rows_done = 0
            self._next += 1

    def _want(self, name: str) -> tuple[str, tuple[int, ...], torch.dtype]:
        if self._next >= len(self.expected):
            raise RuntimeError(f"tensor {name!r} is beyond the writer's manifest")
        return self.expected[self._next]

    def _write(self, t: torch.Tensor) -> None:
        if t.numel():
            self._file.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))

    @property
    def complete(self) -> bool:
        return self._next == len(self.expected)

    def close(self, metadata: dict[str, str] | None = None) -> None:
        if not self.complete:
            raise RuntimeError(f"shard {self.path.name} got {self._next} of {len(self.expected)} tensors")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class _ShardStream:
    """One safetensors file written tensor by tensor: data to a side file, header + data joined at close."""

    def __init__(self, path: Path):
        self.path = path
        self._data_path = path.with_suffix(".data")
        self._data = open(self._data_path, "wb")  # noqa: SIM115 - closed in close()
        self.header: dict[str, Any] = {}
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype not in TORCH_TO_SAFETENSORS:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        n = len(raw) if isinstance(raw, bytes) else raw.nbytes
        self._data.write(memoryview(raw) if n else b"")
        self.header[name] = {"dtype": TORCH_TO_SAFETENSORS[t.dtype], "shape": list(t.shape),
                             "data_offsets": [self.nbytes, self.nbytes + n]}
        self.nbytes += n

    def close(self, metadata: dict[str, str]) -> None:
        self._data.close()
        head = json.dumps({"__metadata__": metadata, **self.header}, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(struct.pack("<Q", len(head)))
            out.write(head)
            shutil.copyfileobj(data, out, 16 << 20)
            out.flush()
            os.fsync(out.fileno())
        self._data_path.unlink()


class ShardedWriter:
    """Write a Hugging Face checkpoint directory atomically.

    Usage::

        with ShardedWriter(out_dir, max_shard_size="5GB", force=False) as w:
            w.add_tensor(name, tensor)        # streamed to the current shard
            w.add_tensor_rows(name, 0, rows)  # with a manifest: a large tensor written in row parts
            w.write_json("config.json", cfg)  # any side file
        # on normal exit: shards renamed, index written, directory renamed into place
        # on an exception: the temporary directory is removed and the target is untouched

    Raises:
        OutputExistsError: ``out_dir`` exists and ``force`` is False (checked before anything is written).
    """

    def __init__(self, out_dir: str | Path, *, max_shard_size: int | str = "5GB", force: bool = False,
                 manifest: list[tuple[str, tuple[int, ...], torch.dtype]] | None = None):
        self.out_dir = Path(out_dir).expanduser().resolve()
        self.max_shard_size = parse_size(max_shard_size)
        self.force = force
        self.manifest = manifest
        self.tmp_dir: Path | None = None
        self._shards: list[_ShardStream | _PlannedShard] = []
        self._current: _ShardStream | _PlannedShard | None = None
        self.total_size = 0
        self._pending = 0  # bytes of the tensor being added (a full disk's message counts it)

    def check_target(self) -> None:
        if self.out_dir.exists() and not self.force:
            raise OutputExistsError(f"output {self.out_dir} already exists; choose another path or pass --force "
                                    "to replace it")

    def __enter__(self) -> ShardedWriter:
        self.check_target()
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = self.out_dir.parent / f".{self.out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp_dir.mkdir()
        if self.manifest is not None:
            try:
                self._plan_shards()  # writes every shard's header
            except BaseException as e:
                self.abort()
                if self.manifest and isinstance(e, OSError):
                    self._pending = sum(math.prod(s) * _itemsize(d) for _, s, d in self.manifest)  # the shards' size
                self._raise_if_full(e)
                raise
        return self

    def _plan_shards(self) -> None:
        # With a manifest (every tensor's name, shape and dtype in write order) each shard's header is known up
        # front, so tensors are written straight to their final place.
        groups: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = []
        size = 0
        for entry in self.manifest:
            n = math.prod(entry[1]) * _itemsize(entry[2])
            if not groups or (size and size + n > self.max_shard_size):
                groups.append([])
                size = 0
            groups[-1].append(entry)
            size += n
        for i, entries in enumerate(groups):
            self._shards.append(_PlannedShard(self.tmp_dir / f"shard-{i:05d}.safetensors", entries, {"format": "pt"}))

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self._commit()
            except OSError as e:  # the index and side files, the rename
                self.abort()
                self._raise_if_full(e)
                raise
        else:
            self.abort()
            self._raise_if_full(exc)

    def _raise_if_full(self, exc: BaseException | None) -> None:
        from dfsmerge.io.diskspace import disk_full_error, is_disk_full

        if exc is not None and is_disk_full(exc):  # the target is untouched: say how much the shards alone need
            raise disk_full_error(self.out_dir, self.total_size + self._pending, at_least=True,
                                  fix="nothing was written there; free space and run the command again") from None

    def abort(self) -> None:
        for s in self._shards:
            f = s._file if isinstance(s, _PlannedShard) else s._data
            if not f.closed:
                f.close()
        if self.tmp_dir is not None and self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    # -- content --------------------------------------------------------------------------------
    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        n = tensor.numel() * tensor.element_size()
        self._pending = n
        if self.manifest is not None:
            shard = next((s for s in self._shards if not s.complete), None)
            if shard is None:
                raise RuntimeError(f"tensor {name!r} is not in the writer's manifest")
            shard.add(name, tensor)
            self.total_size += n
            return
        if self._current is None or (self._current.nbytes and self._current.nbytes + n > self.max_shard_size):
            self._current = _ShardStream(self.tmp_dir / f"shard-{len(self._shards):05d}.safetensors")
            self._shards.append(self._current)
        self._current.add(name, tensor)
        self.total_size += n

    def add_tensor_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Write rows ``start : start + len(rows)`` (dim 0) of tensor ``name`` straight to their place in the shard
        file, so a large tensor is never held whole: the header, written first, already holds its shape and dtype
        (from the manifest). Parts of one tensor come in row order, with nothing else in between.

        Raises:
            RuntimeError: the writer has no manifest, or the part is not the next expected one.
        """
        if self.manifest is None:
            raise RuntimeError(f"add_tensor_rows({name!r}) needs a writer with a manifest (shapes known up front)")
        shard = next((s for s in self._shards if not s.complete), None)
        if shard is None:
            raise RuntimeError(f"tensor {name!r} is not in the writer's manifest")
        shard.add_rows(name, start, rows)
        self.total_size += rows.numel() * rows.element_size()

    def write_json(self, rel: str, obj: Any) -> None:
        (self.tmp_dir / rel).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")

    def write_text(self, rel: str, text: str) -> None:
        (self.tmp_dir / rel).write_text(text)

    def copy_file(self, src: str | Path, rel: str | None = None) -> None:
        shutil.copy2(src, self.tmp_dir / (rel or Path(src).name))

    # -- finish ---------------------------------------------------------------------------------
    def _commit(self) -> None:
        n = len(self._shards)
        weight_map = {}
        for i, s in enumerate(self._shards):
            s.close({"format": "pt"})
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            s.path.rename(self.tmp_dir / final)
            weight_map.update({k: final for k in s.header})
        if n > 1:
            self.write_json("model.safetensors.index.json",
                            {"metadata": {"total_size": self.total_size}, "weight_map": weight_map})
        fsync_dir(self.tmp_dir)
        if self.out_dir.exists():
            if not self.force:  # appeared while we were writing
                self.abort()
                self.check_target()
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            self.out_dir.rename(old)
            self.tmp_dir.rename(self.out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp_dir.rename(self.out_dir)
        fsync_dir(self.out_dir.parent)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (renames, new files) durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def copy_tokenizer(src_dir: str | Path, writer: ShardedWriter) -> list[str]:
    """Copy the tokenizer files of checkpoint ``src_dir`` into the writer's directory; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        p = Path(src_dir) / name
        if p.is_file():
            writer.copy_file(p, name)
            copied.append(name)
    return copied


def save_tokenizer(tokenizer: Any, writer: ShardedWriter) -> None:
    """Save a ``transformers`` tokenizer into the writer's directory (``save_pretrained``, as mergekit saves it)."""
    tokenizer.save_pretrained(str(writer.tmp_dir))
