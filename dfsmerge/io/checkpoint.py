"""Lazy reading of one checkpoint directory (:class:`CheckpointReader`): one tensor, or a row range of one, at a time
from sharded safetensors (any shard layout).

Pickle checkpoints (``*.bin``) are read only when the caller opts in (``allow_pickle=True``, the CLI's
``--allow-pickle``), and then with ``torch.load(weights_only=True)``. Turning a model reference (hub id, GGUF file,
LoRA adapter) into a directory is :mod:`dfsmerge.io.reader`'s job.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from dfsmerge.errors import CheckpointError
from dfsmerge.io.formats import SAFETENSORS_DTYPES

__all__ = ["CheckpointReader"]


class CheckpointReader:
    """Read-only, lazy view of one checkpoint's tensors.

    Tensors are located through ``model.safetensors.index.json`` when present, else by reading the headers of every
    ``*.safetensors`` file in the directory (so any shard layout works). Only the requested tensor is read.
    """

    def __init__(self, path: str | Path, *, allow_pickle: bool = False, name: str | None = None):
        self.path = Path(path)
        self.name = name or str(path)
        if not self.path.is_dir():
            raise CheckpointError(f"model {self.name!r}: {self.path} is not a directory; give a checkpoint directory "
                                  "or a Hugging Face hub id")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"model {self.name!r}: no config.json in {self.path}; point at the directory that "
                                  "holds config.json and the weights")
        self.config: dict[str, Any] = json.loads(cfg.read_text())
        self._weight_map: dict[str, Path] = {}
        self._pickle = False
        self._pickle_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        self._index(allow_pickle)

    # -- locating tensors -------------------------------------------------------------------------
    def _index(self, allow_pickle: bool) -> None:
        st_index = self.path / "model.safetensors.index.json"
        st_files = sorted(self.path.glob("*.safetensors"))
        if st_index.is_file():
            self._weight_map = self._read_index(st_index)
        elif st_files:
            for f in st_files:
                with safe_open(str(f), framework="pt") as h:
                    self._weight_map.update(dict.fromkeys(h.keys(), f))  # noqa: SIM118 - safe_open is no dict
        else:
            bin_index = self.path / "pytorch_model.bin.index.json"
            bin_files = sorted(self.path.glob("*.bin"))
            if not (bin_index.is_file() or bin_files):
                raise CheckpointError(f"model {self.name!r}: no *.safetensors or *.bin weights in {self.path}")
            if not allow_pickle:
                raise CheckpointError(
                    f"model {self.name!r}: {self.path} holds only pickle checkpoints (*.bin); pickle can run code, "
                    "so it is off by default: pass --allow-pickle (loaded with torch.load(weights_only=True)) or "
                    "convert the model to safetensors")
            self._pickle = True
            if bin_index.is_file():
                self._weight_map = self._read_index(bin_index)
            else:
                for f in bin_files:
                    for k in self._load_pickle(f):
                        self._weight_map[k] = f

    def _read_index(self, index: Path) -> dict[str, Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"model {self.name!r}: {index} is not a valid index ({e}); regenerate it") from None
        out = {}
        for k, f in weight_map.items():
            p = self.path / f
            if not p.is_file():
                raise CheckpointError(f"model {self.name!r}: index lists shard {f} for {k} but {p} does not exist; "
                                      "download the missing shard")
            out[k] = p
        return out

    def _load_pickle(self, f: Path) -> dict[str, torch.Tensor]:
        if self._pickle_cache is None or self._pickle_cache[0] != f:
            try:
                sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises several types for non-tensor pickles
                raise CheckpointError(f"model {self.name!r}: cannot load {f} with weights_only=True ({e}); "
                                      "convert it to safetensors") from None
            self._pickle_cache = (f, sd)
        return self._pickle_cache[1]

    # -- public API -------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def get_tensor(self, name: str) -> torch.Tensor:
        """Read one tensor (memory-mapped for safetensors; no other tensor is touched).

        Raises:
            CheckpointError: the tensor is not in the checkpoint.
        """
        try:
            f = self._weight_map[name]
        except KeyError:
            raise CheckpointError(f"model {self.name!r}: tensor {name!r} not found in {self.path}; "
                                  "the model's architecture may differ from the others") from None
        if self._pickle:
            return self._load_pickle(f)[name]
        # Opened per call: the shard's memory map is dropped at once, so reading a whole model one tensor at
        # a time keeps the resident set near one tensor (file pages included).
        with safe_open(str(f), framework="pt") as h:
            return h.get_tensor(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (dim 0) of one tensor, read through a safetensors slice (only those bytes).

        Raises:
            CheckpointError: the tensor is not in the checkpoint.
        """
        if self._pickle or name not in self._weight_map:
            return self.get_tensor(name)[start:stop]
        with safe_open(str(self._weight_map[name]), framework="pt") as h:  # map dropped at once, as get_tensor
            return h.get_slice(name)[start:stop]

    def get_shape(self, name: str) -> tuple[int, ...]:
        if self._pickle:
            return tuple(self.get_tensor(name).shape)
        with safe_open(str(self._weight_map[name]), framework="pt") as h:
            return tuple(h.get_slice(name).get_shape())

    def get_dtype(self, name: str) -> torch.dtype:
        """Storage dtype of one tensor (read from the header only)."""
        if self._pickle:
            return self.get_tensor(name).dtype
        with safe_open(str(self._weight_map[name]), framework="pt") as h:
            return SAFETENSORS_DTYPES[h.get_slice(name).get_dtype()]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self._weight_map:
            yield k, self.get_tensor(k)

    @property
    def tokenizer_path(self) -> Path:
        return self.path
