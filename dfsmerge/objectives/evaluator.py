"""The fitness of a candidate: scores on the chosen tasks (lm-eval or native) and its costs, as values to minimise,
cached by the decoded candidate. Also the function API behind ``dfsmerge eval``."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from dfsmerge.errors import ConfigError
from dfsmerge.objectives.cache import ResultCache
from dfsmerge.objectives.config import EvalConfig, ObjectiveConfig
from dfsmerge.objectives.cost import CandidateDescription, compute_cost, describe_model
from dfsmerge.objectives.fitness import objective_values, scalar_fitness
from dfsmerge.objectives.tasks import TaskSuite, preserve_rng


@dataclass(frozen=True)
class EvalResult:
    """One candidate's evaluation.

    Attributes:
        results: ``{task: {metric key: value}}`` (lm-eval's keys) plus ``{"cost": {name: value}}`` for costs.
        scores: ``{objective key: raw value}`` (None where it failed).
        values: ``{objective key: value to minimise}`` (direction applied; inf where it failed).
        fitness: weighted sum of ``values`` (lower is better; inf when any value is not finite).
        error: why the candidate failed (the search's worker sets it), None when it did not.
        infeasible: the candidate's genome decodes to no valid path (not a failure: the search goes on).
        timings: seconds per phase (search worker).
        traceback: the last frames of a failing candidate's exception (search worker).
        cost: what scoring it took (search worker): ``tokens``, ``forward_tokens`` and ``cached_tokens`` (full-forward
            token equivalents computed / served by prefix reuse), ``forward_calls``, ``prefix_hits``, ``docs``,
            ``seconds``.
        partial: racing: one block's ``{objective key: [sum, documents scored, documents in all, direction]}`` for
            the task objectives (their ``scores`` are then the block's means).
        race: a raced candidate's blocks and whether racing stopped it (:meth:`dfsmerge.search.racing.Tally.to_json`).
        responses: subset fitness: ``{objective key: [per-document value]}`` of the documents scored.
        estimate: subset fitness: how ``scores`` were estimated from a few documents
            (:class:`dfsmerge.search.subset_fitness.SubsetFitness`); None for scores on every document.
    """

    results: dict
    scores: dict
    values: dict
    fitness: float
    error: str | None = None
    infeasible: bool = False
    timings: dict = field(default_factory=dict)
    traceback: str | None = None
    cost: dict = field(default_factory=dict)
    partial: dict | None = None
    race: dict | None = None
    responses: dict | None = None
    estimate: dict | None = None


class Evaluator:
    """Scores candidates on an :class:`EvalConfig`; tasks are loaded and validated at construction.

    Args:
        config: objectives and settings.
        tokenizer: tokenizer shared by the candidates (model A's).
        cache: result cache to use (a new one by default; pass one to share it between evaluators).

    Raises:
        ConfigError: any objective is invalid (see :class:`dfsmerge.objectives.tasks.TaskSuite`).
    """

    def __init__(self, config: EvalConfig, tokenizer, *, cache: ResultCache | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.suite = TaskSuite(config, tokenizer)
        self.directions = {**self.suite.directions(), **{o.key: "minimize" for o in config.cost_objectives}}
        self.cache = cache if cache is not None else ResultCache()
        self._scorer = None

    def evaluate(self, model, *, key: Hashable | None = None,
                 description: CandidateDescription | None = None) -> EvalResult:
        """Evaluate ``model``; with ``key``, a candidate already scored under that key is not run again."""
        if key is None:
            return self._evaluate(model, description)
        return self.cache.get_or_compute(key, lambda: self._evaluate(model, description))

    def per_document(self, model) -> dict[str, list[float]]:
        """Each document's value of every task objective (``{objective key: [value per document]}``, document order),
        for paired tests between models scored on the same documents; see :meth:`TaskSuite.per_document`."""
        if self._scorer is None and any(p.native is None for p in self.suite.prepared):
            from dfsmerge.objectives.lm_adapter import Scorer

            self._scorer = Scorer(self.tokenizer, model_config=getattr(model, "config", None),
                                  batch_size=self.config.batch_size, max_gen_toks=self.config.max_gen_toks)
        return self.suite.per_document(model, self.tokenizer, scorer=self._scorer)

    def evaluate_block(self, model, block: int, *, description: CandidateDescription | None = None) -> EvalResult:
        """Racing: score block ``block`` of the task documents (after ``self.suite.race_blocks``); cost objectives
        are computed whole. ``partial`` holds the block's sums; ``scores`` its means (NaN for an empty block)."""
        sums = self.suite.evaluate_block(model, block)
        scores = {k: (s / n if n else math.nan) for k, (s, n, _) in sums.items()}
        if self.config.cost_objectives:
            desc = description or describe_model(model)
            scores.update({o.key: compute_cost(o.name, model, desc) for o in self.config.cost_objectives})
        values = objective_values(scores, self.config.objectives, self.directions)
        docs = {p.objective.name: sums[p.objective.key][1] for p in self.suite.prepared}  # a task once
        return EvalResult(results={}, scores=scores, values=values,
                          fitness=scalar_fitness(values, self.config.objectives),
                          partial={k: [*v, self.directions[k]] for k, v in sums.items()},
                          cost={"docs": sum(docs.values())})

    def evaluate_docs(self, model, positions: dict[str, list[int]] | None = None, *,
                      description: CandidateDescription | None = None) -> EvalResult:
        """Subset fitness: score the documents at ``positions[task]`` of each task (all of a task not named), keep
        every per-document value in ``responses``; ``scores`` are the means over the documents scored.

        Raises:
            ConfigError: an objective is not native, or a per-document value is outside [0, 1].
        """
        from dfsmerge.objectives.subset import check_subset_task

        positions = positions or {}
        per_task: dict[str, dict] = {}
        responses: dict[str, list[float]] = {}
        with preserve_rng():
            for p in self.suite.prepared:
                check_subset_task(p)
                name = p.objective.name
                if name not in per_task:
                    per_task[name] = p.native.per_doc(model, positions.get(name))
                metric = p.metric.split(",")[0]
                vals = [float(v) for v in per_task[name].get(metric, [])]
                if any(not 0.0 <= v <= 1.0 for v in vals):
                    raise ConfigError(f"subset: objective {name!r} metric {metric!r} has per-document values "
                                      "outside [0, 1]; subset fitness needs them in [0, 1]: drop subset")
                responses[p.objective.key] = vals
        scores = {k: (math.fsum(v) / len(v) if v else math.nan) for k, v in responses.items()}
        if self.config.cost_objectives:
            desc = description or describe_model(model)
            scores.update({o.key: compute_cost(o.name, model, desc) for o in self.config.cost_objectives})
        values = objective_values(scores, self.config.objectives, self.directions)
        docs = {p.objective.name: len(responses[p.objective.key]) for p in self.suite.prepared}  # a task once
        return EvalResult(results={}, scores=scores, values=values,
                          fitness=scalar_fitness(values, self.config.objectives), responses=responses,
                          cost={"docs": sum(docs.values())})

    def documents(self) -> int:
        """Documents one full evaluation scores (all tasks)."""
        seen, n = set(), 0
        for p in self.suite.prepared:
            if p.objective.name not in seen:
                seen.add(p.objective.name)
                n += len(p.native.docs) if p.native is not None else (p.limit or p.n_docs)
        return n

    def _evaluate(self, model, description) -> EvalResult:
        if self._scorer is None and any(p.native is None for p in self.suite.prepared):
            from dfsmerge.objectives.lm_adapter import Scorer

            self._scorer = Scorer(self.tokenizer, model_config=getattr(model, "config", None),
                                  batch_size=self.config.batch_size, max_gen_toks=self.config.max_gen_toks)
        results = self.suite.evaluate(model, self.tokenizer, scorer=self._scorer)
        metrics = self.suite.metrics()
        scores = {o.key: results[o.name].get(metrics[o.key], math.nan) for o in self.config.task_objectives}
        if self.config.cost_objectives:
            desc = description or describe_model(model)
            costs = {o.name: compute_cost(o.name, model, desc) for o in self.config.cost_objectives}
            results["cost"] = costs
            scores.update({o.key: costs[o.name] for o in self.config.cost_objectives})
        values = objective_values(scores, self.config.objectives, self.directions)
        return EvalResult(results=results, scores=scores, values=values,
                          fitness=scalar_fitness(values, self.config.objectives))


def evaluate_model(model, tokenizer, objectives: Sequence[ObjectiveConfig | str] | EvalConfig, *,
                   task_paths: Sequence[str] = (), batch_size: int = 16, split: str | None = None,
                   limit: int | float | None = None, native: bool = False,
                   allow_benchmark_test_split: bool = True, per_document: bool = False, **options) -> dict:
    """Score one model on tasks (what ``dfsmerge eval`` prints).

    Args:
        model: HF-like causal LM (vanilla or stitched).
        tokenizer: its tokenizer.
        objectives: task names, :class:`ObjectiveConfig` objects, or a whole :class:`EvalConfig`.
        task_paths: custom task YAML directories.
        split, limit, native: applied to objectives given by name.
        allow_benchmark_test_split: reporting a test score is fine (it is optimising on it that is guarded).
        per_document: also return each document's value (``"per_document": {objective key: [values]}``), for
            paired tests (:mod:`dfsmerge.report.significance`); the scores are the same either way.
        options: further :class:`ObjectiveConfig` fields for objectives given by name (``apply_chat_template``,
            ``system_instruction``, ``fewshot_as_multiturn``, ``gen_kwargs``, ``num_fewshot``).

    Returns:
        ``{"results": {task: {metric key: value}}}`` (plus ``"cost"`` when cost objectives are present, and
        ``"per_document"`` when asked).

    Raises:
        ConfigError: unknown task, metric not produced, empty split, unsupported feature.
    """
    if isinstance(objectives, EvalConfig):
        config = objectives
    else:
        objs = []
        for o in objectives:
            if isinstance(o, str):
                o = ObjectiveConfig(name=o, split=split, limit=limit, native=native, **options)
            objs.append(o)
        config = EvalConfig(objectives=tuple(objs), task_paths=tuple(task_paths), batch_size=batch_size,
                            allow_benchmark_test_split=allow_benchmark_test_split)
    ev = Evaluator(config, tokenizer)
    out = {"results": ev.evaluate(model).results}
    if per_document:
        out["per_document"] = ev.per_document(model)
    return out


def format_table(results: dict) -> str:
    """A plain-text table of ``{"results": {task: {metric: value}}}`` (or the inner dict)."""
    res = results.get("results", results)
    rows = [(task, metric, value) for task, metrics in res.items() for metric, value in metrics.items()]
    header = ("task", "metric", "value")
    cells = [header] + [(t, m, f"{v:.4f}" if isinstance(v, float) and abs(v) < 1e6 else f"{v:.6g}")
                        for t, m, v in rows]
    widths = [max(len(str(r[i])) for r in cells) for i in range(3)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
