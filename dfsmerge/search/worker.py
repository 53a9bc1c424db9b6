"""The evaluation worker: decodes genome vectors and scores them. It holds the LayerPool, the runtime and the task
suite, all built once (lazily, on the first candidate that needs a model); the local backend runs one in-process,
the Ray backend one per actor.

Failure isolation lives here: a candidate that raises (also out of memory) or yields a non-finite objective is
returned as an :class:`~dfsmerge.objectives.EvalResult` with ``error`` set and its values at the worst (+inf), never
as an exception.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from dfsmerge.errors import ConfigError
from dfsmerge.genome import MODE_TABLE
from dfsmerge.objectives.evaluator import EvalResult
from dfsmerge.objectives.fitness import WORST, scalar_fitness
from dfsmerge.search.config import SearchConfig, SyntheticObjectiveConfig

SyntheticFn = Callable[[np.ndarray, Any, SyntheticObjectiveConfig], float]
"""``fn(u, candidate, objective)`` with ``u`` the genome mapped to [0, 1] per gene (by the bounds)."""

SYNTHETIC_OBJECTIVES: dict[str, SyntheticFn] = {}


def register_synthetic(name: str):
    """Decorator adding a synthetic objective (minimised) under ``name``."""

    def deco(fn: SyntheticFn) -> SyntheticFn:
        SYNTHETIC_OBJECTIVES[name] = fn
        return fn

    return deco


@register_synthetic("sphere")
def _sphere(u: np.ndarray, candidate, obj: SyntheticObjectiveConfig) -> float:
    """Squared distance of the normalised genome to ``center`` (default 0.3 in every gene); minimum 0."""
    c = obj.params.get("center", 0.3)
    return float(np.sum((u - c) ** 2))


@register_synthetic("path_length")
def _path_length(u: np.ndarray, candidate, obj: SyntheticObjectiveConfig) -> float:
    """Path length of the decoded candidate (0 without a path): a model-free stand-in for ``cost/hops``."""
    path = getattr(candidate, "path", None)
    return float(len(path)) if path is not None and hasattr(path, "steps") else 0.0


def _device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


class Worker:
    """Scores genome vectors of one search.

    Args:
        config: the search config (or its dict, as Ray actors receive it).
        models: the resolved models (``dfsmerge.search.space.ResolvedModels``); resolved again when None.

    The pool is loaded on the first candidate whose objectives need a model; :meth:`set_stage` switches staged mode
    to stage 2 (the PS-merged model of the stage-1 best becomes model A).
    """

    def __init__(self, config: SearchConfig | dict, models=None):
        from dfsmerge.search.config import load_search_config
        from dfsmerge.search.space import build_space

        self.config = config if isinstance(config, SearchConfig) else load_search_config(config)
        self.space, self.models = build_space(self.config, models)
        self._base_space = self.space
        lo, hi = self.space.bounds
        self._lo, self._span = lo, hi - lo
        for o in self.config.synthetic_objectives:
            if o.name not in SYNTHETIC_OBJECTIVES:
                raise ConfigError(f"objective {o.name!r} (type synthetic) is unknown; use one of "
                                  f"{sorted(SYNTHETIC_OBJECTIVES)}")
        self.runtime = None
        self._last_block: int | None = None  # racing: the block of the previous evaluation (a new race starts at 0)
        self.eval_dtype = self.config.dtype if self.config.eval_dtype == "auto" else self.config.eval_dtype
        self.evaluator = None
        self.directions: dict[str, str] = {o.key: "minimize" for o in self.config.synthetic_objectives}
        # subset fitness: score per document, only the documents at these positions of each task (None: all)
        self.subset = any(o.subset is not None for o in self.config.model_objectives)
        self.doc_positions: dict[str, list[int]] | None = None
        if self.config.needs_model:
            self._prepare_tasks()

    # ---------------------------------------------------------------- setup
    def _model_a_path(self) -> str:
        m = self.models
        if m.ps:
            return m.ps.get(m.base) or m.ps_extra.get(m.base) or next(iter(m.ps.values()))
        return next(iter(m.dfs.values()))

    def _prepare_tasks(self) -> None:
        """Load and validate every task (and the tokenizer) before any model is loaded."""
        from dfsmerge.objectives import EvalConfig, Evaluator

        objs = self.config.model_objectives
        ev = EvalConfig(objectives=objs, task_paths=self.models.task_paths, batch_size=self.config.batch_size,
                        allow_benchmark_test_split=self.config.allow_benchmark_test_split,
                        builtin_tasks=self.config.builtin_tasks,
                        share_prompts=self.config.prefix_cache.share_prompts)
        tokenizer = None
        if any(o.type == "task" for o in objs):
            tokenizer = _model_a_tokenizer(self._model_a_path())
        self.evaluator = Evaluator(ev, tokenizer)
        self.directions.update(self.evaluator.directions)
        if self.config.racing.enabled:
            self.evaluator.suite.race_blocks(self.config.racing.blocks, self.config.seed)
        if self.subset:
            from dfsmerge.objectives.subset import check_subset_task

            for p in self.evaluator.suite.prepared:
                check_subset_task(p)

    def set_doc_positions(self, positions: dict[str, list[int]] | None) -> None:
        """Subset fitness: score only the documents at ``positions[task]`` from now on (None: every document)."""
        self.doc_positions = positions

    def _load_runtime(self) -> None:
        from dfsmerge.io.dtypes import torch_dtype
        from dfsmerge.runtime import Runtime
        from dfsmerge.runtime.pool import LayerPool

        m = self.models
        spec = MODE_TABLE[self.config.genome.mode]
        base = (m.base or next(iter(m.ps))) if m.ps else next(iter(m.dfs))
        pool = LayerPool(m.pool, base=base, device=_device(self.config.device), dtype=torch_dtype(self.eval_dtype))
        pc, rc = self.config.prefix_cache, self.config.racing
        self.runtime = Runtime(pool, ps_template=base if m.ps else None, merged_as_base=spec.merged_is_model_a,
                               seed=self.config.seed, prefix_cache_mb=pc.memory_mb if pc.enabled else None,
                               keep_merged_mb=rc.keep_merged_mb if rc.enabled else 0)
        if self.evaluator is not None and self.evaluator.tokenizer is None:
            self.evaluator.tokenizer = pool.tokenizer if _has_tok(pool) else None

    def set_eval_dtype(self, dtype: str) -> None:
        """Score in ``dtype`` from now on (the resident models are reloaded in it on the next candidate)."""
        if dtype != self.eval_dtype:
            self.eval_dtype = dtype
            self.runtime = None

    def set_stage(self, stage: int, fixed_ps_genome: list[float] | None = None) -> None:
        """Staged mode: switch to ``stage`` (2: DFS with the PS recipe decoded from ``fixed_ps_genome`` as model A)."""
        if MODE_TABLE[self.config.genome.mode].stages == 1:
            return
        if stage == 1:
            self.space = self._base_space.with_stage(1)
        else:
            recipe = self._base_space.ps.decode(np.asarray(fixed_ps_genome, dtype=np.float64))
            self.space = self._base_space.with_stage(2, recipe)
        lo, hi = self.space.bounds
        self._lo, self._span = lo, hi - lo

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, x, candidate=None, block: int | None = None) -> EvalResult:
        """Score one genome vector (``candidate``: its decoding, when the caller already has it; ``block``: racing,
        score only that block of the documents, see :meth:`Evaluator.evaluate_block`).

        Returns:
            An :class:`~dfsmerge.objectives.EvalResult` (fitness by
            :func:`~dfsmerge.objectives.fitness.scalar_fitness`), with ``error`` set and every value at the worst
            when the candidate failed; never raises for a candidate's own failure.
        """
        t0 = time.perf_counter()
        x = np.asarray(x, dtype=np.float64)
        objectives = self.config.objectives
        timings: dict[str, float] = {}
        results: dict[str, Any] = {}
        partial = responses = None
        cost: dict[str, float] = {}
        try:
            cand = self.space.decode(x) if candidate is None else candidate
            timings["decode_s"] = time.perf_counter() - t0
            if not cand.feasible:
                return self._failed(f"infeasible: {cand.path.reason}", timings, t0, infeasible=True)
            scores: dict[str, float] = {}
            values: dict[str, float] = {}
            if self.config.needs_model:
                if self.runtime is None:
                    self._load_runtime()
                t1 = time.perf_counter()
                import torch

                if block == 0 and self._last_block not in (None, 0) and self.runtime.buffers is not None:
                    self.runtime.buffers.forget()  # a new race: the last one's merged weights never come back
                self._last_block = block
                with torch.no_grad():
                    model = self.runtime.prepare(cand)
                    timings["prepare_s"] = time.perf_counter() - t1
                    t2 = time.perf_counter()
                    work = self.runtime.work()
                    if block is None and self.subset:
                        res = self.evaluator.evaluate_docs(model, self.doc_positions)
                        docs = res.cost["docs"]
                    elif block is None:
                        res = self.evaluator.evaluate(model)  # duplicates never get here: the loop's cache has them
                        docs = self.evaluator.documents()
                    else:
                        res = self.evaluator.evaluate_block(model, block)
                        docs = res.cost["docs"]
                timings["eval_s"] = time.perf_counter() - t2
                cost = {**self.runtime.work().since(work), "docs": docs, "seconds": round(timings["eval_s"], 4)}
                results = res.results
                partial, responses = res.partial, res.responses
                scores.update(res.scores)
                values.update(res.values)
            u = (x - self._lo) / self._span if len(x) else x
            for o in self.config.synthetic_objectives:
                v = float(SYNTHETIC_OBJECTIVES[o.name](u, cand, o))
                scores[o.key] = v
                values[o.key] = v if math.isfinite(v) else WORST
        except Exception as e:  # noqa: BLE001 - failure isolation: any candidate error becomes worst fitness
            _free_cuda(e)
            return self._failed(f"{type(e).__name__}: {e}", timings, t0, detail=traceback.format_exc(limit=4))
        values = {o.key: values.get(o.key, WORST) for o in objectives}
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        timings["total_s"] = time.perf_counter() - t0
        if partial is not None:  # a block's mean may be NaN (an empty block): the loop combines the sums
            bad = [k for k in bad if k not in partial]
        return EvalResult(results=results, scores={o.key: _clean(scores.get(o.key)) for o in objectives},
                          values=values, fitness=scalar_fitness(values, objectives),
                          error=f"non-finite objective {bad}" if bad else None, timings=timings, cost=cost,
                          partial=partial, responses=responses)

    def _failed(self, msg: str, timings, t0, *, infeasible: bool = False, detail: str | None = None) -> EvalResult:
        timings["total_s"] = time.perf_counter() - t0
        keys = [o.key for o in self.config.objectives]
        return EvalResult(results={}, scores=dict.fromkeys(keys), values=dict.fromkeys(keys, WORST), fitness=WORST,
                          error=msg, infeasible=infeasible, timings=timings, traceback=detail)


def _clean(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _free_cuda(e: BaseException) -> None:
    try:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def _has_tok(pool) -> bool:
    try:
        pool.tokenizer  # noqa: B018
        return True
    except Exception:  # noqa: BLE001
        return False


def _model_a_tokenizer(path: str):
    """Model A's tokenizer, from its checkpoint directory (no weights are read)."""
    from dfsmerge.io import open_checkpoint
    from dfsmerge.io.tokenizer import load_tokenizer

    tok_dir = getattr(open_checkpoint(path), "tokenizer_path", None) or path
    return load_tokenizer(tok_dir, name=path, fix="task objectives need model A's tokenizer files (tokenizer.json)")
