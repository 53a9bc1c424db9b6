"""Config files as frozen pydantic models.

This module holds the mergekit-compatible merge recipe (``dfsmerge merge``): ``models:`` or ``slices:``,
``base_model``, ``merge_method``, parameters at model, slice-source, slice and global level, gradients (lists
interpolated across layers) and filters (``- filter: self_attn`` ``value: ...``), ``dtype``, ``out_dtype``,
``tokenizer_source`` and the ``tokenizer:`` section. Loading errors are collected and reported as one
:class:`ConfigError` naming each field, its value and the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dfsmerge.errors import ConfigError
from dfsmerge.io.dtypes import DTYPES

Scalar = Union[bool, int, float, str]  # noqa: UP007 - pydantic union order matters


class ConditionalParameter(BaseModel):
    """A value that applies to tensors whose name contains ``filter`` (``None`` or ``"*"``: every tensor)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    value: Scalar | list[Scalar]
    filter: str | None = None


ParameterSetting = Union[ConditionalParameter, list[ConditionalParameter], Scalar, list[Scalar]]  # noqa: UP007
Parameters = dict[str, ParameterSetting]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class InputModel(_Frozen):
    model: str
    parameters: Parameters | None = None
    # mergekit ignores a layer_range on whole-model entries (mergekit-evolve writes one); so do we
    layer_range: tuple[int, int] | None = None

    @field_validator("model")
    @classmethod
    def _no_lora(cls, v: str) -> str:
        if "+" in v:
            raise ValueError(f"model={v!r}: LoRA references (model+lora) are not supported; merge the LoRA first")
        return v


class InputSlice(InputModel):
    layer_range: tuple[int, int]  # type: ignore[assignment]

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range={list(v)} is empty or negative; use [start, end) with 0 <= start < end")
        return v


class OutputSlice(_Frozen):
    sources: list[InputSlice]
    base_model: str | None = None
    parameters: Parameters | None = None
    residual_weight: float | None = None

    @model_validator(mode="after")
    def _same_length(self) -> OutputSlice:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if not self.sources:
            raise ValueError("slice has no sources; list at least one {model, layer_range}")
        if len(lengths) > 1:
            ranges = [list(s.layer_range) for s in self.sources]
            raise ValueError(f"sources have layer ranges of different lengths {ranges}; every source of a slice "
                             "must span the same number of layers")
        return self


class ZeroToken(_Frozen):
    """A token's embedding and head rows set to zero (``{kind: zero}``)."""

    kind: Literal["zero"]


class ModelToken(_Frozen):
    """A token's rows copied from another token of one model (``{kind: model_token, model, token | token_id}``)."""

    kind: Literal["model_token"]
    model: str
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_token(self) -> ModelToken:
        if (self.token_id is None) == (self.token is None):
            raise ValueError(f"model_token source for model {self.model!r} needs exactly one of token or token_id")
        return self


class TokenSetting(_Frozen):
    """Where one output token's rows come from when a model lacks it (``force``: for every model)."""

    source: ZeroToken | ModelToken | str | None = None
    force: bool = False

    @field_validator("source", mode="before")
    @classmethod
    def _kind(cls, v: Any) -> Any:
        if isinstance(v, Mapping):  # dispatch on kind so errors name the one form that was meant
            kinds = {"zero": ZeroToken, "model_token": ModelToken}
            if v.get("kind") not in kinds:
                raise ValueError(f"kind={v.get('kind')!r} is not a token source; use zero or model_token, or a model")
            return kinds[v["kind"]].model_validate(v)
        return v

    def source_model(self) -> str | None:
        if isinstance(self.source, ModelToken):
            return self.source.model
        return self.source.removeprefix("model:") if isinstance(self.source, str) else None


class TokenizerSettings(_Frozen):
    """mergekit's ``tokenizer:`` section: the output vocabulary's source, per-token sources, row padding."""

    source: str = "union"
    tokens: dict[str, TokenSetting] | None = None
    pad_to_multiple_of: int | None = Field(default=None, gt=0)


