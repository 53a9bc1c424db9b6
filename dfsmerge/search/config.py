"""The search config: one frozen pydantic model of everything ``dfsmerge search`` needs, validated before any model
is loaded; every problem found is reported in one :class:`~dfsmerge.errors.ConfigError` naming field, value and fix.

A config file is either the dfsmerge form::

    genome: {mode: ps, models: [zoo:math, zoo:language], base_model: zoo:base, merge_method: task_arithmetic,
             layer_granularity: 1, dfs: {repetitions: 2, scales: per_step}}
    objectives: [{name: zoo_math_b, limit: 64, native: true}, {name: hops, type: cost, weight: 0.01}]
    optimizer: {name: cma, popsize: 8, sigma0: 0.2}
    budget: {max_evals: 200}
    seed: 0

or a mergekit-evolve config (``genome:`` + ``tasks:``, as ``mergekit/evo/config.py``), accepted unchanged and
translated by :func:`translate_mergekit_evolve` (CMA-ES, sigma0 1/6 and 100 evaluations: mergekit-evolve's
defaults).

The optimizer section holds what every optimizer has (``name``, ``popsize``); its own settings (CMA-ES's
``sigma0``, NSGA-II's ``crossover_eta``, the LLM's ``model``, ...) are validated by that optimizer's settings model
(``Optimizer.Options`` in :mod:`dfsmerge.optim`), written beside ``name`` or under ``options``.

Single- or multi-objective is the objectives' word, not the optimizer's: ``combine: weighted`` gives the optimizer
one number per candidate (the weighted sum, :func:`dfsmerge.objectives.fitness.scalar_fitness`), ``combine: pareto``
the vector of objective values (one column each). Left out, a run with two or more objectives is Pareto when every
optimizer it uses takes a vector (nsga2, random) and weighted otherwise (cma, llm); one objective is always a single
number. ``combine: pareto`` with a single-objective optimizer is an error. The weighted sum is also what ranks the
"best" candidate of a Pareto run.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from dfsmerge.errors import ConfigError
from dfsmerge.genome import MERGED, MODE_TABLE, Mode, genome_method_error
from dfsmerge.merge import get_method
from dfsmerge.objectives.config import ObjectiveConfig
from dfsmerge.optim import OPTIMIZERS, validate_options
from dfsmerge.recipe.config import format_validation_error, load_yaml

MERGEKIT_EVOLVE_SIGMA0 = 1 / 6  # mergekit-evolve's --sigma0 default
MERGEKIT_EVOLVE_MAX_EVALS = 100  # mergekit-evolve's --max-fevals default
_FROZEN = ConfigDict(frozen=True, extra="forbid")


class ModelEntry(BaseModel):
    """A source model: a short ``name`` (used in plans and logs) and its reference (path, hub id or ``zoo:<name>``)."""

    model_config = _FROZEN

    name: str = Field(min_length=1)
    model: str = Field(min_length=1)


def default_model_name(ref: str) -> str:
    """Short name of a model reference: ``zoo:math`` -> ``math``, ``org/Model-7B`` -> ``Model-7B``."""
    if ref.startswith("zoo:"):
        return ref[4:]
    return Path(ref.rstrip("/")).name or ref


def _entries(value: Any) -> Any:
    """Accept ``[ref, ...]``, ``[{name, model}, ...]`` or ``{name: ref}``."""
    if isinstance(value, Mapping):
        return [{"name": str(k), "model": str(v)} for k, v in value.items()]
    if isinstance(value, list | tuple):
        return [{"name": default_model_name(v), "model": v} if isinstance(v, str) else v for v in value]
    return value


class DFSSection(BaseModel):
    """DFS genome options (see :class:`dfsmerge.genome.dfs.DFSGenome`). ``models`` defaults to the genome's models;
    in joint/staged mode the PS-merged model is prepended as model A."""

    model_config = _FROZEN

    models: tuple[ModelEntry, ...] | None = None
    repetitions: int = Field(2, ge=1)
    scales: Literal["full", "per_layer", "per_step", "none"] = "per_step"
    scale_bound: float = Field(1.5, gt=0)
    scale_step: float | None = Field(None, gt=0)
    """Round log-scales to multiples of this, so neighbouring candidates share path prefixes exactly (prefix
    reuse); None keeps them continuous."""
    min_length: int = Field(1, ge=1)
    max_length: int | None = Field(None, ge=1)
    max_repeats: int | None = Field(None, ge=1)
    force_first: bool = False
    force_last: bool = False
    repair: bool = True
    init_on: float = Field(0.5, gt=0)
    init_off: float = Field(-0.5, le=0)
    embed_choices: tuple[str, ...] = ()
    """Models (names) that may supply the input embedding (docs/design.md section 3, "embed source option")."""

    _models = field_validator("models", mode="before")(classmethod(lambda cls, v: _entries(v)))


class GenomeSection(BaseModel):
    """What is searched: the mode, the models and the PS / DFS genome options (docs/design.md section 3)."""

    model_config = _FROZEN

    mode: Mode = "ps"
    models: tuple[ModelEntry, ...] = Field(min_length=1)
    base_model: str | None = None
    merge_method: str = "task_arithmetic"
    layer_granularity: int = Field(0, ge=0)
    filters: tuple[str, ...] = ()
    normalize: bool | None = None
    allow_negative_weights: bool = False
    smooth: bool = False
    initial_weight: float | None = None
    tokenizer_source: str | None = None
    dfs: DFSSection = DFSSection()

    _models = field_validator("models", mode="before")(classmethod(lambda cls, v: _entries(v)))

    @field_validator("filters", mode="before")
    @classmethod
    def _filters(cls, v):
        return () if v is None else v

    @field_validator("tokenizer_source")
    @classmethod
    def _tok(cls, v):
        if v not in (None, "base"):
            raise ValueError("only null or 'base' is supported: every model of a search shares model A's tokenizer")
        return v

    @model_validator(mode="after")
    def _check(self):
        errors = []
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            errors.append(f"models has duplicate names {dup}; give each model a name: {{name: NAME, model: REF}}")
        spec = MODE_TABLE[self.mode]
        if spec.ps:
            problem = genome_method_error(self.merge_method, "merge_method")
            if problem:
                errors.append(problem)
            elif self.base_model is None and _base_required(self.merge_method):
                errors.append(f"merge_method={self.merge_method!r} needs base_model; set it to one of the models")
        if not spec.dfs and self.dfs.models is not None:
            errors.append("dfs.models is set but mode='ps' searches no path; use mode: dfs, staged or joint")
        known = set(names) | {m.name for m in self.dfs.models or ()} | {MERGED}
        for m in self.dfs.embed_choices:
            if m not in known:
                errors.append(f"dfs.embed_choices has {m!r}, not a model name; use names from {sorted(known)}")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def base_entry(self) -> ModelEntry | None:
        """The base model as an entry: a listed model (by name or reference) or an extra one."""
        if self.base_model is None:
            return None
        for m in self.models:
            if self.base_model in (m.name, m.model):
                return m
        return ModelEntry(name=default_model_name(self.base_model), model=self.base_model)


def _base_required(method: str) -> bool:
    return get_method(method).base == "required"


class SyntheticObjectiveConfig(BaseModel):
    """An objective computed from the genome vector alone (no model): regression tests of the optimizer wiring and
    the loop-overhead benchmark. ``name`` is a key of :data:`dfsmerge.search.worker.SYNTHETIC_OBJECTIVES`."""

    model_config = _FROZEN

    name: str
    type: Literal["synthetic"] = "synthetic"
    weight: float = Field(1.0, gt=0)
    params: dict[str, float] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"synthetic/{self.name}"


def _objective_kind(v: Any) -> str:
    t = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    return "synthetic" if t == "synthetic" else "task"


Objective = Annotated[
    Annotated[ObjectiveConfig, Tag("task")] | Annotated[SyntheticObjectiveConfig, Tag("synthetic")],
    Discriminator(_objective_kind),
]


class OptimizerSection(BaseModel):
    """Which optimizer (registry name), its population size and its own settings.

    ``options`` are the named optimizer's settings, checked against its settings model (``Optimizer.Options``:
    ``CMAOptions`` with ``sigma0``, ``stds``, ``cma_options``; ``NSGA2Options``; ``LLMOptions``; ``random`` has
    only ``penalty``), so a setting of another optimizer (``sigma0`` on nsga2) is an error naming it. They may be
    written beside ``name`` (``{name: cma, popsize: 8, sigma0: 0.2}``) and move into ``options``.
    """

    model_config = _FROZEN

    name: str = "cma"
    popsize: int | None = Field(None, ge=2)
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _flat_options(cls, data: Any) -> Any:
        """Move the keys beside ``name`` that are not section fields into ``options`` (the optimizer's settings
        model then accepts or rejects them)."""
        if not isinstance(data, Mapping) or data.get("name") not in OPTIMIZERS:
            return data
        # config.yaml of runs before the optimizers' own settings models wrote these two as null
        data = {k: v for k, v in data.items() if not (k in ("sigma0", "multi_objective") and v is None)}
        if "multi_objective" in data:
            v = data["multi_objective"]
            raise ValueError(f"multi_objective={v!r} is not an optimizer setting: the objectives decide; set "
                             f"combine: {'pareto' if v else 'weighted'} at the top level of the config instead")
        flat = {k: v for k, v in data.items() if k not in cls.model_fields}
        if not flat:
            return data
        rest = {k: v for k, v in data.items() if k not in flat}
        return {**rest, "options": {**flat, **dict(rest.get("options") or {})}}

    def all_options(self) -> dict[str, Any]:
        """The optimizer's settings as given (its settings model fills the rest with defaults)."""
        return dict(self.options)

    @model_validator(mode="after")
    def _check(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"name={self.name!r} is unknown; use one of {', '.join(sorted(OPTIMIZERS))}")
        try:
            validate_options(self.name, **self.options)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return self


