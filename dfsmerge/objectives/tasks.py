"""lm-eval tasks as objectives: finding, loading and validating them once, before a search starts, and scoring a
model on them through :class:`dfsmerge.objectives.lm_adapter.DfsLM` without reseeding the caller's RNGs.

Unlike mergekit-evolve (which calls ``simple_evaluate`` per candidate, reloading every dataset), tasks are loaded once
into a :class:`TaskSuite` and each candidate is scored with ``lm_eval.evaluator.evaluate`` over the prepared tasks.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dfsmerge.errors import ConfigError, DfsmergeError
from dfsmerge.objectives.config import EvalConfig, ObjectiveConfig
from dfsmerge.objectives.subset import require_native_mean

log = logging.getLogger(__name__)

#: output types the adapter implements.
SUPPORTED_OUTPUT_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice", "generate_until")


@contextlib.contextmanager
def preserve_rng() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's (CPU and CUDA) global RNG states on exit.

    lm-eval draws from Python's global ``random`` as a side effect (``Task.task_name`` evaluates
    ``random_task_id()`` on every access), which would make a search's draws depend on how often it evaluates.
    """
    import numpy as np
    import torch

    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def simple_evaluate(lm, tasks: list[str], *, task_paths=(), include_defaults: bool = False, limit=None,
                    fewshot_random_seed: int = 1234, **kwargs) -> dict:
    """``lm_eval.simple_evaluate`` over ``lm`` that neither reseeds nor advances the caller's global RNGs.

    Args:
        lm: an ``lm_eval`` LM, e.g. :class:`dfsmerge.objectives.lm_adapter.DfsLM`.
        tasks: task names.
        task_paths: custom task YAML directories (``TaskManager(include_path=...)``).
        include_defaults: also index lm-eval's built-in tasks.
        kwargs: passed to ``lm_eval.simple_evaluate`` (seeds are forced to None, except the few-shot one).
    """
    from dfsmerge.objectives.lm_eval_compat import TaskManager, run_simple_evaluate

    with preserve_rng():
        tm = TaskManager(include_path=task_dirs(task_paths) or None, include_defaults=include_defaults)
        return run_simple_evaluate(lm, tasks, task_manager=tm, limit=limit, random_seed=None,
                                   numpy_random_seed=None, torch_random_seed=None,
                                   fewshot_random_seed=fewshot_random_seed, **kwargs)


def task_dirs(task_paths) -> list[str]:
    """Absolute task directories for ``task_paths`` entries: directories, or ``real:<set>/tasks`` (the tasks of a
    built expert set, :mod:`dfsmerge.zoo.experts`).

    Raises:
        ConfigError: an entry that is not a directory.
    """
    out = []
    for p in task_paths:
        if str(p).startswith("real:"):
            from dfsmerge.io.realmodels import real_task_dir

            p = real_task_dir(str(p)[len("real:"):])
        if not Path(p).is_dir():
            raise ConfigError(f"task_paths entry {str(p)!r} is not a directory; pass a directory of task YAML files")
        out.append(str(Path(p).resolve()))
    return out


