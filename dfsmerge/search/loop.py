"""The search loop of docs/design.md section 7, explicit and checkpointed (never a callback, unlike mergekit-evolve's
``cma.fmin2(callback=...)``, which can never resume)::

    state = load_or_new(run_dir)
    while not done:
        X = optimizer.ask();  checkpoint            # the pending population is durable
        for x in X: result = cached or logged or backend.evaluate(x);  append evals.jsonl + fsync
        optimizer.tell(X, F);  checkpoint

Killed anywhere, ``--resume`` loads the last checkpoint (an optimizer saved after ``ask`` replays that ask), reuses
every candidate of the pending generation already in ``evals.jsonl`` and scores only the rest, so nothing is lost
or scored twice and the trajectory equals an uninterrupted run's (objectives are deterministic per candidate).

Staged mode (Sakana AI, arXiv 2403.13187, sec. 3.3): stage 1 searches PS, stage 2 searches DFS with the stage-1
best recipe as model A; ``max_evals``/``max_generations`` apply per stage.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dfsmerge.errors import CheckpointError, DfsmergeError
from dfsmerge.genome import MODE_TABLE
from dfsmerge.objectives.cache import ResultCache
from dfsmerge.report.report import describe_best
from dfsmerge.rundir.lock import RunLock, check_unlocked
from dfsmerge.search.config import SearchConfig, load_search_config
from dfsmerge.search.signals import PauseOnSignal, SearchPaused
from dfsmerge.search.state import EvalRecord, LoopState, RunDir, check_resume_config
from dfsmerge.search.subset_fitness import SubsetFitness, check_subset_search

log = logging.getLogger("dfsmerge.search")


class SearchFailedError(DfsmergeError):
    """Too many consecutive candidates failed; the run is stopped (and resumable)."""


@dataclass
class SearchResult:
    """What a finished (or stopped) search produced.

    Attributes:
        run_dir: the run directory.
        n_evals: lines in ``evals.jsonl``.
        best: the best record's line (lowest fitness over all stages, :meth:`EvalRecord.to_json`), or None when
            every candidate failed.
        pareto: multi-objective runs: the non-dominated records' lines (all stages).
        stop_reason: why the last stage ended.
        outputs: name -> path of what was written (best plan/recipe/mergekit, pareto, report).
    """

    run_dir: Path
    n_evals: int
    best: dict[str, Any] | None
    pareto: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str = ""
    outputs: dict[str, Path] = field(default_factory=dict)


def _take_lock(out: str | Path, *, resume: bool) -> RunLock:
    """The run directory's writer lock, taken now when resuming (before any work); a new run only checks that no
    live writer holds ``out`` (its lock is taken once the directory is created)."""
    lock = RunLock(out)
    if resume and (Path(out) / "config.yaml").is_file():
        return lock.acquire()
    check_unlocked(out)
    return lock


def _rng_state() -> dict[str, Any]:
    out: dict[str, Any] = {"python": repr(random.getstate()), "numpy": None}
    st = np.random.get_state()
    out["numpy"] = [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])]
    if "torch" in sys.modules:
        import torch

        out["torch"] = torch.get_rng_state().numpy().tobytes()
    return out


def _set_rng_state(d: dict[str, Any] | None) -> None:
    if not d:
        return
    import ast

    random.setstate(ast.literal_eval(d["python"]))
    n = d["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if d.get("torch") is not None:
        import torch

        torch.set_rng_state(torch.frombuffer(bytearray(d["torch"]), dtype=torch.uint8).clone())


class _Progress:
    """tqdm bar per generation (evals/s and best so far), or one log line per generation when quiet. The best is
    shown as its objectives, each in its own direction (``best real_arith 0.34``), not as the minimised fitness."""

    def __init__(self, enabled: bool, emit: Callable[[str], None]):
        self.enabled = enabled and sys.stderr.isatty() or enabled == "force"
        self.emit = emit
        self.bar = None

    @staticmethod
    def describe(best: EvalRecord | None) -> str:
        return describe_best(None if best is None else best.to_json())

    def start(self, gen: int, n: int, best: EvalRecord | None) -> None:
        self.t0 = time.perf_counter()
        self.n = 0
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=n, desc=f"generation {gen}", unit="eval", leave=False, dynamic_ncols=True)
            self._post(best)

    def _post(self, best):
        if self.bar is not None:
            self.bar.set_postfix_str(f"best {self.describe(best)}")

    def step(self, best: EvalRecord | None) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
            self._post(best)

    def end(self, gen: int, best: EvalRecord | None, n_evals: int) -> None:
        dt = time.perf_counter() - self.t0
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        rate = self.n / dt if dt > 0 else float("inf")
        self.emit(f"generation {gen}: {self.n} evals ({rate:.2f} evals/s), {n_evals} in all, "
                  f"best {self.describe(best)}")


class _Trackers:
    """Optional W&B / TensorBoard logging (only when enabled in the config and installed)."""

    def __init__(self, config: SearchConfig, run_dir: Path, emit):
        self.tb = self.wandb = None
        lg = config.logging
        if lg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception as e:  # noqa: BLE001 - optional
                emit(f"tensorboard logging disabled ({type(e).__name__}: {e})")
        if lg.wandb:
            try:
                import wandb

                self.wandb = wandb.init(project=lg.wandb_project, config=config.to_dict(), dir=str(run_dir),
                                        resume="allow")
            except Exception as e:  # noqa: BLE001 - optional
                emit(f"wandb logging disabled ({type(e).__name__}: {e})")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class _InOrderLog:
    """A generation's records, appended to the run in id order as they become ready (a backend may finish out of
    order, and duplicates and cache hits are ready before the candidates that are scored)."""

    def __init__(self, search: Search, n: int) -> None:
        self.search = search
        self.recs: list[EvalRecord | None] = [None] * n
        self.ready: dict[int, EvalRecord] = {}
        self.next = 0

    def add(self, i: int, rec: EvalRecord) -> None:
        self.ready[i] = rec
        while self.next < len(self.recs) and (self.recs[self.next] is not None or self.next in self.ready):
            if self.recs[self.next] is None:
                self.recs[self.next] = self.ready.pop(self.next)
                self.search._append(self.recs[self.next])
            self.next += 1


class Search:
    """One search run over a run directory (see :func:`run_search`)."""

    def __init__(self, config: SearchConfig, out: str | Path, *, resume: bool = False, progress: bool = True,
                 address: str | None = None, emit: Callable[[str], None] | None = None, backend=None,
                 max_memory: int | None = None):
        self.config = config
        self.max_memory = max_memory
        self.emit = emit or (lambda msg: log.info(msg))
        self._lock = _take_lock(out, resume=resume)  # a second writer is refused at once, naming the first's pid
        try:
            self._init(config, out, resume=resume, progress=progress, address=address, backend=backend)
        except BaseException:
            self._lock.release()
            raise

    def _init(self, config: SearchConfig, out: str | Path, *, resume: bool, progress: bool, address: str | None,
              backend) -> None:
        from dfsmerge.optim import validate_options
        from dfsmerge.search.space import build_space, check_models

        RunDir.check(out, resume=resume)  # refuse a non-empty --out (or a missing run) before any work
        if resume:
            check_resume_config(RunDir(out).read_config(), config.to_dict())
        # Everything that can reject the config runs before the run directory is created: the optimizer's outside
        # resources, architectures and pool compatibility (from config files), genome vs. models, tasks.
        for stage in self._stages:
            o = config.optimizer_for(stage)
            validate_options(o.name, **o.all_options()).preflight()
        check_subset_search(config)
        self.space, self.models = build_space(config)
        check_models(self.models)
        if config.needs_model:  # from the checkpoints' headers, before any model is loaded
            from dfsmerge.io.memory import check_memory
            from dfsmerge.runtime.memory import search_estimate

            check_memory(search_estimate(config, self.models), what="each search worker", budget=self.max_memory,
                         device=config.device)
        if backend is None:
            from dfsmerge.search.backends import make_backend

            backend = make_backend(config, self.models, address=address)
        self.backend = backend
        if hasattr(backend, "worker"):
            backend.worker  # noqa: B018 - builds the worker: tasks are validated before the loop starts
        elif config.needs_model:
            from dfsmerge.search.worker import Worker

            Worker(config, self.models)  # validate tasks here, before remote workers load anything
        self.run = RunDir.open(out, resume=resume)
        self._lock.acquire()  # a new run: taken once its directory exists (a racing twin is refused here)
        if self._lock.stale:
            self.emit(f"recovered the lock of a dead writer ({self._lock.stale}); resuming")
        self.run.write_config(config.to_dict())
        self.state = self.run.read_state() if resume else None
        self.progress = _Progress(progress, self.emit)
        self.trackers = _Trackers(config, self.run.path, self.emit)
        self.cache = ResultCache()  # candidate key -> its first scored record (successes and infeasible paths)
        for rec in self.run.evals:
            self._remember(rec)
        self.consecutive_failures = 0
        self.stop_reason = ""
        self._stage_best: EvalRecord | None = None
        self.eval_dtype: dict[str, Any] | None = None  # the scoring dtype once decided (LoopState.eval_dtype)
        self._last_state: LoopState | None = None
        self.subset = (SubsetFitness(config, self.run.path)  # subset fitness: schedule, fits, estimates
                       if any(o.subset is not None for o in config.model_objectives) else None)

    # ---------------------------------------------------------------- helpers
    def _remember(self, rec: EvalRecord) -> None:
        """Cache a scored record for its key (a failure is not cached: it may not recur; nor is a racing
        estimate: in another generation the candidate may matter)."""
        if not rec.cached and not rec.partial and (rec.ok or rec.infeasible) and rec.key not in self.cache:
            self.cache.put(rec.key, rec)

    @property
    def _stages(self) -> tuple[int, ...]:
        return tuple(range(1, MODE_TABLE[self.config.genome.mode].stages + 1))

    def _stage_space(self, stage: int, fixed: tuple[float, ...] | None):
        if len(self._stages) == 1:
            return self.space
        if stage == 1:
            return self.space.with_stage(1)
        return self.space.with_stage(2, self.space.ps.decode(np.asarray(fixed)))

    def _make_optimizer(self, space, stage: int):
        from dfsmerge.optim import OPTIMIZERS, make_optimizer
        from dfsmerge.search.space import binary_mask

        o = self.config.optimizer_for(stage)
        lo, hi = space.bounds
        options = o.all_options()
        fields = OPTIMIZERS[o.name].Options.model_fields
        if space.parts[1] is not None and "stds" in fields and "sigma0" not in options and "stds" not in options:
            # a DFS genome's default start keeps the first generation near the source path (DFSGenome.initial_stds)
            options["stds"] = tuple(space.initial_stds(fields["sigma0"].default).tolist())
        return make_optimizer(o.name, dim=space.dim, bounds=(lo, hi), x0=space.initial(),
                              seed=self.config.seed + stage - 1, popsize=o.popsize, n_obj=self.config.n_obj,
                              binary_mask=np.asarray(binary_mask(space)), **options)

    def _checkpoint(self, opt, *, stage: int, offset: int, gen_offset: int, fixed, phase: str, elapsed: float) -> None:
        self._last_state = LoopState(stage=stage, stage_offset=offset, generation_offset=gen_offset, fixed_ps=fixed,
                                     phase=phase, elapsed_s=elapsed,
                                     optimizer=None if opt is None else opt.state_dict(), rng=_rng_state(),
                                     eval_dtype=self.eval_dtype)
        self.run.write_state(self._last_state)

    def _key(self, cand, x: np.ndarray) -> str:
        """The candidate key (with the genome itself when a synthetic objective reads it)."""
        return cand.key(x if self.config.synthetic_objectives else None)

    def _F(self, recs: list[EvalRecord]) -> np.ndarray:  # noqa: N802
        if self.config.n_obj == 1:
            return np.array([[r.fitness] for r in recs])
        keys = [o.key for o in self.config.objectives]
        return np.array([[r.values.get(k, math.inf) for k in keys] for r in recs])

    # ---------------------------------------------------------------- the loop
    def run_loop(self) -> SearchResult:
        t_session = time.perf_counter()
        st = self.state or LoopState()
        self.eval_dtype = st.eval_dtype
        if self.eval_dtype is None and self.config.eval_dtype == "auto" and self.config.dtype != "float32":
            self.eval_dtype = {"dtype": self.config.dtype, "measured": False}  # already a 16-bit search
        if self.eval_dtype is not None and self.config.needs_model:
            self.backend.set_eval_dtype(self.eval_dtype["dtype"])
        elapsed0 = st.elapsed_s
        stages = self._stages
        stage0, offset, gen_offset, fixed = st.stage, st.stage_offset, st.generation_offset, st.fixed_ps
        _set_rng_state(st.rng)
        reason = ""
        self._pause = PauseOnSignal(self.emit).__enter__()  # SIGINT/SIGTERM: pause at the next candidate boundary
        try:
            for stage in stages:
                if stage < stage0:
                    continue
                space = self._stage_space(stage, fixed)
                self.backend.set_stage(stage, None if fixed is None else list(fixed))
                opt = self._make_optimizer(space, stage)
                opt.bind_run_dir(self.run.path)  # before the state: llm replays its logged answers from there
                if stage == stage0 and st.optimizer is not None:
                    opt.load_state_dict(st.optimizer)
                reason = self._run_stage(stage, space, opt, offset, gen_offset, fixed, elapsed0, t_session)
                self.emit(f"stage {stage} ended: {reason}" if len(stages) > 1 else f"search ended: {reason}")
                gen_offset += opt.generation
                if stage == 1 and len(stages) == 2:
                    best = self._best_of(offset)
                    if best is None:
                        raise SearchFailedError("staged mode: no stage-1 (PS) candidate succeeded, so stage 2 has no "
                                                "model A; check the errors in evals.jsonl")
                    fixed = best.genome
                    offset = len(self.run.evals)
                    self._checkpoint(None, stage=2, offset=offset, gen_offset=gen_offset, fixed=fixed,
                                     phase="stage_start", elapsed=elapsed0 + time.perf_counter() - t_session)
        except BaseException as e:
            if isinstance(e, SearchPaused) and self._last_state is not None:  # the session's time counts
                self.run.write_state(replace(self._last_state, eval_dtype=self.eval_dtype,
                                             elapsed_s=elapsed0 + time.perf_counter() - t_session))
            self._pause.__exit__()
            self._lock.release()
            raise
        finally:
            self.run.close()
            self.trackers.close()
        self.stop_reason = reason
        # Every stage's candidates are whole models scored on the same objectives, so the best (and the Pareto set)
        # is taken over all of them: in staged mode CMA-ES never scores stage 2's start (the stage-1 best itself),
        # and a stage-2 search can end below it.
        try:
            return self.finish(0)
        finally:
            self._pause.__exit__()
            self._lock.release()

    def _budget(self, stage: int):
        """The budget section that rules ``stage`` and its config path prefix (for messages)."""
        b = self.config.budget_for(stage)
        return b, ("budget." if b is self.config.budget else "stage2.budget.")

    def _budget_reason(self, opt, elapsed: float, stage: int) -> str | None:
        b, path = self._budget(stage)
        where = "" if path == "budget." else path
        if b.max_evals is not None and opt.n_evals >= b.max_evals:
            return f"{where}max_evals={b.max_evals} reached ({opt.n_evals} evaluations)"
        if b.max_generations is not None and opt.generation >= b.max_generations:
            return f"{where}max_generations={b.max_generations} reached"
        if b.time_limit is not None and elapsed >= b.time_limit:
            return f"{where}time_limit={b.time_limit}s reached"
        if opt.stop():
            return f"optimizer stopped: {opt.stop_reason}"
        return None

    def _run_stage(self, stage, space, opt, offset, gen_offset, fixed, elapsed0, t_session) -> str:
        # One checkpoint per generation, right after ask: it holds the optimizer as told so far plus the pending
        # population, so a kill after tell loses nothing (the logged results are told again on resume). A
        # checkpoint after tell is written only when the stage ends.
        self._stage_best = self._best_of(offset)
        while True:
            self._check_pause()
            elapsed = elapsed0 + time.perf_counter() - t_session
            if not opt.pending:
                reason = self._budget_reason(opt, elapsed, stage)
                if reason:
                    self._checkpoint(opt, stage=stage, offset=offset, gen_offset=gen_offset, fixed=fixed,
                                     phase="told", elapsed=elapsed)
                    return reason
            X = opt.ask()  # (n, dim)
            if X.shape[0] == 0:
                self._checkpoint(opt, stage=stage, offset=offset, gen_offset=gen_offset, fixed=fixed,
                                 phase="asked", elapsed=elapsed)
                return "optimizer has no new candidate to ask"
            gen = gen_offset + opt.generation
            self._checkpoint(opt, stage=stage, offset=offset, gen_offset=gen_offset, fixed=fixed, phase="asked",
                             elapsed=elapsed)
            recs = self._evaluate_generation(X, space, stage, gen, offset + opt.n_evals,
                                             elite=(opt.elite_size or 1) if self.config.n_obj == 1 else None)
            F = self._F(recs)  # (n, n_obj)
            opt.tell(X, F)
            fit = np.array([r.fitness for r in recs])
            best = self._stage_best
            metrics = {"fitness/best": math.inf if best is None else best.fitness, "evals": float(len(self.run.evals))}
            if np.isfinite(fit).any():
                metrics["fitness/generation_mean"] = float(fit[np.isfinite(fit)].mean())
            self.trackers.log(gen, {k: v for k, v in metrics.items() if math.isfinite(v)})

    def _evaluate_generation(self, X: np.ndarray, space, stage: int, gen: int, base_id: int,
                             elite: int | None = 1) -> list[EvalRecord]:
        n = X.shape[0]
        log = _InOrderLog(self, n)
        cands: dict[int, Any] = {}
        todo: dict[str, list[int]] = {}  # candidate key -> indices waiting for its one evaluation
        for i in range(n):
            eid = base_id + i
            if eid < len(self.run.evals):  # logged before a kill: reuse, never re-score
                rec = self.run.evals[eid]
                if not np.array_equal(np.asarray(rec.genome, dtype=np.float64), X[i]):
                    raise CheckpointError(f"evals.jsonl line id={eid} holds another genome than the resumed "
                                          "optimizer asks; the run directory is inconsistent, start a new run")
                log.recs[i] = rec
                continue
            cands[i] = space.decode(X[i])
            todo.setdefault(self._key(cands[i], X[i]), []).append(i)
        self.progress.start(gen, n, self._stage_best)
        for _ in range(n - len(cands)):
            self.progress.step(self._stage_best)

        def copy(rec: EvalRecord, i: int) -> EvalRecord:
            return rec.copy_for(id=base_id + i, generation=gen, stage=stage, genome=tuple(X[i].tolist()),
                                time=time.time())

        fresh = []  # distinct new candidate keys: each scored once; cached ones cost nothing
        for key, idx in todo.items():
            hit = self.cache.get(key)
            if hit is None:
                fresh.append(key)
            else:
                for i in idx:
                    log.add(i, copy(hit, i))
        xs, cs = [X[todo[k][0]] for k in fresh], [cands[todo[k][0]] for k in fresh]
        pre: dict[int, Any] = {}
        if self.subset is not None and fresh:
            self.subset.begin_generation(gen, self.backend, self.run.evals)
        if self.config.eval_dtype == "auto" and self.eval_dtype is None and self.config.needs_model and fresh:
            pre = self._choose_eval_dtype(xs, cs)
        racing = self.config.racing
        if racing.enabled and self.config.needs_model and fresh:
            # the measured candidates race like the others (a run resumed after the choice could not reuse their
            # whole-document results, and racing them keeps both runs' records alike)
            results = self._race(xs, cs, log.recs, elite)
        else:
            rest = [j for j in range(len(xs)) if j not in pre]
            # lazy: each result is recorded as its candidate finishes, so a pause waits for one candidate only
            results = itertools.chain(pre.items(), ((rest[j], r) for j, r in self.backend.evaluate(
                [xs[i] for i in rest], [cs[i] for i in rest])))
        for j, result in results:
            key = fresh[j]
            if self.subset is not None:
                result = self.subset.on_result(key, result, gen)
            first, *dups = todo[key]
            rec = EvalRecord(id=base_id + first, generation=gen, stage=stage, genome=tuple(X[first].tolist()),
                             candidate=cands[first].to_dict(), key=key, objectives=result.scores,
                             values=result.values, fitness=result.fitness, error=result.error, cached=False,
                             timings=result.timings, time=time.time(), infeasible=result.infeasible,
                             traceback=result.traceback, cost=result.cost, race=result.race,
                             estimate=result.estimate)
            self._remember(rec)
            log.add(first, rec)
            for i in dups:
                log.add(i, copy(rec, i))
            self._check_pause()  # a result waiting for a lower id is abandoned: the resume scores it again
        self.progress.end(gen, self._stage_best, len(self.run.evals))
        return log.recs  # type: ignore[return-value]

    def _choose_eval_dtype(self, xs, cs) -> dict[int, Any]:
        """``eval_dtype: auto``: the dtype :func:`~dfsmerge.search.eval_dtype.bf16_rule` proposes from the device
        and model A (no timing: reruns choose alike); a proposed bfloat16 is kept only when the first fresh
        candidates score alike in both dtypes (:func:`~dfsmerge.search.eval_dtype.verify_scores`). The choice is
        saved in the state. Returns the results in the chosen dtype (``{index: result}``) of the candidates scored
        to check it: they are this generation's evaluations of those candidates."""
        from dfsmerge.search.eval_dtype import EVAL_DTYPE_CHECK_CANDIDATES, bf16_rule, model_config, verify_scores
        from dfsmerge.search.worker import _device

        base = self.config.dtype
        proposal = bf16_rule(base, _device(self.config.device), model_config(next(iter(self.models.pool.values()))))
        fast, runs, k = proposal["dtype"], {}, min(EVAL_DTYPE_CHECK_CANDIDATES, len(xs))
        if fast == base:
            self.eval_dtype = proposal
        else:
            for d in (base, fast):
                self.backend.set_eval_dtype(d)
                runs[d] = dict(self.backend.evaluate(xs[:k], cs[:k]))
            self.eval_dtype = verify_scores(proposal, base, [runs[base][j] for j in range(k)],
                                            [runs[fast][j] for j in range(k)])
        chosen = self.eval_dtype["dtype"]
        self.backend.set_eval_dtype(chosen)
        d = self.eval_dtype.get("max_score_diff", 0.0)
        checked = (f"; scores within {'(a failure in one dtype)' if d is None else f'{d:.3g}'} on {k} candidates"
                   if runs else "")
        self.emit(f"eval_dtype auto: {proposal['rule']}{checked} -> scoring in {chosen}")
        if getattr(self, "_last_state", None) is not None:  # durable before any record scored in it is written
            self.run.write_state(replace(self._last_state, eval_dtype=self.eval_dtype))
        return runs.get(chosen, {})

    def _race(self, xs, cs, logged: list[EvalRecord | None], elite: int | None) -> list[tuple[int, Any]]:
        """Score the fresh candidates ``xs`` block by block, stopping those that cannot enter the elite
        (:func:`dfsmerge.search.racing.run_race`); the generation's records already known (logged before a kill,
        or cached) race as fixed entries, replayed from their logged blocks. Returns ``(index, result)`` pairs."""
        from dfsmerge.objectives.evaluator import EvalResult
        from dfsmerge.objectives.fitness import scalar_fitness
        from dfsmerge.search.racing import Tally, run_race

        rc, objectives = self.config.racing, self.config.objectives
        known = []
        for rec in logged:
            if rec is None:
                continue
            t = Tally.from_json(rec.race) if rec.race is not None else Tally(exact=dict(rec.values))
            t.error = rec.error if not rec.infeasible else None
            known.append(t)
        fresh = [Tally() for _ in xs]
        tallies = known + fresh
        todo = list(range(len(known), len(tallies)))
        failed: dict[int, Any] = {}

        def score_block(indices: list[int], block: int) -> None:
            self._check_pause()  # an unfinished race is abandoned: the resume runs it again from its logged entries
            sel = [i - len(known) for i in indices]
            for j, res in self.backend.evaluate([xs[i] for i in sel], [cs[i] for i in sel], block=block):
                i = sel[j]
                if res.error is not None or res.partial is None:
                    fresh[i].error = res.error or "no block result"
                    failed[i] = res
                else:
                    fresh[i].add(res.partial, res.scores, res.values, res.cost, res.timings)

        best = self._stage_best.fitness if self._stage_best is not None else math.inf
        run_race(tallies, todo, score_block, n_blocks=rc.blocks, bound=rc.bound, delta=rc.delta,
                 objectives=objectives, elite=elite,
                 best_known=best)
        out = []
        for i, t in enumerate(fresh):
            if i in failed:
                out.append((i, failed[i]))
                continue
            values = {o.key: t.values().get(o.key, math.inf) for o in objectives}
            scores = {**t.exact_scores, **t.estimate()}
            out.append((i, EvalResult(results={}, scores={o.key: scores.get(o.key) for o in objectives},
                                      values=values, fitness=scalar_fitness(values, objectives), cost=dict(t.cost),
                                      timings=dict(t.timings), race=t.to_json(rc.blocks))))
        return out

    def _append(self, rec: EvalRecord) -> None:
        """Write one record, then update the failure count, the stage's best and the progress bar."""
        self.run.append_eval(rec)
        self._count_failure(rec)
        if math.isfinite(rec.fitness) and (self._stage_best is None or rec.fitness < self._stage_best.fitness):
            self._stage_best = rec
        self.progress.step(self._stage_best)
        self._check_pause()

    def _check_pause(self) -> None:
        """Raise :class:`SearchPaused` once SIGINT/SIGTERM asked for a pause (called between candidates)."""
        pause = getattr(self, "_pause", None)
        if pause is not None and pause.requested is not None:
            raise SearchPaused(pause.requested, self.run.path, len(self.run.evals))

    def _count_failure(self, rec: EvalRecord) -> None:
        if rec.error and not rec.infeasible and not rec.cached:
            self.consecutive_failures += 1
            b, path = self._budget(rec.stage)
            limit = b.max_consecutive_failures
            if self.consecutive_failures >= limit:
                raise SearchFailedError(
                    f"{self.consecutive_failures} consecutive candidates failed ({path}max_consecutive_failures="
                    f"{limit}); last error (id {rec.id}): {rec.error}. Fix the cause and continue with --resume")
        elif not rec.error:
            self.consecutive_failures = 0

    # ---------------------------------------------------------------- best / outputs
    def _best_of(self, offset: int) -> EvalRecord | None:
        best = None
        for rec in self.run.evals[offset:]:
            if math.isfinite(rec.fitness) and (best is None or rec.fitness < best.fitness):
                best = rec
        return best

    def finish(self, offset: int) -> SearchResult:
        """Write ``best/``, ``pareto.jsonl`` (multi-objective) and ``report/``; return the result."""
        from dfsmerge.search.outputs import pareto_records, write_best

        outputs: dict[str, Path] = {}
        rec = self._best_of(offset)
        best = None if rec is None else rec.to_json()
        if self.subset is not None:  # the elite scored on every document: the best is never an estimate
            best = self.subset.final_best(self.run.evals[offset:], self.space, self.backend)
        if best is not None:
            outputs.update(write_best(self.run.best_dir, best, self.space))
        pareto: list[dict[str, Any]] = []
        if self.config.n_obj > 1:
            keys = [o.key for o in self.config.objectives]
            pareto = [r.to_json() for r in pareto_records(self.run.evals[offset:], keys)]
            text = "".join(json.dumps({"id": r["id"], "values": {k: r["values"][k] for k in keys},
                                       "objectives": r["objectives"], "candidate": r["candidate"]}) + "\n"
                           for r in pareto)
            from dfsmerge.search.state import atomic_write

            atomic_write(self.run.pareto_path, text)
            outputs["pareto"] = self.run.pareto_path
        try:
            from dfsmerge.report import write_report

            outputs["report"] = write_report(self.run.path)
        except Exception as e:  # noqa: BLE001 - a plotting problem must not lose a finished search
            from dfsmerge.io.diskspace import disk_full_error, is_disk_full

            if is_disk_full(e):  # a full disk is not a plotting problem: stop, the resume writes it again
                from dfsmerge.search.state import DISK_FULL_FIX

                old = sum(f.stat().st_size for f in self.run.report_dir.glob("*") if f.is_file())
                raise disk_full_error(self.run.report_dir, max(old, 1 << 20), fix=DISK_FULL_FIX) from None
            self.emit(f"warning: report not written ({type(e).__name__}: {e}); run `dfsmerge inspect RUN` to retry")
        return SearchResult(run_dir=self.run.path, n_evals=len(self.run.evals), best=best, pareto=pareto,
                            stop_reason=self.stop_reason, outputs=outputs)


