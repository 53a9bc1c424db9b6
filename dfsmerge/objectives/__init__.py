"""Objectives: lm-eval tasks (through :class:`dfsmerge.objectives.lm_adapter.DfsLM`), native fast tasks and cost
objectives, turned into direction-aware values to minimise, with a result cache keyed by the decoded candidate."""

from dfsmerge.objectives.cache import ResultCache, candidate_key
from dfsmerge.objectives.config import COST_NAMES, EvalConfig, ObjectiveConfig
from dfsmerge.objectives.cost import COSTS, CandidateDescription, compute_cost, describe_model
from dfsmerge.objectives.evaluator import EvalResult, Evaluator, evaluate_model, format_table
from dfsmerge.objectives.fitness import WORST, objective_values, scalar_fitness, to_minimize
from dfsmerge.objectives.tasks import TaskSuite, prepare_tasks, preserve_rng, simple_evaluate

__all__ = [
    "COSTS", "COST_NAMES", "WORST", "CandidateDescription", "EvalConfig", "EvalResult", "Evaluator",
    "ObjectiveConfig", "ResultCache", "TaskSuite", "candidate_key", "compute_cost", "describe_model",
    "evaluate_model", "format_table", "objective_values", "prepare_tasks", "preserve_rng", "scalar_fitness",
    "simple_evaluate", "to_minimize",
]
