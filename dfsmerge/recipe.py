"""Plan and run a mergekit-style merge recipe out of core (``dfsmerge merge``).

A recipe becomes a list of :class:`TensorJob` (one per output tensor, parameters fully resolved with mergekit's
precedence: slice source / model > slice > global, filters and gradients evaluated). Running the jobs reads each
input tensor lazily, merges it with the merge library and streams the result into an atomic sharded writer, so
peak memory stays near a few tensors.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dfsmerge.arch import Architecture, get_architecture
from dfsmerge.config import (
    InputSlice,
    MergeConfig,
    OutputSlice,
    canonical_dtype,
    resolve_parameter,
    torch_dtype,
    validator_for,
)
from dfsmerge.errors import ArchitectureError, ConfigError, MergeError
from dfsmerge.io import CheckpointReader, ShardedWriter, copy_tokenizer, open_checkpoint


@dataclass(frozen=True, slots=True)
class TensorJob:
    """One output tensor: its inputs (model, tensor name), base position and resolved parameters."""

    out_name: str
    inputs: tuple[tuple[str, str], ...]
    base_index: int | None
    params: tuple[Mapping[str, Any], ...]
    global_params: Mapping[str, Any]


@dataclass
class MergePlan:
    config: MergeConfig
    arch: Architecture
    jobs: list[TensorJob]
    out_config: dict[str, Any]
    readers: dict[str, CheckpointReader] = field(repr=False)


def _method(name: str):
    from dfsmerge.merge import get_method

    return get_method(name)


def _per_model_specs(method) -> list:
    return [p for p in method.params if p.per_model]


def _global_specs(method) -> list:
    return [p for p in method.params if not p.per_model]


def open_models(config: MergeConfig, *, allow_pickle: bool = False) -> dict[str, CheckpointReader]:
    """Open every model the recipe references (lazily; no tensor is read)."""
    return {m: open_checkpoint(m, allow_pickle=allow_pickle) for m in config.referenced_models()}


def plan_merge(config: MergeConfig, readers: Mapping[str, CheckpointReader]) -> MergePlan:
    """Resolve a recipe into per-tensor jobs.

    Raises:
        ConfigError: bad layer range, missing or unknown parameter, unknown method.
        ArchitectureError: models of different families or unsupported family.
    """
    method = _method(config.merge_method)
    base_ref = config.base_model
    donor = base_ref or config.referenced_models()[0]
    arch = get_architecture(readers[donor].config, source=donor)
    for ref, r in readers.items():
        other = get_architecture(r.config, source=ref)
        if other.model_type != arch.model_type:
            raise ArchitectureError(
                f"model {ref!r} is a {other.model_type!r} model but {donor!r} is {arch.model_type!r}; every model "
                "of a recipe must share one architecture")
    if method.base == "required" and not base_ref and not any(s.base_model for s in config.slices or []):
        raise ConfigError(f"merge_method={config.merge_method!r} needs base_model; add base_model: <model>")

    _check_parameter_names(config, method)
    slices = config.normalized_slices(lambda m: arch.num_layers(readers[m].config))
    for si, sl in enumerate(slices):
        for src in sl.sources:
            n = arch.num_layers(readers[src.model].config)
            if src.layer_range[1] > n:
                raise ConfigError(
                    f"slices[{si}] source {src.model!r}: layer_range={list(src.layer_range)} exceeds the model's "
                    f"{n} layers; use a range within [0, {n}]")

    jobs: list[TensorJob] = []
    out_cfg = copy.deepcopy(readers[donor].config)
    layer_types: list[Any] = []

    def add(out_name: str, in_names: list[str], sl: OutputSlice, sources: list[InputSlice], t: float,
            optional: bool, out_layer: int | None = None) -> None:
        models = [s.model for s in sources]
        present = [(m, n) for m, n in zip(models, in_names, strict=True) if _has(readers[m], n, arch)]
        if not present:
            if optional:
                return
            raise ConfigError(f"tensor {in_names[0]!r} is missing from {models}; the checkpoints are incomplete")
        # mergekit passes a lone optional tensor through; any other gap is an incomplete checkpoint
        if len(present) < len(models) and not (optional and len(present) == 1):
            missing = [m for m, n in zip(models, in_names, strict=True) if not _has(readers[m], n, arch)]
            raise ConfigError(f"tensor {in_names[0]!r} is missing from {missing}; the checkpoints are incomplete")
        base = sl.base_model or base_ref
        base_index = next((i for i, (m, _) in enumerate(present) if m == base), None)
        params = []
        for i, (m, n) in enumerate(present):
            scopes = [s.parameters for s in sources if s.model == m] + [sl.parameters, config.parameters]
            p = {}
            # As in mergekit, the base model only takes the per-input parameters that are not "non-base" ones.
            for spec in _per_model_specs(method):
                if i == base_index and spec.non_base:
                    continue
                v = resolve_parameter(spec.name, scopes, tensor_name=n, t=t, validate=validator_for(spec.kind))
                if v is not None:
                    p[spec.name] = v
            params.append(p)
        gparams = {}
        for spec in _global_specs(method):
            v = resolve_parameter(spec.name, [sl.parameters, config.parameters], tensor_name=out_name, t=t,
                                  validate=validator_for(spec.kind))
            if v is not None:
                gparams[spec.name] = v
        jobs.append(TensorJob(out_name, tuple(present), base_index, tuple(params), gparams))

    first, last = slices[0], slices[-1]
    tied_out = arch.tied(out_cfg)
    for name in arch.pre_tensor_names(out_cfg):
        add(name, [name] * len(first.sources), first, first.sources, 0.0, optional=False)
    out_layer = 0
    for sl in slices:
        n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        for off in range(n):
            t = off / (n - 1) if n > 1 else 1.0
            for tmpl in arch.layer_templates + arch.optional_layer_templates:
                optional = tmpl in arch.optional_layer_templates
                in_names = [tmpl.format(s.layer_range[0] + off) for s in sl.sources]
                add(tmpl.format(out_layer), in_names, sl, sl.sources, t, optional)
            src0 = sl.sources[0]
            lt = readers[src0.model].config.get("layer_types")
            if lt:
                layer_types.append(lt[src0.layer_range[0] + off])
            out_layer += 1
    for name in arch.post_weights:
        if name == arch.head and tied_out:
            continue
        add(name, [name] * len(last.sources), last, last.sources, 0.0, optional=False)

    out_cfg[arch.num_layers_key] = out_layer
    if "layer_types" in out_cfg and layer_types:
        out_cfg["layer_types"] = layer_types
    dt = config.out_dtype or config.dtype
    if dt:
        out_cfg["dtype"] = canonical_dtype(dt)
        out_cfg.pop("torch_dtype", None)
    return MergePlan(config=config, arch=arch, jobs=jobs, out_config=out_cfg, readers=dict(readers))


def _check_parameter_names(config: MergeConfig, method) -> None:
    """Unknown parameter names: a typo (known to no method) is an error; a name another method uses is ignored
    with a warning, as mergekit ignores it."""
    import warnings

    from dfsmerge.merge import get_method, registered_methods

    declared = {p.name for p in method.params}
    known = {p.name for m in registered_methods() for p in get_method(m).params}
    scopes: list[tuple[str, Mapping[str, Any] | None]] = [("parameters", config.parameters)]
    scopes += [(f"models[{i}].parameters", m.parameters) for i, m in enumerate(config.models or [])]
    for i, sl in enumerate(config.slices or []):
        scopes.append((f"slices[{i}].parameters", sl.parameters))
        scopes += [(f"slices[{i}].sources[{j}].parameters", s.parameters) for j, s in enumerate(sl.sources)]
    for where, scope in scopes:
        for name in scope or {}:
            if name in declared:
                continue
            if name in known:
                warnings.warn(f"{where}.{name} is not a parameter of merge_method={config.merge_method!r}; "
                              "ignored", stacklevel=3)
                continue
            raise ConfigError(
                f"{where}.{name}: unknown parameter for merge_method={config.merge_method!r}; its parameters are "
                f"{', '.join(sorted(declared)) or '(none)'}")


def _has(reader: CheckpointReader, name: str, arch: Architecture) -> bool:
    return name in reader or (name == arch.head and arch.embed in reader and arch.tied(reader.config))


def _stored_name(reader: CheckpointReader, name: str, arch: Architecture) -> str:
    """The name ``name`` is stored under in ``reader``: a tied source's head is its embedding."""
    return arch.embed if name not in reader and name == arch.head else name