def run_search(config: SearchConfig | str | Path, out: str | Path, *, resume: bool = False, progress: bool = True,
               address: str | None = None, emit: Callable[[str], None] | None = None, backend=None,
               max_memory: int | None = None, **overrides: Any) -> SearchResult:
    """Run (or resume) a search and write its run directory.

    Args:
        config: a :class:`SearchConfig` or a config file path.
        out: the run directory (new and empty unless ``resume``).
        resume: continue the run in ``out`` (killed or finished: a raised budget continues it).
        progress: tqdm bar per generation on a terminal (``"force"``: always); else one log line per generation.
        address: Ray cluster address (``backend: ray``).
        emit: where progress lines go (default: the ``dfsmerge.search`` logger).
        backend: a ready backend (tests); default from ``config.backend``.
        max_memory: bytes a worker may hold (``--max-memory``); default the machine's memory. A config whose
            estimated peak (:mod:`dfsmerge.runtime.memory`) exceeds it is refused before anything is loaded.
        **overrides: dotted config overrides, e.g. ``{"budget.max_evals": 10}`` (None values ignored).

    Returns:
        The :class:`SearchResult`.

    Raises:
        ConfigError: invalid config or overrides. OutputExistsError: ``out`` is not empty and not ``resume``.
        CheckpointError: ``resume`` on something that is not a run. SearchFailedError: consecutive failures.
    """
    if not isinstance(config, SearchConfig):
        config = load_search_config(config)
    if overrides:
        config = config.with_overrides(**overrides)
    return Search(config, out, resume=resume, progress=progress, address=address, emit=emit,
                  backend=backend, max_memory=max_memory).run_loop()
