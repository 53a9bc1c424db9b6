"""The one module that touches lm-eval: its helpers, its task objects' non-public parts and its evaluation entry
points. Everything else in dfsmerge goes through the names defined here, so an lm-eval upgrade is checked in one
place (:func:`check_lm_eval_version`, run on import, before anything of lm-eval's is read) and fails with a
one-line error instead of silently changing scores.

What is relied on, per lm-eval 0.4.x (``lm_eval/api/task.py``, ``lm_eval/models/utils.py``, ``evaluator.py``):

- a task's requests are built by ``build_all_requests`` into ``Task._instances``; its metrics and their options are
  ``Task._metric_fn_list`` / ``Task._metric_fn_kwargs``; its filters are ``Task._filters``;
- ``TaskManager.task_index[name]`` holds the task's ``yaml_path`` and raw ``cfg``;
- ``lm_eval.evaluator.evaluate`` takes ``{"tasks": {name: task}, "groups": {}, "group_map": {}}``;
- the tokenisation and batching helpers of ``HFLM`` (``lm_eval.models.utils``), which the adapter reuses so that
  its numbers equal ``HFLM``'s.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from packaging.specifiers import SpecifierSet

from dfsmerge.errors import ConfigError

SUPPORTED_LM_EVAL = ">=0.4.13,<0.5"
"""lm-eval versions this module was checked against (pyproject's pin; tests/objectives/test_lm_eval_compat.py)."""


def check_lm_eval_version(version: str | None = None) -> str:
    """Raise unless ``version`` (default: the installed lm-eval's) is in :data:`SUPPORTED_LM_EVAL`.

    Returns:
        The version checked.

    Raises:
        ConfigError: one line naming the installed version, the supported range and the fix.
    """
    if version is None:
        try:
            version = importlib.metadata.version("lm_eval")
        except importlib.metadata.PackageNotFoundError:
            raise ConfigError(f"lm-eval is not installed; task objectives need it: pip install "
                              f"'lm-eval{SUPPORTED_LM_EVAL}'") from None
    if version not in SpecifierSet(SUPPORTED_LM_EVAL):
        raise ConfigError(f"lm-eval {version} is installed but dfsmerge supports lm-eval{SUPPORTED_LM_EVAL} (it reads "
                          f"lm-eval internals that other versions change); pip install 'lm-eval{SUPPORTED_LM_EVAL}'")
    return version


check_lm_eval_version()

# ruff: noqa: E402 - lm-eval is imported only once its version is known to be supported
import lm_eval
import lm_eval.tasks
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.evaluator import evaluate as _lm_evaluate
from lm_eval.models.utils import (
    Collator,
    configure_pad_token,
    handle_stop_sequences,
    has_bos_prefix,
    postprocess_generated_text,
    resolve_max_length,
)
from lm_eval.models.utils import _add_special_kwargs as _special_kwargs
from lm_eval.models.utils_hf import pad_and_concat
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

__all__ = [
    "SUPPORTED_LM_EVAL", "Collator", "Instance", "TaskManager", "TemplateLM", "builtin_tasks_dir",
    "check_lm_eval_version", "configure_pad_token", "evaluate_tasks", "get_rolling_token_windows",
    "handle_stop_sequences", "has_bos_prefix", "make_disjoint_window", "memoize_doc_fields", "metric_options",
    "pad_and_concat", "postprocess_generated_text", "prepared_instances", "produced_metrics", "resolve_max_length",
    "run_simple_evaluate", "special_tokens_kwargs", "task_index_entry",
]


# ---------------------------------------------------------------------------------------------- tokenisation
def special_tokens_kwargs(add_special_tokens: bool | None, add_bos_token: bool | None) -> dict[str, bool]:
    """``HFLM``'s ``add_special_tokens`` keyword for ``tokenizer.encode`` (explicit value, else ``add_bos_token``)."""
    return _special_kwargs(add_special_tokens, add_bos_token)


# ---------------------------------------------------------------------------------------------- task manager
def builtin_tasks_dir() -> Path:
    """Directory of lm-eval's built-in task YAMLs."""
    return Path(lm_eval.tasks.__file__).resolve().parent


def task_index_entry(tm, name: str) -> tuple[str | None, dict[str, Any]]:
    """``(yaml path or None, raw YAML config)`` of task ``name`` in a ``TaskManager``'s index (without loading it)."""
    entry = tm.task_index.get(name)
    return getattr(entry, "yaml_path", None), dict(getattr(entry, "cfg", None) or {})


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Inside: no bar from lm-eval building a task's requests (``Task.build_all_requests`` draws one, with no option
    to turn it off) and none from ``datasets`` preparing a task's JSONL splits. A search builds requests for every
    candidate; its own progress is the only one it shows."""
    import datasets.utils.logging as ds_logging
    import lm_eval.api.task as lm_task

    drawn, ds_bars = lm_task.tqdm, ds_logging.is_progress_bar_enabled()
    lm_task.tqdm = functools.partial(drawn, disable=True)
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        lm_task.tqdm = drawn
        if ds_bars:
            ds_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------- task objects
def produced_metrics(task) -> list[str]:
    """Metric keys (``metric,filter``) a task's results carry."""
    filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
    return [f"{m},{f}" for f in filters for m in task.higher_is_better()]