def _read(reader: CheckpointReader, name: str, arch: Architecture) -> torch.Tensor:
    return reader.get_tensor(_stored_name(reader, name, arch))


def execute_job(plan: MergePlan, job: TensorJob, *, device: str = "cpu", seed: int | None = 0) -> torch.Tensor:
    """Merge one output tensor (inputs read lazily, cast to the recipe's ``dtype`` when given)."""
    from dfsmerge.merge import merge_tensor

    dtype = torch_dtype(plan.config.dtype)
    tensors, dtypes = [], []
    for m, n in job.inputs:
        t = _read(plan.readers[m], n, plan.arch).to(device)
        if t.is_floating_point():
            if dtype is not None:
                t = t.to(dtype)
            dtypes.append(t.dtype)
            if t.dtype in (torch.bfloat16, torch.float16):
                # the library computes in float32 anyway; converting here frees each 16-bit copy at once
                t = t.float()
        tensors.append(t)
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        detail = ", ".join(f"{m}: {list(t.shape)}" for (m, _), t in zip(job.inputs, tensors, strict=True))
        raise MergeError(f"tensor {job.out_name!r} has different shapes across models ({detail}); these models "
                         "cannot be merged tensor by tensor")
    out = merge_tensor(plan.config.merge_method, tensors, base_index=job.base_index, params=job.params,
                       global_params=job.global_params, seed=seed, name=job.out_name)
    out_dtype = torch_dtype(plan.config.out_dtype)
    if out.is_floating_point() and dtypes:
        # the result takes the promoted input dtype (as mergekit), or out_dtype when given
        out = out.to(out_dtype or functools.reduce(torch.promote_types, dtypes))
    return out