def make_task_manager(names: list[str] | tuple[str, ...], task_paths: tuple[str, ...] | list[str] = (), *,
                      builtin_tasks: bool = True):
    """A ``TaskManager`` that knows ``names``: custom paths only when they suffice, else with lm-eval's built-ins
    (when ``builtin_tasks``).

    Raises:
        ConfigError: a task path is not a directory, or a name is neither a custom nor a built-in task.
    """
    from dfsmerge.objectives.lm_eval_compat import TaskManager

    paths = task_dirs(task_paths)
    tm = TaskManager(include_path=paths or None, include_defaults=False) if paths else None
    if builtin_tasks and (tm is None or any(n not in tm.all_tasks for n in names)):
        tm = TaskManager(include_path=paths or None, include_defaults=True)
    known = tm.all_tasks if tm is not None else []  # no custom paths and built-ins off: nothing is known
    for n in names:
        if n not in known:
            close = difflib.get_close_matches(n, known, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else "check the name or add --task-search-path DIR"
            where = (", ".join(paths) or "no custom paths") + (" and lm-eval's built-in tasks" if builtin_tasks else "")
            raise ConfigError(f"objectives.name={n!r} is not a known lm-eval task (searched {where}); {hint}")
    return tm


def _count_docs(task) -> int:
    try:
        return len(task.eval_docs)
    except (TypeError, ValueError):
        return sum(1 for _ in task.eval_docs)


@dataclass
class PreparedTask:
    """One task objective, loaded once: the lm-eval ``Task``, its metric direction and its doc count."""

    objective: ObjectiveConfig
    task: Any  # lm_eval.api.task.Task
    metric: str  # resolved metric key
    direction: str  # "maximize" | "minimize"
    n_docs: int
    split: str
    builtin: bool
    native: Any = None  # NativeTask when objective.native
    extra: dict = field(default_factory=dict)

    @property
    def limit(self) -> int | None:
        lim = self.objective.limit
        if lim is None:
            return None
        return max(1, int(math.ceil(lim * self.n_docs))) if isinstance(lim, float) and lim <= 1 else int(lim)


def _empty_data_files(tm, name: str) -> list[str]:
    from dfsmerge.objectives.lm_eval_compat import task_index_entry

    files = (task_index_entry(tm, name)[1].get("dataset_kwargs") or {}).get("data_files") or {}
    files = files.values() if isinstance(files, dict) else [files] if isinstance(files, str) else files
    flat = [f for v in files for f in ([v] if isinstance(v, str) else v)]
    return [f"{f}" for f in flat if Path(f).is_file() and not Path(f).read_text().strip()]


def _load_one(tm, obj: ObjectiveConfig, cfg: EvalConfig):
    from dfsmerge.objectives.lm_eval_compat import no_progress_bars

    try:
        with no_progress_bars():
            loaded = tm.load([obj.name])
    except DfsmergeError:
        raise
    except Exception as e:  # noqa: BLE001 - lm-eval/datasets raise many types; name the task and the cause
        empty = _empty_data_files(tm, obj.name)
        if empty:
            raise ConfigError(f"task {obj.name!r}: data file(s) {', '.join(empty)} are empty (0 documents); "
                              "point the task's data_files at non-empty JSONL files") from e
        raise ConfigError(f"objectives.name={obj.name!r} could not be loaded by lm-eval "
                          f"({type(e).__name__}: {e}); check the task YAML, its dataset_path/data_files and "
                          f"split={obj.split!r}") from e
    tasks = loaded["tasks"]
    if len(tasks) != 1 or loaded.get("groups"):
        raise ConfigError(f"objectives.name={obj.name!r} is a group or tag of {len(tasks)} tasks; list its tasks "
                          f"as separate objectives: {', '.join(sorted(tasks))}")
    task = next(iter(tasks.values()))
    if obj.split is not None:  # lm-eval scores test_split when set: point it at the chosen split
        task.set_config(key="test_split", value=obj.split)
    if obj.num_fewshot is not None:
        task.set_config(key="num_fewshot", value=obj.num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=cfg.fewshot_random_seed)
    if obj.gen_kwargs is not None:  # as lm-eval's simple_evaluate applies --gen_kwargs
        if task.OUTPUT_TYPE != "generate_until":
            raise ConfigError(f"objectives[{obj.name}].gen_kwargs is set but task {obj.name!r} has output_type="
                              f"{task.OUTPUT_TYPE!r}; generation settings apply to generate_until tasks: remove it")
        task.set_config(key="generation_kwargs", value=obj.gen_kwargs.as_task_kwargs(), update=True)
    return task


def _validate(task, obj: ObjectiveConfig, cfg: EvalConfig, builtin: bool) -> tuple[str, str, int, str]:
    out_type = task.OUTPUT_TYPE
    if out_type not in SUPPORTED_OUTPUT_TYPES:
        raise ConfigError(f"task {obj.name!r} has output_type={out_type!r}, which the dfsmerge adapter does not "
                          f"implement; use a task with one of {', '.join(SUPPORTED_OUTPUT_TYPES)}")
    if task.config.doc_to_image or task.config.doc_to_audio:
        raise ConfigError(f"task {obj.name!r} needs images/audio (doc_to_image/doc_to_audio), which a text-only "
                          "merged model cannot take; choose a text task")
    from dfsmerge.objectives.lm_eval_compat import produced_metrics

    if out_type == "generate_until":
        from dfsmerge.objectives.lm_adapter import check_generation_kwargs

        check_generation_kwargs(dict(task.config.generation_kwargs or {}), task=obj.name)
    metrics = produced_metrics(task)
    metric = obj.metric or ("acc,none" if "acc,none" in metrics or not metrics else metrics[0])
    if metric not in metrics:
        raise ConfigError(f"objectives[{obj.name}].metric={metric!r} is not produced by task {obj.name!r}; "
                          f"use one of {', '.join(metrics)}")
    hib = task.higher_is_better().get(metric.split(",")[0], True)
    direction = obj.direction or ("maximize" if hib else "minimize")
    if task.has_test_docs():
        split = task.config.test_split
    elif task.has_validation_docs():
        split = task.config.validation_split
    else:
        raise ConfigError(f"task {obj.name!r} has no test or validation split to score; set objectives.split to "
                          "a split its dataset has")
    try:
        n = _count_docs(task)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"task {obj.name!r}: split {split!r} could not be read ({type(e).__name__}: {e}); "
                          "set objectives.split to a split the dataset has") from e
    if n == 0:
        raise ConfigError(f"task {obj.name!r}: split {split!r} is empty (0 documents); point the task at a "
                          "non-empty file or choose another split with objectives.split")
    if builtin:
        _guard_test_split(obj, split, task.config.test_split, cfg)
    return metric, direction, n, split