class MergeConfig(_Frozen):
    """A mergekit merge recipe (mergekit 0.1.5 schema, without MoE ``modules:``)."""

    merge_method: str
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    base_model: str | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _one_form(self) -> MergeConfig:
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of 'models:' (whole models merged) or 'slices:' (layer ranges)")
        for field in ("dtype", "out_dtype"):
            v = getattr(self, field)
            if v is not None and v not in DTYPES:
                raise ValueError(f"{field}={v!r} is not a dtype; use one of {', '.join(DTYPES)}")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give either tokenizer_source or a tokenizer: section, not both (as mergekit); move "
                             f"tokenizer_source={self.tokenizer_source!r} to tokenizer.source")
        if self.tokenizer is not None:
            models = self.referenced_models()
            for token, setting in (self.tokenizer.tokens or {}).items():
                model = setting.source_model()
                if model is not None and model not in models:
                    raise ValueError(f"tokenizer.tokens[{token!r}].source names model {model!r}, which the recipe "
                                     f"does not merge; use one of {models} or {{kind: zero}}")
        return self

    def tokenizer_choice(self) -> str | None:
        """The output tokenizer's source (``base``, ``union``, a model), or None to copy the donor's files."""
        if self.tokenizer is not None:
            return self.tokenizer.source
        return self.tokenizer_source

    def referenced_models(self) -> list[str]:
        """Every model the recipe names, base first, without duplicates, in order of appearance."""
        seen: list[str] = []
        for m in ([self.base_model] if self.base_model else []):
            seen.append(m)
        for m in self.models or []:
            if m.model not in seen:
                seen.append(m.model)
        for s in self.slices or []:
            for src in s.sources:
                if src.model not in seen:
                    seen.append(src.model)
            if s.base_model and s.base_model not in seen:
                seen.append(s.base_model)
        return seen

    def normalized_slices(self, num_layers: Callable[[str], int]) -> list[OutputSlice]:
        """The recipe as output slices (a ``models:`` recipe is one slice over every layer, base appended)."""
        if self.slices:
            return list(self.slices)
        sources = [InputSlice(model=m.model, parameters=m.parameters, layer_range=(0, num_layers(m.model)))
                   for m in self.models]
        if self.base_model and all(m.model != self.base_model for m in self.models):
            sources.append(InputSlice(model=self.base_model, layer_range=(0, num_layers(self.base_model))))
        return [OutputSlice(sources=sources)]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True, mode="json"), sort_keys=False)


# -- parameter resolution ----------------------------------------------------------------------------
def evaluate_setting(setting: Any, *, tensor_name: str, t: float, validate: Callable[[Any], Any]) -> Any:
    """Value of one parameter setting for a tensor at relative depth ``t`` in [0, 1] (None: no match).

    Numeric lists are gradients, linearly interpolated at ``t``; lists of booleans or strings pick the entry at
    ``int(t * (n - 1))``; conditional settings apply to tensor names containing their ``filter`` (first match).
    """
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, bool | int | float | str):
        return validate(setting)
    if not isinstance(setting, list) or not setting:
        return None
    if all(isinstance(e, bool | int | float | str) for e in setting):
        values = [validate(e) for e in setting]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        pos = t * (len(values) - 1)
        i0 = int(pos)
        i1 = min(len(values) - 1, i0 + 1)
        frac = pos - i0
        return validate((1 - frac) * values[i0] + frac * values[i1])
    for cond in setting:
        if not isinstance(cond, ConditionalParameter):
            cond = ConditionalParameter.model_validate(cond)
        if cond.filter in (None, "*") or (tensor_name and cond.filter in tensor_name):
            return evaluate_setting(cond.value, tensor_name=tensor_name, t=t, validate=validate)
    return None


def resolve_parameter(name: str, scopes: Iterable[Mapping[str, Any] | None], *, tensor_name: str, t: float,
                      validate: Callable[[Any], Any]) -> Any:
    """First value of ``name`` found in ``scopes`` (highest precedence first), or None."""
    for scope in scopes:
        if scope and name in scope:
            v = evaluate_setting(scope[name], tensor_name=tensor_name, t=t, validate=validate)
            if v is not None:
                return v
    return None