def output_manifest(plan: MergePlan) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Name, shape and dtype of every output tensor, in plan order, from the input headers alone."""
    dtype, out_dtype = torch_dtype(plan.config.dtype), torch_dtype(plan.config.out_dtype)
    manifest = []
    for job in plan.jobs:
        dtypes = [plan.readers[m].get_dtype(_stored_name(plan.readers[m], n, plan.arch)) for m, n in job.inputs]
        model, name = job.inputs[0]
        shape = plan.readers[model].get_shape(_stored_name(plan.readers[model], name, plan.arch))
        if all(d.is_floating_point for d in dtypes):
            dtypes = [dtype or d for d in dtypes]
            manifest.append((job.out_name, shape, out_dtype or functools.reduce(torch.promote_types, dtypes)))
        else:
            manifest.append((job.out_name, shape, dtypes[0]))
    return manifest


def iter_merged(plan: MergePlan, *, device: str = "cpu", seed: int | None = 0, workers: int | None = None,
                memory_budget: int | str = "1GB", manifest: list | None = None
                ) -> Iterator[tuple[TensorJob, torch.Tensor]]:
    """Merged tensors in plan order, computed by a small thread pool (torch releases the GIL in its kernels).

    Reading, merging and writing overlap; at most ``workers + 1`` jobs are in flight and their estimated
    working memory (fp32 copies of every input and a few temporaries each, from ``manifest``'s shapes; computed
    when not given) stays under ``memory_budget`` (a job larger than the budget runs alone).
    """
    from dfsmerge.io import parse_size

    if workers is None:
        workers = 1 if device.startswith("cuda") else 2
    if workers <= 1:
        for job in plan.jobs:
            yield job, execute_job(plan, job, device=device, seed=seed)
        return
    budget = parse_size(memory_budget)
    shapes = [shape for _, shape, _ in (manifest or output_manifest(plan))]
    pending: deque[tuple[TensorJob, Future, int]] = deque()
    in_flight = 0
    with ThreadPoolExecutor(workers, thread_name_prefix="dfsmerge-merge") as pool:
        try:
            for job, shape in zip(plan.jobs, shapes, strict=True):
                cost = math.prod(shape) * 4 * (len(job.inputs) + 1) * 3
                while pending and (len(pending) > workers or in_flight + cost > budget):
                    done_job, fut, c = pending.popleft()
                    in_flight -= c
                    yield done_job, fut.result()
                pending.append((job, pool.submit(execute_job, plan, job, device=device, seed=seed), cost))
                in_flight += cost
            while pending:
                done_job, fut, _ = pending.popleft()
                yield done_job, fut.result()
        finally:
            for _, fut, _ in pending:
                fut.cancel()


def run_merge(config: MergeConfig, out_dir: str | Path, *, device: str = "cpu", seed: int | None = 0,
              allow_pickle: bool = False, force: bool = False, max_shard_size: int | str = "5GB",
              progress: bool = True, workers: int | None = None, memory_budget: int | str = "1GB") -> Path:
    """Run a recipe and write the merged checkpoint atomically to ``out_dir``.

    Args:
        config: the parsed recipe.
        out_dir: target directory (must not exist unless ``force``).
        device: where tensors are merged (``cuda`` uses the fused kernels where available).
        seed: seed of the random methods (DARE, DELLA); the same seed gives the same model.
        workers: tensors merged concurrently (default: 2 on CPU, 1 on CUDA); results are identical for any value.
        memory_budget: bound on the estimated working memory of the tensors in flight (a larger tensor runs
            alone), so concurrency never multiplies the peak of the biggest tensor.
    Returns:
        ``out_dir``.
    Raises:
        DfsmergeError subclasses for every user error; nothing is left at ``out_dir`` on failure.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    ShardedWriter(out_dir, force=force).check_target()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={device!r} but CUDA is not available here; use --device cpu")
    readers = open_models(config, allow_pickle=allow_pickle)
    plan = plan_merge(config, readers)
    donor = _tokenizer_donor(config)
    manifest = output_manifest(plan)
    results = iter_merged(plan, device=device, seed=seed, workers=workers, memory_budget=memory_budget,
                          manifest=manifest)
    with ShardedWriter(out_dir, max_shard_size=max_shard_size, force=force, manifest=manifest) as w:
        for job, tensor in tqdm(results, total=len(plan.jobs), desc="merging", unit="tensor", disable=not progress):
            w.add_tensor(job.out_name, tensor)
        w.write_json("config.json", plan.out_config)
        copy_tokenizer(readers[donor].path, w)
        gen = readers[donor].path / "generation_config.json"
        if gen.is_file():
            w.copy_file(gen)
        w.write_text("mergekit.yaml", config.to_yaml())
        w.write_text("README.md", model_card(config, seed=seed))
    return out_dir


