"""Evaluation backends: where the genome vectors of a generation are scored.

- ``local``: one in-process :class:`~dfsmerge.search.worker.Worker` (the default).
- ``ray``: one actor per GPU (or per CPU slot when there is none), each holding its own Worker (LayerPool, runtime,
  tasks) loaded once and receiving genome vectors as bytes. A candidate whose actor dies is retried on another
  actor; the objectives do not depend on which actor scored them, so a run equals the local one for the same seed.

Both yield ``(job index, result)`` pairs as candidates finish; the loop writes them to ``evals.jsonl`` in id order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from dfsmerge.errors import ConfigError, DfsmergeError
from dfsmerge.search.config import SearchConfig


class Backend:
    """Protocol of a backend (``evaluate`` yields results as they complete)."""

    name = ""

    def set_stage(self, stage: int, fixed_ps_genome: list[float] | None) -> None:
        raise NotImplementedError

    def set_eval_dtype(self, dtype: str) -> None:
        """Score in ``dtype`` from now on (``eval_dtype``)."""
        raise NotImplementedError

    def set_doc_positions(self, positions: dict[str, list[int]] | None) -> None:
        """Subset fitness: score only these documents of each task from now on (None: all)."""
        raise NotImplementedError

    def evaluate(self, genomes: Sequence[np.ndarray], candidates: Sequence[Any] | None = None,
                 block: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
        """Score ``genomes``; ``candidates`` are their decodings when the caller has them (a backend may use them
        instead of decoding again); ``block``: racing, only that block of the documents. Yields ``(index, result)``
        as candidates finish."""
        raise NotImplementedError

    def close(self) -> None:
        """Release workers."""


class LocalBackend(Backend):
    """In-process evaluation with one :class:`Worker` (built on first use)."""

    name = "local"

    def __init__(self, config: SearchConfig, models=None, worker=None):
        self.config = config
        self.models = models
        self._worker = worker
        self._stage: tuple[int, list[float] | None] = (1, None)

    @property
    def worker(self):
        if self._worker is None:
            from dfsmerge.search.worker import Worker

            self._worker = Worker(self.config, self.models)
            self._worker.set_stage(*self._stage)
        return self._worker

    def set_stage(self, stage: int, fixed_ps_genome: list[float] | None) -> None:
        self._stage = (stage, fixed_ps_genome)
        if self._worker is not None:
            self._worker.set_stage(stage, fixed_ps_genome)

    def set_eval_dtype(self, dtype: str) -> None:
        self.worker.set_eval_dtype(dtype)

    def set_doc_positions(self, positions: dict[str, list[int]] | None) -> None:
        self.worker.set_doc_positions(positions)

    def evaluate(self, genomes: Sequence[np.ndarray], candidates: Sequence[Any] | None = None,
                 block: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
        w = self.worker
        for i, x in enumerate(genomes):
            yield i, w.evaluate(x, None if candidates is None else candidates[i], block=block)


class _RayWorker:
    """Ray actor body: a Worker plus the stage it is set to."""

    def __init__(self, config_dict: dict[str, Any]):
        from dfsmerge.search.worker import Worker

        self.worker = Worker(config_dict)
        self.stage: tuple[int, tuple[float, ...] | None] = (1, None)

    def evaluate(self, stage: int, fixed: tuple[float, ...] | None, x_bytes: bytes, block: int | None = None,
                 dtype: str | None = None) -> dict[str, Any]:
        if dtype is not None:
            self.worker.set_eval_dtype(dtype)
        if (stage, fixed) != self.stage:
            self.worker.set_stage(stage, None if fixed is None else list(fixed))
            self.stage = (stage, fixed)
        x = np.frombuffer(x_bytes, dtype=np.float64)
        return self.worker.evaluate(x, block=block)

    def pid(self) -> int:
        import os

        return os.getpid()


class RayBackend(Backend):
    """Ray actors, each holding a Worker.

    Args:
        config: the search config (sent to each actor as a dict).
        address: an existing cluster (``ray.init(address=...)``); None starts a local one.
        num_workers: actors; None: one per GPU, else one per CPU of the cluster.
        max_retries: times one candidate is retried after its actor died.
        max_restarts: dead actors replaced by fresh ones over the backend's life (default: as many as it starts),
            so a run keeps its throughput after an OOM kill; past it the remaining actors carry on.

    Raises:
        ConfigError: ray is not installed.
    """

    name = "ray"

    def __init__(self, config: SearchConfig, *, address: str | None = None, num_workers: int | None = None,
                 max_retries: int = 3, max_restarts: int | None = None):
        try:
            import ray
        except ImportError:
            raise ConfigError("backend='ray' needs the ray package; pip install ray (or use --backend local)") from None
        self.ray = ray
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True}
            if address:
                kwargs["address"] = address
            elif num_workers:
                kwargs["num_cpus"] = num_workers
            ray.init(**kwargs)
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        n = num_workers or gpus or max(1, int(res.get("CPU", 1)))
        # one GPU per actor; on CPU one slot per actor (a fraction when more actors than CPUs are asked for)
        opts = {"num_gpus": 1, "num_cpus": 0} if gpus else {"num_cpus": min(1.0, res.get("CPU", 1) / n)}
        self._actor_cls = ray.remote(**opts)(_RayWorker)
        self._config_dict = config.to_dict()
        self.actors = [self._actor_cls.remote(self._config_dict) for _ in range(n)]
        self.max_retries = max_retries
        self.retries = 0  # candidates re-run after their actor died
        self.max_restarts = n if max_restarts is None else max_restarts
        self.restarts = 0  # actors started to replace dead ones
        self._stage: tuple[int, tuple[float, ...] | None] = (1, None)
        self._dtype: str | None = None

    def set_stage(self, stage: int, fixed_ps_genome: list[float] | None) -> None:
        self._stage = (stage, None if fixed_ps_genome is None else tuple(float(v) for v in fixed_ps_genome))

    def set_eval_dtype(self, dtype: str) -> None:
        self._dtype = dtype  # sent with every candidate: an actor (re)started later scores in it too

    def evaluate(self, genomes: Sequence[np.ndarray], candidates: Sequence[Any] | None = None,
                 block: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
        ray = self.ray
        from ray.exceptions import RayActorError

        queue = list(range(len(genomes)))
        tries = [0] * len(genomes)
        idle = list(self.actors)
        inflight: dict[Any, tuple[int, Any]] = {}
        stage, fixed = self._stage
        blobs = [np.ascontiguousarray(g, dtype=np.float64).tobytes() for g in genomes]
        while queue or inflight:
            while queue and idle:
                i, actor = queue.pop(0), idle.pop(0)
                inflight[actor.evaluate.remote(stage, fixed, blobs[i], block, self._dtype)] = (i, actor)
            if not inflight:
                raise DfsmergeError("ray backend: every actor died; check the actors' logs (out of memory?) and "
                                    "resume with --resume")
            done, _ = ray.wait(list(inflight), num_returns=1)
            ref = done[0]
            i, actor = inflight.pop(ref)
            try:
                result = ray.get(ref)
            except RayActorError as e:  # the actor died: drop it, retry its candidate first, on the next free actor
                self.actors = [a for a in self.actors if a is not actor]
                tries[i] += 1
                self.retries += 1
                if tries[i] > self.max_retries:
                    raise DfsmergeError(f"ray backend: candidate {i} killed {tries[i]} actors ({e}); stopping") from e
                queue.insert(0, i)
                if self.restarts < self.max_restarts:  # a replacement (it loads its pool on its first candidate)
                    self.restarts += 1
                    fresh = self._actor_cls.remote(self._config_dict)
                    self.actors.append(fresh)
                    idle.append(fresh)
                continue
            idle.append(actor)
            yield i, result

    def close(self) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(a)
        self.actors = []


def make_backend(config: SearchConfig, models=None, *, address: str | None = None) -> Backend:
    """The backend named by ``config.backend``."""
    if config.backend == "ray":
        return RayBackend(config, address=address or config.ray_address, num_workers=config.num_workers)
    return LocalBackend(config, models)