RESUMABLE = {"resumable": True}
"""Marks a config field that ``--resume`` may change (budget, backend, logging); every other field must equal the
run's saved config (:func:`resumable_paths`, read by ``check_resume_config``)."""


def resumable_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted paths of the fields of ``model`` (and its nested sections) marked :data:`RESUMABLE`."""
    out: set[str] = set()
    for name, f in model.model_fields.items():
        if (f.json_schema_extra or {}).get("resumable"):
            out.add(prefix + name)
            continue
        for arg in (f.annotation, *typing.get_args(f.annotation)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                out |= resumable_paths(arg, f"{prefix}{name}.")
    return out


class BudgetSection(BaseModel):
    """When to stop (any limit reached ends a stage; in staged mode max_evals and max_generations apply per stage).
    A generation is never cut short, so max_evals may be overshot by less than one population."""

    model_config = _FROZEN

    max_evals: int | None = Field(None, ge=1)
    max_generations: int | None = Field(None, ge=1)
    time_limit: float | None = Field(None, gt=0)
    """Seconds of search (summed over resumed sessions), checked between generations."""
    max_consecutive_failures: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.max_evals is None and self.max_generations is None and self.time_limit is None:
            raise ValueError("budget has no limit; set budget.max_evals (or max_generations / time_limit)")
        return self


class Stage2Section(BaseModel):
    """Staged mode: the DFS stage's own optimizer and budget (each defaults to the top-level one). The paper's two
    stages search different spaces, so a DFS stage often wants the settings a DFS search would use."""

    model_config = _FROZEN

    optimizer: OptimizerSection | None = None
    budget: BudgetSection | None = Field(None, json_schema_extra=RESUMABLE)


class LoggingSection(BaseModel):
    """Optional experiment trackers, used only when installed and enabled."""

    model_config = _FROZEN

    wandb: bool = False
    wandb_project: str = "dfsmerge"
    tensorboard: bool = False


class PrefixCacheSection(BaseModel):
    """Prefix reuse (exact; :mod:`dfsmerge.runtime.prefix`): the hidden states after each step of a path are kept
    for the evaluation's batches, and a candidate whose path starts with stored steps resumes from there. Scores are
    bit-identical with it on or off; ``memory_mb`` bounds the stored tensors (least recently used go first).
    ``share_prompts``: native tasks run the prompt prefix all their documents share (a task description, the same
    few-shot examples) once per batch instead of once per document; scores agree up to float rounding."""

    model_config = _FROZEN

    enabled: bool = Field(True, json_schema_extra=RESUMABLE)  # exact: results unchanged
    memory_mb: float = Field(1024, ge=0, json_schema_extra=RESUMABLE)
    share_prompts: bool = True


class RacingSection(BaseModel):
    """Racing (opt-in): each generation's new candidates are scored block by block on a fixed shuffle of each
    task's documents; after every block a candidate stops when a bound on its final fitness shows it cannot enter
    the generation's elite (the optimizer's ``elite_size`` best, or the non-dominated set), and keeps its partial
    estimate (marked ``race.stopped`` in evals.jsonl). ``bound: exact`` stops only candidates that certainly miss
    (per-document scores in [0, 1]); ``kl`` (Chernoff's bound in its Kullback-Leibler form, tight near 0 and 1) and
    ``hoeffding`` (Hoeffding-Serfling) are confidence bounds, every bound of a generation holding at once with
    probability at least ``1 - delta`` (see :mod:`dfsmerge.search.racing`). Needs native task objectives whose
    metric is a mean of per-document scores in [0, 1]. ``keep_merged_mb``: in modes with a PS part, each candidate's
    merged weights are kept (up to this many MiB) between its blocks and copied back instead of merged again."""

    model_config = _FROZEN

    enabled: bool = False
    blocks: int = Field(4, ge=2, le=64)
    bound: Literal["kl", "hoeffding", "exact"] = "kl"
    delta: float = Field(0.05, gt=0, lt=1)
    keep_merged_mb: float = Field(2048, ge=0, json_schema_extra=RESUMABLE)  # memory only: results unchanged


class SearchConfig(BaseModel):
    """Everything a search needs. Frozen; build with :func:`load_search_config`.

    Args:
        genome: mode, models and genome options.
        objectives: tasks (lm-eval or native), costs and synthetic objectives (at least one).
        combine: ``weighted`` (the optimizer sees the weighted sum of the objectives) or ``pareto`` (their vector);
            None: pareto for 2+ objectives when every optimizer of the run takes a vector, else weighted (see the
            module docstring).
        optimizer, budget: the optimizer and when to stop.
        seed: seeds the optimizer (stage 2 of staged mode uses seed + 1) and random merge methods.
        device, dtype: where the models live, and the dtype of merged outputs (and of scoring, unless eval_dtype).
        eval_dtype: the dtype candidates are scored in (``auto``: measured on the first generation).
        backend: ``local`` (in-process) or ``ray`` (actors, see :mod:`dfsmerge.search.backends`).
        ray_address: address of an existing Ray cluster (None: start a local one).
        num_workers: Ray actors (None: one per GPU, else one per CPU slot).
        task_paths: directories of custom lm-eval task YAMLs (the zoo's task dir is added when a model is zoo:).
        zoo_dir, zoo_size: where ``zoo:`` models are found (built there with ``zoo_size`` when missing).
        batch_size, allow_benchmark_test_split, builtin_tasks: evaluation settings (see ``EvalConfig``).
        prefix_cache: exact reuse of shared path prefixes (on by default; scores unchanged).
        racing: stop hopeless candidates early (opt-in; see :class:`RacingSection`).
    """

    model_config = _FROZEN

    genome: GenomeSection
    objectives: tuple[Objective, ...] = Field(min_length=1)
    combine: Literal["weighted", "pareto"] | None = None
    optimizer: OptimizerSection = OptimizerSection()
    budget: BudgetSection = Field(json_schema_extra=RESUMABLE)
    seed: int = Field(0, ge=0)
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    backend: Literal["local", "ray"] = Field("local", json_schema_extra=RESUMABLE)
    ray_address: str | None = Field(None, json_schema_extra=RESUMABLE)
    num_workers: int | None = Field(None, ge=1, json_schema_extra=RESUMABLE)
    task_paths: tuple[str, ...] = ()
    zoo_dir: str | None = None
    zoo_size: Literal["tiny", "default"] = "default"
    batch_size: int = Field(16, ge=1)
    allow_benchmark_test_split: bool = False
    builtin_tasks: bool = True
    logging: LoggingSection = Field(LoggingSection(), json_schema_extra=RESUMABLE)
    eval_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The dtype candidates are scored in. ``auto``: on the first generation, the first candidates are scored in
    ``dtype`` and in bfloat16, and bfloat16 is kept when it is at least 1.25x faster on each of them and every
    score agrees within 0.02 (the measurement is saved in the run's state, so a resumed run keeps the choice)."""
    prefix_cache: PrefixCacheSection = PrefixCacheSection()
    racing: RacingSection = RacingSection()
    stage2: Stage2Section | None = None
    """Staged mode only: optimizer and budget of stage 2 (the DFS stage)."""

    @field_validator("objectives", mode="before")
    @classmethod
    def _objectives(cls, v):
        if isinstance(v, list | tuple):
            return [{"name": o} if isinstance(o, str) else o for o in v]
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?|mps", v):
            raise ValueError("device must be cpu, cuda, cuda:N, mps or auto")
        return v

    @field_validator("objectives")
    @classmethod
    def _unique(cls, v):
        keys = [o.key for o in v]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"lists {dup} more than once; list each objective once")
        return v

    @model_validator(mode="after")
    def _stage2(self):
        if self.stage2 is None:
            return self
        if MODE_TABLE[self.genome.mode].stages == 1:
            raise ValueError(f"stage2 is set but genome.mode={self.genome.mode!r} has one stage; use mode: staged "
                             "or remove stage2")
        return self

    @model_validator(mode="after")
    def _combine(self):
        if self.combine != "pareto":
            return self
        if len(self.objectives) < 2:
            raise ValueError(f"combine='pareto' needs two or more objectives but there is {len(self.objectives)}; "
                             "add objectives or remove combine")
        for where, o in self._optimizers():
            if not OPTIMIZERS[o.name].multi_objective:
                raise ValueError(f"combine='pareto' but {where}.name={o.name!r} is single-objective; use nsga2 or "
                                 "random there, or combine: weighted for the weighted sum")
        return self

    def _optimizers(self) -> list[tuple[str, OptimizerSection]]:
        """``(config path, section)`` of every optimizer the run uses (stage 2's own in staged mode)."""
        out = [("optimizer", self.optimizer)]
        if MODE_TABLE[self.genome.mode].stages > 1 and self.stage2 is not None and self.stage2.optimizer is not None:
            out.append(("stage2.optimizer", self.stage2.optimizer))
        return out

    def optimizer_for(self, stage: int) -> OptimizerSection:
        """The optimizer section of ``stage`` (1 or 2; stage 2 exists in staged mode)."""
        if stage == 2 and self.stage2 is not None and self.stage2.optimizer is not None:
            return self.stage2.optimizer
        return self.optimizer

    def budget_for(self, stage: int) -> BudgetSection:
        """The budget section of ``stage`` (1 or 2; stage 2 exists in staged mode)."""
        if stage == 2 and self.stage2 is not None and self.stage2.budget is not None:
            return self.stage2.budget
        return self.budget

    # ---------------------------------------------------------------- derived
    @property
    def multi_objective(self) -> bool:
        """Whether the optimizers see the objective vector (Pareto) rather than the weighted sum: ``combine``, or
        by default two or more objectives and only optimizers that take a vector."""
        if self.combine is not None:
            return self.combine == "pareto"
        return len(self.objectives) > 1 and all(OPTIMIZERS[o.name].multi_objective for _, o in self._optimizers())

    @property
    def n_obj(self) -> int:
        """Objectives the optimizer sees (1 = weighted sum)."""
        return len(self.objectives) if self.multi_objective else 1

    @property
    def needs_model(self) -> bool:
        """Whether any objective runs or inspects a model (else the pool is never loaded)."""
        return any(not isinstance(o, SyntheticObjectiveConfig) for o in self.objectives)

    @property
    def model_objectives(self) -> tuple[ObjectiveConfig, ...]:
        return tuple(o for o in self.objectives if isinstance(o, ObjectiveConfig))

    @property
    def synthetic_objectives(self) -> tuple[SyntheticObjectiveConfig, ...]:
        return tuple(o for o in self.objectives if isinstance(o, SyntheticObjectiveConfig))

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-safe dict that :func:`load_search_config` reads back into an equal config."""
        return self.model_dump(mode="json")

    def with_overrides(self, **overrides: Any) -> SearchConfig:
        """A copy with dotted-path overrides (``{"budget.max_evals": 10, "seed": 3}``); None values are skipped.

        Raises:
            ConfigError: the result is invalid.
        """
        data = self.to_dict()
        for path, value in overrides.items():
            if value is None:
                continue
            d = data
            *head, last = path.split(".")
            for k in head:
                d = d.setdefault(k, {})
            d[last] = value
        return load_search_config(data, source="config with command-line overrides")


# ---------------------------------------------------------------------------------------------- loading
def is_mergekit_evolve(data: Mapping[str, Any]) -> bool:
    """A mergekit-evolve config has ``tasks:`` (and ``genome:``) and none of dfsmerge's own top-level keys."""
    return "tasks" in data and "objectives" not in data


def translate_mergekit_evolve(data: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a mergekit-evolve ``EvolMergeConfiguration`` dict into a dfsmerge search config dict.

    ``genome`` fields map one to one (mode ``ps``); each task becomes an objective with its weight and metric and
    the config's ``limit``/``num_fewshot``; the optimizer is CMA-ES with mergekit-evolve's defaults (sigma0 1/6,
    100 evaluations). ``random_init`` asks CMA-ES to start from a random point (``x0`` is still logged).
    ``shuffle``, ``apply_chat_template`` and ``fewshot_as_multiturn`` are accepted; chat templates are not applied
    (the lm-eval adapter scores raw prompts).

    Raises:
        ConfigError: unknown keys or model references dfsmerge cannot read (LoRA ``+`` references).
    """
    allowed = {"genome", "tasks", "limit", "num_fewshot", "shuffle", "random_init", "apply_chat_template",
               "fewshot_as_multiturn"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"mergekit-evolve config has unknown keys {unknown}; allowed: {sorted(allowed)}")
    genome = dict(data.get("genome") or {})
    models = genome.get("models")
    refs = []
    for i, m in enumerate(models or []):
        ref = m if isinstance(m, str) else (m.get("model") if isinstance(m, Mapping) else None)
        if isinstance(ref, Mapping):
            ref = ref.get("path")
        if not isinstance(ref, str) or "+" in ref:
            raise ConfigError(f"genome.models[{i}]={m!r}: give a path, hub id or zoo:<name> (LoRA '+' references "
                              "are not supported)")
        refs.append(ref)
    if models is not None:
        genome["models"] = refs
    genome["mode"] = "ps"
    if genome.get("filters") is None:
        genome.pop("filters", None)
    objectives = []
    for t in data.get("tasks") or []:
        t = {"name": t} if isinstance(t, str) else dict(t)
        obj = {"name": t.pop("name", None), "weight": t.pop("weight", 1.0), "metric": t.pop("metric", "acc,none")}
        if t:
            raise ConfigError(f"mergekit-evolve task {obj['name']!r} has unknown keys {sorted(t)}; allowed: name, "
                              "weight, metric")
        if data.get("limit") is not None:
            obj["limit"] = data["limit"]
        if data.get("num_fewshot") is not None:
            obj["num_fewshot"] = data["num_fewshot"]
        objectives.append(obj)
    opt: dict[str, Any] = {"name": "cma", "sigma0": MERGEKIT_EVOLVE_SIGMA0}
    return {"genome": genome, "objectives": objectives, "optimizer": opt,
            "budget": {"max_evals": MERGEKIT_EVOLVE_MAX_EVALS}}


def load_search_config(path_or_data: str | Path | Mapping[str, Any], *, source: str | None = None) -> SearchConfig:
    """Read and validate a search config (a YAML file or a dict; mergekit-evolve configs are translated).

    Relative model paths, task paths and ``zoo_dir`` in a file are resolved against the file's directory.

    Raises:
        ConfigError: every problem found, each naming the field, the value and the fix.
    """
    if isinstance(path_or_data, Mapping):
        data, src, root = dict(path_or_data), source or "search config", None
    else:
        data, src, root = load_yaml(path_or_data), source or str(path_or_data), Path(path_or_data).parent
    if is_mergekit_evolve(data):
        data = translate_mergekit_evolve(data)
    if root is not None:
        data = _resolve_relative(data, root)
    try:
        return SearchConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source=src)) from None


def _resolve_relative(data: dict[str, Any], root: Path) -> dict[str, Any]:
    def fix(ref: Any) -> Any:
        if isinstance(ref, str) and not ref.startswith("zoo:") and not Path(ref).expanduser().is_absolute() and (
                ref.startswith(("./", "../")) or (root / ref).exists()):
            return str((root / ref).resolve())
        return ref

    data = dict(data)
    if isinstance(data.get("task_paths"), list):
        data["task_paths"] = [str((root / p).resolve()) if not (Path(p).is_absolute() or p.startswith("real:"))
                              else p for p in data["task_paths"]]
    if isinstance(data.get("zoo_dir"), str) and not Path(data["zoo_dir"]).expanduser().is_absolute():
        data["zoo_dir"] = str((root / data["zoo_dir"]).resolve())
    g = data.get("genome")
    if isinstance(g, dict):
        g = dict(g)
        g["models"] = _map_refs(g.get("models"), fix)
        if "base_model" in g:
            g["base_model"] = fix(g["base_model"])
        if isinstance(g.get("dfs"), dict) and "models" in g["dfs"]:
            g["dfs"] = {**g["dfs"], "models": _map_refs(g["dfs"]["models"], fix)}
        data["genome"] = g
    return data


def _map_refs(models: Any, fix) -> Any:
    if isinstance(models, list):
        out = []
        for m in models:
            if isinstance(m, str):
                out.append({"name": default_model_name(m), "model": fix(m)})
            elif isinstance(m, dict) and "model" in m:
                out.append({**m, "model": fix(m["model"])})
            else:
                out.append(m)
        return out
    if isinstance(models, dict):
        return {k: fix(v) for k, v in models.items()}
    return models