def metric_options(task) -> dict[str, dict[str, Any]]:
    """``{metric name: its options}`` of a task (``metric_list`` entries' extra keys, as lm-eval applies them)."""
    return {m: dict(task._metric_fn_kwargs.get(m) or {}) for m in task._metric_fn_list}


def prepared_instances(task, limit: int | None, *, chat_template=None, system_instruction: str | None = None,
                       apply_chat_template: bool = False, fewshot_as_multiturn: bool = False,
                       tokenizer_name: str = "") -> list[Instance]:
    """The task's requests for its first ``limit`` documents, built as ``lm_eval.evaluator.evaluate`` builds them
    (``chat_template``: the callable rendering a chat, ``HFLM.apply_chat_template``'s role, used when
    ``apply_chat_template``); the task keeps no copy (the harness path builds its own)."""
    with no_progress_bars():
        task.build_all_requests(limit=limit, rank=0, world_size=1, system_instruction=system_instruction,
                                apply_chat_template=apply_chat_template, fewshot_as_multiturn=fewshot_as_multiturn,
                                chat_template=chat_template if apply_chat_template else None,
                                tokenizer_name=tokenizer_name if apply_chat_template else "")
    out = list(task.instances)
    task._instances = None
    return out


def memoize_doc_fields(task, docs: Sequence[Any]) -> None:
    """Cache ``doc_to_target`` / ``doc_to_choice`` of ``docs`` on this task object (other documents are rendered
    as before).

    lm-eval compiles the Jinja template on every call (``utils.apply_template``), which costs more than a tiny
    model's forward; the documents of a prepared task never change, so each field is rendered once.
    """
    keep = {id(d) for d in docs}
    for name in ("doc_to_target", "doc_to_choice"):
        original = getattr(task, name)
        memo: dict[int, Any] = {}

        def cached(doc, *args, _original=original, _memo=memo, **kwargs):
            if args or kwargs or id(doc) not in keep:
                return _original(doc, *args, **kwargs)
            if id(doc) not in _memo:
                _memo[id(doc)] = _original(doc)
            value = _memo[id(doc)]
            return list(value) if isinstance(value, list) else value  # callers may not mutate our copy

        setattr(task, name, cached)


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate_tasks(lm, tasks: Mapping[str, Any], *, limit: int | None, **chat_args) -> dict[str, dict[str, Any]]:
    """``lm_eval.evaluator.evaluate`` of ``lm`` over loaded tasks (no bootstrap, no samples kept); ``chat_args``:
    its ``apply_chat_template``, ``system_instruction`` and ``fewshot_as_multiturn``.

    Returns:
        ``{task name: lm-eval's result dict}``.
    """
    task_dict = {"tasks": dict(tasks), "groups": {}, "group_map": {}}
    with no_progress_bars():
        out = _lm_evaluate(lm, task_dict, limit=limit, bootstrap_iters=0, log_samples=False, verbosity="ERROR",
                           **chat_args)
    return out["results"]


def evaluate_task_samples(lm, tasks: Mapping[str, Any], *, limit: int | None,
                          **chat_args) -> dict[str, list[dict[str, Any]]]:
    """``lm_eval.evaluator.evaluate`` with its per-document samples kept.

    Returns:
        ``{task name: [sample dict per (document, filter)]}``: each has ``doc_id``, ``filter`` and the
        document's metric values (``"acc": 1.0``), as lm-eval logs them.
    """
    task_dict = {"tasks": dict(tasks), "groups": {}, "group_map": {}}
    with no_progress_bars():
        out = _lm_evaluate(lm, task_dict, limit=limit, bootstrap_iters=0, log_samples=True, verbosity="ERROR",
                           **chat_args)
    return {name: list(samples) for name, samples in (out.get("samples") or {}).items()}


def run_simple_evaluate(lm, tasks: Sequence[str], *, task_manager, limit, **kwargs) -> dict:
    """``lm_eval.simple_evaluate`` over an LM object, with the caller's task manager."""
    with no_progress_bars():
        return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager, limit=limit, **kwargs)