def _tokenizer_donor(config: MergeConfig) -> str:
    ts = config.tokenizer_source
    if ts is None or ts == "base":
        if ts == "base" and not config.base_model:
            raise ConfigError("tokenizer_source='base' but no base_model is set; set base_model or name a model")
        return config.base_model or config.referenced_models()[0]
    name = ts.removeprefix("model:")
    if name not in config.referenced_models():
        raise ConfigError(f"tokenizer_source={ts!r} names a model the recipe does not use; use 'base' or one of "
                          f"{config.referenced_models()}")
    return name


def model_card(config: MergeConfig, *, seed: int | None) -> str:
    """A model card ``README.md`` with the recipe and the source models."""
    models = "\n".join(f"- `{m}`" for m in config.referenced_models())
    return (
        "---\nlibrary_name: transformers\ntags:\n- merge\n- dfsmerge\n---\n"
        f"# {config.name or 'Merged model'}\n\n"
        f"This model was made with [dfsmerge](https://github.com/) using the `{config.merge_method}` merge "
        f"method{'' if seed is None else f' (seed {seed})'}.\n\n"
        f"## Source models\n\n{models}\n\n"
        f"## Recipe\n\nReproduce it with `dfsmerge merge mergekit.yaml OUT` or `mergekit-yaml mergekit.yaml OUT`:\n\n"
        f"```yaml\n{config.to_yaml()}```\n"
    )


def describe_plan(plan: MergePlan) -> str:
    return json.dumps([{"out": j.out_name, "inputs": j.inputs, "params": j.params, "global": j.global_params}
                       for j in plan.jobs], indent=1, default=str)