def _guard_test_split(obj: ObjectiveConfig, split: str | None, test_split: str | None, cfg: EvalConfig) -> None:
    """Refuse to optimise on a built-in benchmark's test split unless explicitly allowed (as mergekit-evolve)."""
    if split is not None and split in (test_split, "test") and not cfg.allow_benchmark_test_split:
        raise ConfigError(
            f"objectives[{obj.name}].split={split!r} is the test split of lm-eval's built-in benchmark "
            f"{obj.name!r}; optimising on it makes its final score meaningless; set objectives.split to "
            "'validation' (or another held-in split), or set allow_benchmark_test_split: true if you mean it")


def block_ends(n: int, k: int, batch: int) -> list[int]:
    """Where ``k`` racing blocks over ``n`` documents end: near equal, each end moved to the nearest multiple of
    ``batch`` when every block stays non-empty, so scoring block by block runs no more (partial) batches than scoring
    all at once (a partial batch costs about as much as a full one on small models: a toy joint search with racing,
    batches of 16, took 7% more time per document than without with even blocks, 0-4% with aligned ones)."""
    even = [(b + 1) * n // k for b in range(k)]
    aligned = [min(n, round(e / batch) * batch) for e in even[:-1]] + [n]
    if all(lo < hi for lo, hi in zip([0, *aligned[:-1]], aligned, strict=True)):
        return aligned
    return even


class TaskSuite:
    """All task objectives of a search, loaded and validated once (see :func:`prepare_tasks`).

    Args:
        config: the evaluation config.
        tokenizer: needed only when some objective is native (prompts are tokenised once).

    Raises:
        ConfigError: unknown task, metric not produced, empty split, unsupported feature, benchmark test split.
    """

    def __init__(self, config: EvalConfig, tokenizer=None) -> None:
        with preserve_rng():
            self._init(config, tokenizer)

    def _init(self, config: EvalConfig, tokenizer) -> None:
        from dfsmerge.objectives.lm_eval_compat import builtin_tasks_dir, task_index_entry

        self.config = config
        objs = config.task_objectives
        self.task_manager = (make_task_manager([o.name for o in objs], config.task_paths,
                                               builtin_tasks=config.builtin_tasks) if objs else None)
        builtin_dir = builtin_tasks_dir()
        self.prepared: list[PreparedTask] = []
        seen: dict[str, ObjectiveConfig] = {}
        for obj in objs:
            spec = ("split", "limit", "num_fewshot", "native", "apply_chat_template", "system_instruction",
                    "fewshot_as_multiturn", "gen_kwargs")
            first = seen.setdefault(obj.name, obj)
            if any(getattr(first, k) != getattr(obj, k) for k in spec):
                raise ConfigError(f"task {obj.name!r} appears in two objectives with different "
                                  f"{'/'.join(k for k in spec if getattr(first, k) != getattr(obj, k))}; a task is "
                                  "scored once per candidate: give both objectives the same settings")
            twin = next((p for p in self.prepared if p.objective.name == obj.name), None)
            if twin is not None:  # another metric of an already prepared task: score the task once
                metric, direction, _, _ = _validate(twin.task, obj, config, twin.builtin)
                self.prepared.append(PreparedTask(objective=obj, task=twin.task, metric=metric, direction=direction,
                                                  n_docs=twin.n_docs, split=twin.split, builtin=twin.builtin,
                                                  native=twin.native, extra={"twin": True}))
                continue
            yaml_path, cfg = task_index_entry(self.task_manager, obj.name)
            builtin = yaml_path is not None and builtin_dir in Path(yaml_path).resolve().parents
            if builtin and (cfg.get("test_split") or cfg.get("validation_split")):  # guard before any download
                _guard_test_split(obj, obj.split or cfg.get("test_split") or cfg.get("validation_split"),
                                  cfg.get("test_split"), config)
            task = _load_one(self.task_manager, obj, config)
            metric, direction, n, split = _validate(task, obj, config, builtin)
            pt = PreparedTask(objective=obj, task=task, metric=metric, direction=direction, n_docs=n, split=split,
                              builtin=builtin)
            if obj.native:
                from dfsmerge.objectives.native import NativeTask

                if tokenizer is None:
                    raise ConfigError(f"objective {obj.name!r} is native but no tokenizer was given; pass the "
                                      "tokenizer of model A to prepare_tasks")
                pt.native = NativeTask(task, limit=pt.limit, tokenizer=tokenizer, batch_size=config.batch_size,
                                       max_gen_toks=config.max_gen_toks, share_prompts=config.share_prompts,
                                       chat_args=obj.chat_args)
            self.prepared.append(pt)

    def directions(self) -> dict[str, str]:
        """``{objective key: 'maximize' | 'minimize'}`` for the task objectives."""
        return {p.objective.key: p.direction for p in self.prepared}

    def metrics(self) -> dict[str, str]:
        """``{objective key: resolved metric key}`` for the task objectives."""
        return {p.objective.key: p.metric for p in self.prepared}

    def evaluate(self, model, tokenizer, *, scorer=None) -> dict[str, dict[str, float]]:
        """Score ``model`` on every task; returns ``{task: {metric key: value}}`` (lm-eval's keys).

        Args:
            model: HF-like causal LM (see :mod:`dfsmerge.objectives.lm_adapter`).
            tokenizer: its tokenizer.
            scorer: an existing :class:`dfsmerge.objectives.lm_adapter.Scorer` to score the harness tasks with (a
                search reuses one for every candidate); default: a new one with this suite's settings.
        """
        with preserve_rng():
            return self._evaluate(model, tokenizer, scorer)

    # ---- racing: documents in blocks ---------------------------------------------------------------------
    def race_blocks(self, n_blocks: int, seed: int) -> None:
        """Split every task's documents into ``n_blocks`` blocks of a fixed shuffle (seeded), for
        :meth:`evaluate_block`.

        Raises:
            ConfigError: an objective is not native, or its metric is not a mean of per-document scores.
        """
        import numpy as np

        self._blocks: dict[str, list[list[int]]] = {}
        for p in self.prepared:
            o = p.objective
            require_native_mean(p, "racing.enabled=true", "racing", "set racing.enabled: false")
            if o.name not in self._blocks:
                n = len(p.native.docs)
                order = np.random.default_rng([seed, n]).permutation(n).tolist()
                k = min(n_blocks, n)
                ends = block_ends(n, k, self.config.batch_size)
                self._blocks[o.name] = ([order[lo:hi] for lo, hi in zip([0, *ends[:-1]], ends, strict=True)]
                                        + [[]] * (n_blocks - k))

    def evaluate_block(self, model, block: int) -> dict[str, tuple[float, int, int]]:
        """Score block ``block`` of every task (see :meth:`race_blocks`): ``{objective key: (sum of the
        per-document values, documents scored, documents in all)}``.

        Raises:
            ConfigError: a per-document value outside [0, 1] (racing's bounds need it).
        """
        out: dict[str, tuple[float, int, int]] = {}
        with preserve_rng():
            per_task = {}
            for p in self.prepared:
                name = p.objective.name
                if name not in per_task:
                    pos = self._blocks[name][block]
                    per_task[name] = p.native.per_doc(model, pos) if pos else {}
                metric = p.metric.split(",")[0]
                vals = [float(v) for v in per_task[name].get(metric, [])]
                if any(not 0.0 <= v <= 1.0 for v in vals):
                    raise ConfigError(f"racing: objective {name!r} metric {metric!r} has per-document values outside "
                                      "[0, 1]; racing's bounds need them in [0, 1]: set racing.enabled: false")
                out[p.objective.key] = (math.fsum(vals), len(vals), len(p.native.docs))
        return out

    def per_document(self, model, tokenizer, *, scorer=None) -> dict[str, list[float]]:
        """Each document's value of every task objective's metric, in document order: ``{objective key: [value per
        document]}``; their mean is the task's score for mean-aggregated metrics (acc, exact_match). Scores are not
        changed: this runs the same requests as :meth:`evaluate`, keeping what lm-eval aggregates away.

        Raises:
            ConfigError: a metric without per-document values (an aggregate such as perplexity).
        """
        with preserve_rng():
            return self._per_document(model, tokenizer, scorer)

    def _per_document(self, model, tokenizer, scorer) -> dict[str, list[float]]:
        from dfsmerge.objectives.lm_adapter import DfsLM
        from dfsmerge.objectives.lm_eval_compat import evaluate_task_samples

        by_task: dict[str, dict[str, list[float]]] = {}
        for p in self.prepared:
            name = p.objective.name
            if name in by_task:
                continue
            if p.native is not None:
                by_task[name] = {m: [float(v) for v in vs] for m, vs in p.native.per_doc(model).items()}
                continue
            lm = DfsLM(model, tokenizer, batch_size=self.config.batch_size, max_gen_toks=self.config.max_gen_toks,
                       scorer=scorer)
            samples = evaluate_task_samples(lm, {p.task.task_name: p.task}, limit=p.limit,
                                            **p.objective.chat_args)[p.task.task_name]
            per: dict[str, list[tuple[int, float]]] = {}
            for s in samples:
                for m in s.get("metrics", []):
                    per.setdefault(f"{m},{s['filter']}", []).append((int(s["doc_id"]), s[m]))
            by_task[name] = {}
            for key, vals in per.items():
                vals.sort()
                by_task[name][key] = [float(v) for _, v in vals]
        out: dict[str, list[float]] = {}
        for p in self.prepared:
            vals = by_task[p.objective.name]
            metric = p.metric if p.native is None else p.metric.split(",")[0]
            if metric not in vals or any(not isinstance(v, float) for v in vals[metric]):
                raise ConfigError(f"objective {p.objective.key!r}: metric {p.metric!r} has no per-document values "
                                  "(an aggregate over the corpus); paired tests need a per-document metric such as "
                                  "acc or exact_match")
            out[p.objective.key] = vals[metric]
        return out

    def _evaluate(self, model, tokenizer, scorer) -> dict[str, dict[str, float]]:
        from dfsmerge.objectives.lm_adapter import DfsLM
        from dfsmerge.objectives.lm_eval_compat import evaluate_tasks

        results: dict[str, dict[str, float]] = {}
        first = [p for p in self.prepared if not p.extra.get("twin")]
        for p in first:
            if p.native is not None:
                results[p.objective.name] = p.native.evaluate(model)
        harness = [p for p in first if p.native is None]
        if harness:
            lm = DfsLM(model, tokenizer, batch_size=self.config.batch_size, max_gen_toks=self.config.max_gen_toks,
                       scorer=scorer)
            by_limit: dict[tuple, list[PreparedTask]] = {}  # one lm-eval call per limit and prompt options
            for p in harness:
                by_limit.setdefault((p.limit, tuple(p.objective.chat_args.items())), []).append(p)
            for (limit, chat), group in by_limit.items():
                out = evaluate_tasks(lm, {p.task.task_name: p.task for p in group}, limit=limit, **dict(chat))
                for p in group:
                    res = out[p.task.task_name]
                    results[p.objective.name] = {k: _num(v) for k, v in res.items()
                                                 if k not in ("alias", "name", "sample_len") and "_stderr" not in k}
        return results


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def prepare_tasks(config: EvalConfig, tokenizer=None) -> TaskSuite:
    """Load and validate every task objective of ``config`` (call once, before the search starts).

    Raises:
        ConfigError: see :class:`TaskSuite`.
    """
    return TaskSuite(config, tokenizer)