def tensor_parameters(method: Any, config: MergeConfig, sl: OutputSlice, inputs: Sequence[tuple[str, str]], *,
                      out_name: str, t: float, base_index: int | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The parameters of one output tensor as mergekit 0.1.5 resolves them: the one resolver, which ``dfsmerge
    merge`` plans with and a PS recipe's runtime merge (:meth:`dfsmerge.genome.PSRecipe.tensor_params`) reads its
    own mergekit dict with.

    Each per-model parameter of an input comes from that model's slice sources, then the slice, then the recipe
    (the base skips ``non_base`` ones, as in mergekit); each global parameter from the slice, then the recipe.
    A parameter set nowhere is left out (the merge library fills its default).

    Args:
        method: the merge method (its ``params`` declare name, kind, ``per_model`` and ``non_base``).
        config: the recipe.
        sl: the output slice that holds the tensor.
        inputs: ``(model, tensor name)`` of each input in merge order (filters match the tensor name).
        out_name: the output tensor's name (filters of global parameters match it).
        t: the tensor's relative depth in its slice, in [0, 1] (0 for tensors before or after the layers).
        base_index: position of the base among ``inputs``, or None.

    Returns:
        ``(per-input parameters, global parameters)``.
    """
    per_input = []
    for i, (model, name) in enumerate(inputs):
        scopes = [s.parameters for s in sl.sources if s.model == model] + [sl.parameters, config.parameters]
        p = {}
        for spec in method.params:
            if spec.per_model and not (i == base_index and spec.non_base):
                v = resolve_parameter(spec.name, scopes, tensor_name=name, t=t, validate=validator_for(spec.kind))
                if v is not None:
                    p[spec.name] = v
        per_input.append(p)
    glob = {}
    for spec in method.params:
        if not spec.per_model:
            v = resolve_parameter(spec.name, [sl.parameters, config.parameters], tensor_name=out_name, t=t,
                                  validate=validator_for(spec.kind))
            if v is not None:
                glob[spec.name] = v
    return per_input, glob


def validator_for(kind: type) -> Callable[[Any], Any]:
    """Convert a YAML scalar to a parameter's declared type (bool, int, float or str)."""
    def convert(v: Any) -> Any:
        if kind is bool:
            if isinstance(v, str):
                if v.lower() in ("true", "yes", "1"):
                    return True
                if v.lower() in ("false", "no", "0"):
                    return False
                raise ValueError(f"{v!r} is not a boolean; use true or false")
            return bool(v)
        if kind in (int, float):
            if isinstance(v, bool):
                return kind(v)
            return kind(float(v)) if kind is int else float(v)
        return v
    return convert


# -- loading -----------------------------------------------------------------------------------------
def format_validation_error(e: ValidationError, *, source: str) -> str:
    """One message for all pydantic errors: ``field=value: problem`` each, joined with ``; ``."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-after", "union")))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field; check its spelling against the mergekit/dfsmerge documentation"
        elif err["type"] == "missing":
            msg = "required field is missing; add it"
        val = err.get("input")
        shown = "" if err["type"] == "missing" or isinstance(val, dict) else f"={val!r}"
        parts.append(f"{loc or '(top level)'}{shown}: {msg}")
    return f"{source}: " + "; ".join(dict.fromkeys(parts))


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; check the path")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]}); fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_merge_config(path_or_data: str | Path | Mapping[str, Any]) -> MergeConfig:
    """Parse a mergekit YAML recipe.

    Raises:
        ConfigError: every problem found, each naming the field, the value and the fix.
    """
    if isinstance(path_or_data, Mapping):
        data, source = dict(path_or_data), "merge config"
    else:
        data, source = load_yaml(path_or_data), str(path_or_data)
    if "modules" in data:
        raise ConfigError(f"{source}: modules= (multi-module/MoE recipes) is not supported; use models: or slices:")
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source=source)) from None
