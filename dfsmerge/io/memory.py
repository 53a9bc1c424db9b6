"""Memory budget: the machine's memory (the GPU's when scoring on CUDA) or a ``--max-memory`` budget, the
estimate type every preflight fills (a search worker's or an evaluation's in :mod:`dfsmerge.runtime.memory`, a
recipe's merge in :mod:`dfsmerge.recipe.executor`) from the tensor sizes in safetensors headers (no tensor is read),
and the one-line refusal when an estimate exceeds the budget, instead of an out-of-memory kill hours into a search
(mergekit #341)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from dfsmerge.errors import ConfigError

__all__ = ["MemoryEstimate", "check_memory", "checkpoint_numel", "machine_memory", "memory_limit", "parse_memory"]

_MAX_HEADER = 100 << 20  # safetensors' own limit


def _human(n: float) -> str:
    from dfsmerge.io.diskspace import human_bytes

    return human_bytes(n)


def parse_memory(text: str) -> int:
    """Bytes of a ``--max-memory`` value (``"16GB"``, ``"512MiB"``, a number of bytes).

    Raises:
        ConfigError: not a size.
    """
    from dfsmerge.io.writer import parse_size

    try:
        n = parse_size(text)
    except ValueError:
        n = -1
    if n <= 0:
        raise ConfigError(f"--max-memory {text!r} is not a size; use e.g. 16GB, 512MiB or a number of bytes")
    return n


def checkpoint_numel(path: str | Path) -> int | None:
    """Values in a local safetensors checkpoint (directory or file), summed from the headers; None when ``path`` is
    no local safetensors checkpoint (a hub id, a pickle checkpoint: then nothing is estimated)."""
    p = Path(str(path)).expanduser()
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p] if p.suffix == ".safetensors" else []
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return None
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, f.stat().st_size - 8):
                return None  # a corrupt file: its reader reports it
            try:
                header = json.loads(fh.read(n))
            except ValueError:
                return None
        for name, info in header.items():
            if name != "__metadata__":
                k = 1
                for d in info.get("shape", ()):
                    k *= int(d)
                total += k
    return total


@dataclass
class MemoryEstimate:
    """Bytes per part of what will be resident (``parts``) and which models could not be estimated."""

    parts: dict[str, int] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{k} {_human(v)}" for k, v in sorted(self.parts.items(), key=lambda kv: -kv[1]))


def machine_memory(device: str = "cpu") -> tuple[int, str]:
    """``(bytes, what)``: the memory the estimate must fit, physical RAM (or the CUDA device's memory)."""
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            idx = torch.device(device).index or 0
            return torch.cuda.get_device_properties(idx).total_memory, f"the memory of {device}"
    try:
        import psutil

        return psutil.virtual_memory().total, "this machine's memory"
    except ImportError:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"


def memory_limit(budget: int | None = None, device: str = "cpu") -> tuple[int, str]:
    """``(bytes, what)``: the limit an estimate must fit, ``budget`` (``--max-memory``) or the machine's memory."""
    if budget is not None:
        return budget, f"--max-memory {_human(budget)}"
    limit, src = machine_memory(device)
    return limit, f"{src} ({_human(limit)})"


def check_memory(est: MemoryEstimate, *, what: str, budget: int | None = None, device: str = "cpu",
                 fix: str | None = None) -> None:
    """Refuse ``what`` when its estimate exceeds ``budget`` (``--max-memory``) or the machine's memory.

    Args:
        fix: what the message tells the user to do (default: a search worker's ways out).
    Raises:
        ConfigError: naming the estimate, its largest parts, the limit and the ways out.
    """
    limit, src = memory_limit(budget, device)
    if est.total > limit:
        fix = fix or ("use fewer or smaller models, a 16-bit dtype, smaller cache caps, or raise --max-memory")
        raise ConfigError(f"{what} needs an estimated {_human(est.total)} ({est.describe()}), more than {src}; "
                          f"{fix}")
