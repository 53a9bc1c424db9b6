"""Memory preflight: the peak memory a search worker or an evaluation will hold, estimated before anything is
allocated from the tensor sizes in the checkpoints' safetensors headers (no tensor is read), and a refusal with a
one-line message when it exceeds the machine's memory (the GPU's when scoring on CUDA) or a ``--max-memory``
budget, instead of an out-of-memory kill hours into a search (mergekit #341).

What a search worker holds (DESIGN.md section 4): every pool model resident in the scoring dtype, one merged copy
of the base architecture when the genome has a PS part (the in-place PS buffers), and at most the configured caps of
the prefix cache and of racing's kept merges. Activations and per-hop KV caches of a forward pass are not counted:
they scale with the batch, not with the models, and stay small against the weights for the batch sizes used.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from dfsmerge.errors import ConfigError

__all__ = ["MemoryEstimate", "check_memory", "checkpoint_numel", "machine_memory", "parse_memory",
           "plan_or_model_estimate", "search_estimate"]

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


def search_estimate(config, models) -> MemoryEstimate:
    """Peak memory of one search worker (:class:`dfsmerge.search.worker.Worker`) for ``config`` over the resolved
    ``models`` (:class:`dfsmerge.search.space.ResolvedModels`)."""
    from dfsmerge.io.dtypes import dtype_bytes

    dtype = config.eval_dtype if config.eval_dtype != "auto" else config.dtype  # auto starts in config.dtype
    b = dtype_bytes(str(dtype))
    est = MemoryEstimate()
    numel = {}
    for name, path in models.pool.items():
        n = checkpoint_numel(path)
        numel[name] = n
        if n is None:
            est.unknown.append(name)
        else:
            est.parts[f"model {name}"] = n * b
    if models.ps:
        base = models.base or next(iter(models.ps))
        if numel.get(base) is not None:
            est.parts["merged copy (PS buffers)"] = numel[base] * b
    if config.prefix_cache.enabled and config.prefix_cache.memory_mb:
        est.parts["prefix cache (cap)"] = int(config.prefix_cache.memory_mb * 2**20)
    if config.racing.enabled and models.ps and config.racing.keep_merged_mb:
        est.parts["racing's kept merges (cap)"] = int(config.racing.keep_merged_mb * 2**20)
    return est


def plan_or_model_estimate(ref: str | Path, dtype_name: str) -> MemoryEstimate:
    """Peak memory of ``dfsmerge eval MODEL_OR_PLAN``: the models a plan's layer pool loads (each once), or the one
    checkpoint, in ``dtype_name``."""
    from dfsmerge.io.dtypes import dtype_bytes
    from dfsmerge.runtime.loading import is_plan_file

    b = dtype_bytes(dtype_name)
    est = MemoryEstimate()
    if is_plan_file(ref):
        from dfsmerge.genome.plan import PathPlan

        refs = PathPlan.load(ref).models
    else:
        refs = {"model": str(ref)}
    for name, path in refs.items():
        n = checkpoint_numel(path)
        if n is None:
            est.unknown.append(name)
        else:
            est.parts[f"model {name}"] = n * b
    return est


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


def check_memory(est: MemoryEstimate, *, what: str, budget: int | None = None, device: str = "cpu") -> None:
    """Refuse ``what`` when its estimate exceeds ``budget`` (``--max-memory``) or the machine's memory.

    Raises:
        ConfigError: naming the estimate, its largest parts, the limit and the ways out.
    """
    if budget is not None:
        limit, src = budget, f"--max-memory {_human(budget)}"
    else:
        limit, src = machine_memory(device)
        src = f"{src} ({_human(limit)})"
    if est.total > limit:
        raise ConfigError(f"{what} needs an estimated {_human(est.total)} ({est.describe()}), more than {src}; use "
                          "fewer or smaller models, a 16-bit dtype, smaller cache caps, or raise --max-memory")
