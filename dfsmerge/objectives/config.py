"""Objective configuration: which tasks and costs a search optimises, in which direction, with what weight."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Direction = Literal["maximize", "minimize"]

#: Cost objectives (all minimised), see :mod:`dfsmerge.objectives.cost`.
COST_NAMES = ("hops", "params", "flops", "latency")


class ObjectiveConfig(BaseModel):
    """One objective.

    A task objective names an lm-eval task (built-in or from a task search path) and one of the metric keys its
    results carry (``acc,none``: metric name, comma, filter name). A cost objective (``type: cost``) names one of
    :data:`COST_NAMES`.

    Args:
        name: lm-eval task name, or a cost name.
        type: ``task`` (default) or ``cost``.
        weight: weight in the scalarised fitness (positive; the direction, not the sign, says which way is better).
        metric: metric key as lm-eval reports it (``metric,filter``; a bare name gets ``,none``). Default:
            ``acc,none`` when the task produces it, else the task's first metric.
        direction: ``maximize`` / ``minimize``; default: the task's ``higher_is_better`` for the metric
            (costs: minimize).
        limit: documents to score (int) or fraction of the split (float in (0, 1]); None: all.
        split: dataset split to score (default: the task's ``test_split``, else ``validation_split``).
        num_fewshot: few-shot examples (default: the task's own setting, else 0).
        native: score with the native evaluator (faster; multiple choice and exact-match generation only).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    type: Literal["task", "cost"] = "task"
    weight: float = 1.0
    metric: str | None = None
    direction: Direction | None = None
    limit: int | float | None = None
    split: str | None = None
    num_fewshot: int | None = Field(default=None, ge=0)
    native: bool = False

    @field_validator("weight")
    @classmethod
    def _weight_positive(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"weight={v} must be > 0; to minimise a metric set direction: minimize instead of "
                             "a negative weight")
        return v

    @field_validator("limit")
    @classmethod
    def _limit_ok(cls, v):
        if v is None:
            return v
        if isinstance(v, float) and not v.is_integer() and not 0 < v <= 1:
            raise ValueError(f"limit={v} must be a document count (int >= 1) or a fraction in (0, 1]")
        if v <= 0:
            raise ValueError(f"limit={v} must be >= 1 (a count) or a fraction in (0, 1]")
        return int(v) if isinstance(v, float) and v > 1 else v

    @field_validator("metric")
    @classmethod
    def _metric_key(cls, v: str | None) -> str | None:
        return v if v is None or "," in v else f"{v},none"

    @model_validator(mode="after")
    def _cost_ok(self):
        if self.type == "cost":
            if self.name not in COST_NAMES:
                raise ValueError(f"cost objective name={self.name!r} is unknown; use one of {', '.join(COST_NAMES)}")
            if self.direction == "maximize":
                raise ValueError(f"cost objective {self.name!r} has direction=maximize; costs are minimised")
        return self

    @property
    def key(self) -> str:
        """Stable label of this objective in results and logs (``task/metric`` or ``cost/name``)."""
        if self.type == "cost":
            return f"cost/{self.name}"
        return self.name if self.metric is None else f"{self.name}/{self.metric}"


class EvalConfig(BaseModel):
    """Evaluation settings shared by all objectives of a search.

    Args:
        objectives: the objectives (at least one).
        task_paths: directories of custom task YAMLs (lm-eval ``include_path``), searched before built-ins.
        batch_size: requests per forward pass.
        allow_benchmark_test_split: permit optimising on the test split of a built-in lm-eval benchmark
            (off by default: tuning a merge on a benchmark's test set makes its score meaningless).
        fewshot_random_seed: seed of lm-eval's few-shot sampler (its own generator; global RNGs are untouched).
        max_gen_toks: default generation budget for tasks that set none.
        builtin_tasks: also search lm-eval's built-in tasks for names not found in ``task_paths`` (indexing them
            takes ~20 s once).
        share_prompts: native tasks run the prompt prefix all their documents share once per batch
            (:class:`dfsmerge.objectives.native.NativeTask`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    objectives: tuple[ObjectiveConfig, ...] = Field(min_length=1)
    task_paths: tuple[str, ...] = ()
    batch_size: int = Field(default=16, ge=1)
    allow_benchmark_test_split: bool = False
    fewshot_random_seed: int = 1234
    max_gen_toks: int = Field(default=256, ge=1)
    builtin_tasks: bool = True
    share_prompts: bool = True

    @property
    def task_objectives(self) -> tuple[ObjectiveConfig, ...]:
        return tuple(o for o in self.objectives if o.type == "task")

    @property
    def cost_objectives(self) -> tuple[ObjectiveConfig, ...]:
        return tuple(o for o in self.objectives if o.type == "cost")
