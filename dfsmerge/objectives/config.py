"""Objective configuration: which tasks and costs a search optimises, in which direction, with what weight."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dfsmerge.objectives.subset import SubsetConfig

Direction = Literal["maximize", "minimize"]

#: Cost objectives (all minimised), see :mod:`dfsmerge.objectives.cost`.
COST_NAMES = ("hops", "params", "flops", "latency")


class GenKwargs(BaseModel):
    """Generation settings of an objective that override its task's ``generation_kwargs`` (lm-eval's ``--gen_kwargs``,
    applied as ``simple_evaluate`` applies them). Decoding is greedy: ``do_sample`` may only be false.

    Args:
        max_gen_toks: generation budget (tokens).
        until: stop strings (replace the task's).
        do_sample: ``false`` (greedy), the only decoding the adapter and the native scorer run.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_gen_toks: int | None = Field(default=None, ge=1)
    until: tuple[str, ...] | None = None
    do_sample: Literal[False] | None = None

    @field_validator("until", mode="before")
    @classmethod
    def _one_stop(cls, v):
        return (v,) if isinstance(v, str) else v

    @classmethod
    def parse(cls, args: str | list[str] | None) -> GenKwargs | None:
        """``--gen_kwargs`` as the ``lm_eval`` command line takes it: ``key=value`` pairs separated by commas or given
        as several arguments, values read as Python literals when they are (``until=["\\n", "."]``)."""
        import ast

        if not args:
            return None
        out: dict = {}
        for arg in [args] if isinstance(args, str) else args:
            depth, start, parts = 0, 0, []
            for i, ch in enumerate(arg):  # split on commas outside brackets and quotes
                depth += 1 if ch in "[(" else -1 if ch in "])" else 0
                if ch == "," and depth == 0:
                    parts.append(arg[start:i])
                    start = i + 1
            parts.append(arg[start:])
            for part in filter(None, (p.strip() for p in parts)):
                key, sep, value = part.partition("=")
                if not sep:
                    raise ValueError(f"gen_kwargs entry {part!r} is not key=value; use e.g. max_gen_toks=64")
                try:
                    out[key.strip()] = ast.literal_eval(value)
                except (ValueError, SyntaxError):
                    out[key.strip()] = value
        return cls(**out)

    def as_task_kwargs(self) -> dict:
        """The set fields as a ``generation_kwargs`` update (``until`` as a list, as task YAMLs give it)."""
        out = self.model_dump(exclude_none=True)
        if "until" in out:
            out["until"] = list(out["until"])
        return out


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
        subset: score search candidates on a few documents and estimate the full-set score
            (:class:`dfsmerge.objectives.subset.SubsetConfig`; native objectives whose metric is a mean of
            per-document values in [0, 1]).
        apply_chat_template: render each request through the tokenizer's chat template (lm-eval's
            ``--apply_chat_template``; the adapter and the native scorer build the same prompts).
        system_instruction: a system message put before each prompt (lm-eval's ``--system_instruction``).
        fewshot_as_multiturn: few-shot examples as alternating user/assistant turns (needs apply_chat_template;
            default: on with a chat template, as the ``lm_eval`` command line).
        gen_kwargs: generation settings overriding the task's (:class:`GenKwargs`; generate_until tasks only).
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
    subset: SubsetConfig | None = None
    apply_chat_template: bool = False
    system_instruction: str | None = None
    fewshot_as_multiturn: bool | None = None
    gen_kwargs: GenKwargs | None = None

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
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ValueError(f"objective {self.name!r} has fewshot_as_multiturn=true but apply_chat_template=false; "
                             "multi-turn few-shot needs a chat template: set apply_chat_template: true")
        if self.subset is not None and (self.type != "task" or not self.native):
            raise ValueError(f"objective {self.name!r} has a subset but is not a native task objective; subset "
                             "fitness needs per-document scores: set native: true, or drop subset")
        return self

    @property
    def key(self) -> str:
        """Stable label of this objective in results and logs (``task/metric`` or ``cost/name``)."""
        if self.type == "cost":
            return f"cost/{self.name}"
        return self.name if self.metric is None else f"{self.name}/{self.metric}"

    @property
    def chat_args(self) -> dict:
        """lm-eval's prompt options of this objective (``evaluate``'s / ``build_all_requests``' keyword names)."""
        multiturn = self.apply_chat_template if self.fewshot_as_multiturn is None else self.fewshot_as_multiturn
        return dict(apply_chat_template=self.apply_chat_template, system_instruction=self.system_instruction,
                    fewshot_as_multiturn=multiturn)


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
