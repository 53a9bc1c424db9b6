"""Ad-hoc experiments, for notebooks and ``dfsmerge eval``: score a model or plan on tasks, and compare several on
the same documents with paired tests (:mod:`dfsmerge.report.significance`).

The scoring is ``dfsmerge eval``'s (:func:`dfsmerge.objectives.evaluate_model` over
:func:`dfsmerge.runtime.loading.load_model_or_plan`), so a number here equals the command's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dfsmerge.errors import ConfigError


def load_plan(path: str | Path):
    """A :class:`dfsmerge.genome.plan.PathPlan` from a plan file, or from a directory holding ``plan.yaml`` (a run's
    ``best/``, a row of ``RUN/ablation/rows/``).

    Raises:
        ConfigError: no plan there (names what to pass instead).
    """
    from dfsmerge.genome.plan import PathPlan

    p = Path(path)
    if p.is_dir():
        p = p / "plan.yaml"
    if not p.is_file():
        raise ConfigError(f"load_plan: {str(path)!r} is neither a plan file nor a directory with plan.yaml; pass a "
                          "plan YAML (models/base/path), RUN/best or an ablation row directory")
    return PathPlan.load(p)


def _tasks(tasks: str | Sequence[str]) -> list[str]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise ConfigError("tasks is empty; name at least one task (e.g. tasks='zoo_math_b')")
    return names


def evaluate(model_or_plan: Any, tasks: str | Sequence[str], *, tokenizer=None, split: str | None = None,
             limit: int | float | None = None, native: bool = False, task_paths: Sequence[str | Path] = (),
             zoo: str | Path | None = None, batch_size: int = 16, device: str = "cpu", dtype: str = "float32",
             allow_pickle: bool = False, per_document: bool = False, **options: Any) -> dict[str, Any]:
    """Score a model on tasks, as ``dfsmerge eval`` does.

    Args:
        model_or_plan: a checkpoint directory, hub id, ``zoo:<name>``, plan file or candidate directory (``plan.yaml``
            inside), a :class:`~dfsmerge.genome.plan.PathPlan`, or a loaded model (then pass ``tokenizer``).
        tasks: task names (a list or ``"a,b"``).
        split, limit, native, batch_size: as ``dfsmerge eval``. task_paths: custom task YAML directories.
        zoo: the toy zoo's directory (resolves ``zoo:<name>`` and adds its tasks).
        per_document: also return each document's value (``"per_document": {task: [values]}``).
        options: further objective fields (``num_fewshot``, ``apply_chat_template``, ``gen_kwargs``, ...), as
            :func:`dfsmerge.objectives.evaluate_model` takes them.

    Returns:
        ``{"results": {task: {metric: value}}}`` (and ``"per_document"`` when asked).

    Raises:
        ConfigError: unknown task, empty split, a loaded model without ``tokenizer``.
        CheckpointError: nothing loadable at ``model_or_plan``.
    """
    from dfsmerge.io.dtypes import torch_dtype
    from dfsmerge.objectives import evaluate_model

    paths = [str(p) for p in task_paths]
    if zoo is not None:
        from dfsmerge.zoo import load_zoo

        paths.append(str(load_zoo(zoo).task_dir))
    model, tok = _load(model_or_plan, tokenizer=tokenizer, zoo=zoo, device=device, dtype=torch_dtype(dtype),
                       allow_pickle=allow_pickle)
    lim = None if limit is None else (int(limit) if limit >= 1 else limit)
    return evaluate_model(model, tok, _tasks(tasks), task_paths=paths, batch_size=batch_size, split=split, limit=lim,
                          native=native, per_document=per_document, **options)


def _load(ref: Any, *, tokenizer, zoo, device, dtype, allow_pickle):
    import torch

    from dfsmerge.genome.plan import PathPlan
    from dfsmerge.runtime.loading import load_model_or_plan, resolve_model_ref

    if isinstance(ref, torch.nn.Module):
        if tokenizer is None:
            raise ConfigError("evaluate: a loaded model needs its tokenizer; pass tokenizer=...")
        return ref, tokenizer
    if isinstance(ref, PathPlan):
        from dfsmerge.runtime.pool import LayerPool
        from dfsmerge.runtime.stitched import StitchedModel

        models = {n: resolve_model_ref(s, zoo_dir=zoo) for n, s in ref.models.items()}
        pool = LayerPool(models, base=ref.base, device=device, dtype=dtype)
        return StitchedModel.from_pool(pool, ref), pool.tokenizer
    p = Path(str(ref))
    if p.is_dir() and (p / "plan.yaml").is_file() and not (p / "config.json").is_file():
        ref = p / "plan.yaml"  # a candidate directory (RUN/best, an ablation row)
    return load_model_or_plan(ref, device=device, dtype=dtype, allow_pickle=allow_pickle, zoo_dir=zoo)


def eval_options(run: Any) -> dict[str, Any]:
    """The keyword arguments that score models as a run scored its candidates: ``tasks``, ``task_paths`` (the
    config's and the toy zoo's), ``native``, ``limit``, ``split`` and ``batch_size``, for :func:`evaluate` and
    :func:`compare` (``run``: a path or :func:`dfsmerge.open_run`'s view).

    Raises:
        ConfigError: the run has no task objective.
    """
    from dfsmerge.rundir.reader import RunReader
    from dfsmerge.search.config import load_search_config
    from dfsmerge.search.space import resolve_models

    reader = run if isinstance(run, RunReader) else RunReader.open(run)
    cfg = load_search_config(reader.config)
    objs = [o for o in cfg.objectives if getattr(o, "type", "task") == "task"]
    if not objs:
        raise ConfigError(f"{reader.path}: the run has no task objective; pass tasks=... to evaluate yourself")
    return {"tasks": list(dict.fromkeys(o.name for o in objs)), "task_paths": list(resolve_models(cfg).task_paths),
            "native": all(o.native for o in objs), "limit": objs[0].limit, "split": objs[0].split,
            "batch_size": cfg.batch_size}


@dataclass(frozen=True)
class Comparison:
    """Several models scored on the same documents.

    Attributes:
        models: the models as given. results: each model's ``{"results": ...}``.
        tests: ``{(i, task key): PairedTest}`` of model i against model 0 (i >= 1), on each task's objective
            metric (``acc,none`` where the task has it, else its first metric).
    """

    models: tuple[str, ...]
    results: tuple[dict[str, Any], ...]
    tests: dict[tuple[int, str], Any]

    def format(self) -> str:
        """A plain-text table of the paired differences against the first model."""
        from dfsmerge.objectives import format_table

        lines = []
        for name, res in zip(self.models, self.results, strict=True):
            lines += [f"== {name}", format_table(res), ""]
        lines.append(f"paired differences against {self.models[0]} (same documents):")
        for (i, key), t in self.tests.items():
            lines.append(f"  {self.models[i]} - {self.models[0]}  {key}: {t.describe()}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"models": list(self.models), "results": [r["results"] for r in self.results],
                "paired": [{"model": self.models[i], "against": self.models[0], "task": k, **t.to_json()}
                           for (i, k), t in self.tests.items()]}


def compare(models: Sequence[Any], tasks: str | Sequence[str], **kwargs: Any) -> Comparison:
    """Score every model on the same documents and test each against the first (exact McNemar for 0/1 outcomes,
    paired bootstrap otherwise).

    Args:
        models: two or more models or plans (what :func:`evaluate` takes).
        tasks, kwargs: as :func:`evaluate`.

    Raises:
        ConfigError: fewer than two models; the errors of :func:`evaluate`.
    """
    from dfsmerge.report.significance import paired_test

    if len(models) < 2:
        raise ConfigError(f"compare: {len(models)} model given; pass two or more to compare them")
    results = []
    for m in models:
        results.append(evaluate(m, tasks, per_document=True, **kwargs))
    first = results[0]["per_document"]
    tests = {(i, k): paired_test(r["per_document"][k], first[k])
             for i, r in enumerate(results[1:], start=1) for k in first}
    return Comparison(tuple(str(m) for m in models), tuple({"results": r["results"]} for r in results), tests)
