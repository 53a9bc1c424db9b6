"""Memory preflight of a search worker or an evaluation: what they hold, estimated from the checkpoints' headers
(the budget, the estimate type and the refusal live in :mod:`dfsmerge.io.memory`)."""

from __future__ import annotations

from pathlib import Path

from dfsmerge.io.memory import MemoryEstimate, checkpoint_numel

__all__ = ["plan_or_model_estimate", "search_estimate"]


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
