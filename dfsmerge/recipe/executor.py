"""Plan and run a mergekit-style merge recipe out of core (``dfsmerge merge``).

A recipe becomes a list of :class:`TensorJob` (one per output tensor, parameters fully resolved with mergekit's
precedence: slice source / model > slice > global, filters and gradients evaluated). Running the jobs reads each
input tensor lazily, merges it with the merge library and streams the result into an atomic sharded writer, so
peak memory stays near a few tensors. A tensor larger than the memory budget allows is merged in row chunks read
through safetensors slices, where its method declares how (``MergeMethod.chunking``; statistics gathered in
streaming passes first), bit-identical to the whole-tensor merge, and its chunks are written straight to their
place in the output shard: it then costs one chunk, not its size.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import queue
import threading
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dfsmerge.arch import Architecture, get_architecture, layout_reader, path_layer_config
from dfsmerge.errors import ArchitectureError, ConfigError, MergeError
from dfsmerge.io import CheckpointReader, ShardedWriter, copy_tokenizer, open_checkpoint
from dfsmerge.io.dtypes import canonical_dtype, torch_dtype
from dfsmerge.io.writer import save_tokenizer
from dfsmerge.merge.vocab import VocabularyPlan, align_rows, build_vocabulary
from dfsmerge.recipe.config import (
    ConditionalParameter,
    InputSlice,
    MergeConfig,
    OutputSlice,
    tensor_parameters,
)


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
    # with tokenizer_source / tokenizer: the output vocabulary; embedding and head rows are aligned to it
    vocabulary: VocabularyPlan | None = field(default=None, repr=False)


def _method(name: str):
    from dfsmerge.merge import get_method

    return get_method(name)


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
    # families whose tensors transformers converts on load merge in its model layout, as mergekit 0.1.5 does
    readers = {m: layout_reader(r, source=m) for m, r in readers.items()}
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
    layer_refs: list[tuple[str, int]] = []

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
        params, gparams = tensor_parameters(method, config, sl, present, out_name=out_name, t=t,
                                            base_index=base_index)
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
            layer_refs.append((src0.model, src0.layer_range[0] + off))
            out_layer += 1
    for name in arch.post_weights:
        if name == arch.head and tied_out:
            continue
        add(name, [name] * len(last.sources), last, last.sources, 0.0, optional=False)

    out_cfg[arch.num_layers_key] = out_layer
    # each output layer keeps its source layer's attention type (and other per-layer config) as transformers
    # computed it, so vanilla transformers rebuilds the same masks for a stack
    out_cfg.update(path_layer_config({m: r.config for m, r in readers.items()}, layer_refs))
    dt = config.out_dtype or config.dtype
    if dt:
        out_cfg["dtype"] = canonical_dtype(dt)
        out_cfg.pop("torch_dtype", None)
    vocabulary = _plan_vocabulary(config, readers)
    if vocabulary is not None:
        out_cfg["vocab_size"] = vocabulary.rows  # padded to tokenizer.pad_to_multiple_of, as mergekit
    return MergePlan(config=config, arch=arch, jobs=jobs, out_config=out_cfg, readers=dict(readers),
                     vocabulary=vocabulary)


def _plan_vocabulary(config: MergeConfig, readers: Mapping[str, CheckpointReader]) -> VocabularyPlan | None:
    """The output vocabulary when the recipe asks for tokenizer handling (mergekit 0.1.5's ``BuildTokenizer``)."""
    source = config.tokenizer_choice()
    if source is None:
        return None
    from dfsmerge.io.reader import resolve_model_path

    models = config.referenced_models()
    paths = {m: readers[m].path for m in models}
    if source not in ("base", "union"):
        name = source.removeprefix("model:")
        if name not in paths:  # mergekit takes the tokenizer of any model, merged or not
            paths[name] = resolve_model_path(name)
        source = f"model:{name}"
    tk = config.tokenizer
    return build_vocabulary(source, models=models, base=config.base_model or models[0], paths=paths,
                            vocab_sizes={m: readers[m].config.get("vocab_size") for m in models},
                            tokens=tk.tokens if tk else None, pad_to_multiple_of=tk.pad_to_multiple_of if tk else None)


def _vocab_indexed(plan: MergePlan, job: TensorJob) -> bool:
    """Whether ``job``'s rows are aligned to the output vocabulary: the embedding, the head and its bias."""
    if plan.vocabulary is None:
        return False
    head_module = plan.arch.head.rpartition(".")[0]
    return job.out_name == plan.arch.embed or job.out_name.rpartition(".")[0] == head_module


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
                spec = method.param(name)
                for value in _setting_scalars(scope[name]):  # gradient anchors and filter values
                    spec.coerce(value, method=config.merge_method, where=f" (in {where})")
                continue
            if name in known:
                warnings.warn(f"{where}.{name} is not a parameter of merge_method={config.merge_method!r}; "
                              "ignored", stacklevel=3)
                continue
            if name == "embed_slerp":  # mergekit < 0.1's tokenizer merge flag; 0.1.5 accepts and ignores it
                warnings.warn(f"{where}.embed_slerp is ignored (as mergekit 0.1.5): embedding and head rows are "
                              f"aligned to the output vocabulary, then merged by {config.merge_method!r}",
                              stacklevel=3)
                continue
            raise ConfigError(
                f"{where}.{name}: unknown parameter for merge_method={config.merge_method!r}; its parameters are "
                f"{', '.join(sorted(declared)) or '(none)'}")


def _setting_scalars(setting: Any) -> Iterator[Any]:
    """Every scalar of a parameter setting: gradient anchors and filter values (the values merges interpolate
    between, so all of them in range means every interpolated value is)."""
    if isinstance(setting, list):
        for entry in setting:
            yield from _setting_scalars(entry)
    elif isinstance(setting, ConditionalParameter):
        yield from _setting_scalars(setting.value)
    elif isinstance(setting, Mapping) and "value" in setting:
        yield from _setting_scalars(setting["value"])
    else:
        yield setting


def _has(reader: CheckpointReader, name: str, arch: Architecture) -> bool:
    return name in reader or (name == arch.head and arch.embed in reader and arch.tied(reader.config))


def _stored_name(reader: CheckpointReader, name: str, arch: Architecture) -> str:
    """The name ``name`` is stored under in ``reader``: a tied source's head is its embedding."""
    return arch.embed if name not in reader and name == arch.head else name


def _read(reader: CheckpointReader, name: str, arch: Architecture) -> torch.Tensor:
    return reader.get_tensor(_stored_name(reader, name, arch))


def _aligned(t: torch.Tensor, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.dtype | None]:
    """A merge input cast to the recipe's ``dtype`` (when given), and the dtype it counts as for the output."""
    if not t.is_floating_point():
        return t, None
    if dtype is not None:
        t = t.to(dtype)
    counted = t.dtype
    if t.dtype in (torch.bfloat16, torch.float16):
        # the library computes in float32 anyway; converting here frees each 16-bit copy at once
        t = t.float()
    return t, counted


def _out_dtype(plan: MergePlan, dtypes: list[torch.dtype]) -> torch.dtype:
    # the result takes the promoted input dtype (as mergekit), or out_dtype when given
    return torch_dtype(plan.config.out_dtype) or functools.reduce(torch.promote_types, dtypes)


def execute_job(plan: MergePlan, job: TensorJob, *, device: str = "cpu", seed: int | None = 0,
                chunk_bytes: int | None = None) -> torch.Tensor:
    """Merge one output tensor (inputs read lazily, cast to the recipe's ``dtype`` when given).

    With ``chunk_bytes``, a tensor whose estimated working memory exceeds it is merged in row chunks of about
    that working memory when its method allows (:func:`job_chunking`); the result is bit-identical.
    """
    from dfsmerge.merge import merge_tensor

    chunked = job_chunking(plan, job, chunk_bytes=chunk_bytes)
    if chunked is not None:
        return _execute_chunked(plan, job, *chunked, device=device)
    dtype = torch_dtype(plan.config.dtype)
    tensors, dtypes = [], []
    raw = [_read(plan.readers[m], n, plan.arch).to(device) for m, n in job.inputs]
    if _vocab_indexed(plan, job):
        # rows re-indexed by the output vocabulary in the recipe's dtype, before the merge (as mergekit)
        cast = [t.to(dtype) if dtype is not None and t.is_floating_point() else t for t in raw]
        base = job.inputs[job.base_index][0] if job.base_index is not None else None
        aligned = align_rows({m: t for (m, _), t in zip(job.inputs, cast, strict=True)}, plan.vocabulary, base=base,
                             name=job.out_name)
        raw = [aligned[m] for m, _ in job.inputs]
    for t in raw:
        t, counted = _aligned(t, dtype)
        if counted is not None:
            dtypes.append(counted)
        tensors.append(t)
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        detail = ", ".join(f"{m}: {list(t.shape)}" for (m, _), t in zip(job.inputs, tensors, strict=True))
        raise MergeError(f"tensor {job.out_name!r} has different shapes across models ({detail}); these models "
                         "cannot be merged tensor by tensor")
    out = merge_tensor(plan.config.merge_method, tensors, base_index=job.base_index, params=job.params,
                       global_params=job.global_params, seed=seed, name=job.out_name)
    if out.is_floating_point() and dtypes:
        out = out.to(_out_dtype(plan, dtypes))
    return out


_AHEAD = 2  # merged parts a streamed tensor (RowParts) computes ahead of the writer
_ARENA_KEEP = 64 << 20  # free memory glibc keeps at the top of a thread's heap at most (its largest trim threshold)


def _working_bytes(numel: int, n_inputs: int) -> int:
    # float32 copies of every input and the output, a few temporaries each
    return numel * 4 * (n_inputs + 1) * 3


def job_chunking(plan: MergePlan, job: TensorJob, *, chunk_bytes: int | None):
    """How ``job`` is merged in row chunks: ``(ChunkedMerge, rows per chunk)``, or None to merge it whole.

    A job is chunked when ``chunk_bytes`` is given, its tensors are floating and at least 2-D, its whole-tensor
    working memory exceeds ``chunk_bytes`` and its method declares a chunking for the resolved parameters (the
    registry's ``MergeMethod.chunking``). Only headers are read.
    """
    if chunk_bytes is None:
        return None
    from dfsmerge.merge import resolve_params

    method = _method(plan.config.merge_method)
    if method.chunking is None or _vocab_indexed(plan, job):  # vocabulary-aligned rows are merged whole
        return None
    stored = [(plan.readers[m], _stored_name(plan.readers[m], n, plan.arch)) for m, n in job.inputs]
    shapes = {r.get_shape(n) for r, n in stored}
    if len(shapes) != 1 or not all(r.get_dtype(n).is_floating_point for r, n in stored):
        return None  # the whole-tensor path reports mismatches and passes buffers through
    shape = shapes.pop()
    if len(shape) < 2 or shape[0] < 2:
        return None
    numel = math.prod(shape)
    per_row = _working_bytes(numel // shape[0], len(job.inputs))
    if per_row * shape[0] <= chunk_bytes:
        return None
    base_index, per_model, glob = resolve_params(method, len(job.inputs), base_index=job.base_index,
                                                 params=job.params, global_params=job.global_params,
                                                 name=job.out_name)
    chunker = method.chunking(method, base_index, per_model, glob, numel)
    if chunker is None:
        return None
    rows = max(chunker.min_rows, chunk_bytes // per_row)
    return (chunker, rows) if rows < shape[0] else None


def _execute_chunked(plan: MergePlan, job: TensorJob, chunker, rows: int, *, device: str) -> torch.Tensor:
    """The merged tensor of :func:`chunk_rows` assembled whole (its output costs the full tensor)."""
    out = None
    for a, merged in chunk_rows(plan, job, chunker, rows, device=device):
        if out is None:
            n_rows = plan.readers[job.inputs[0][0]].get_shape(
                _stored_name(plan.readers[job.inputs[0][0]], job.inputs[0][1], plan.arch))[0]
            out = torch.empty((n_rows, *merged.shape[1:]), dtype=merged.dtype, device=merged.device)
        out[a:a + merged.shape[0]] = merged
    return out


def chunk_rows(plan: MergePlan, job: TensorJob, chunker, rows: int, *, device: str = "cpu"
               ) -> Iterator[tuple[int, torch.Tensor]]:
    """Streaming passes for the statistics, then ``(first row, merged rows)`` chunk by chunk in row order, each in
    the output dtype (``chunker, rows`` from :func:`job_chunking`). Only one chunk of every input is in memory."""
    dtype = torch_dtype(plan.config.dtype)
    stored = [(plan.readers[m], _stored_name(plan.readers[m], n, plan.arch)) for m, n in job.inputs]
    n_rows = stored[0][0].get_shape(stored[0][1])[0]
    dtypes: list[torch.dtype] = []

    def chunks() -> Iterator[tuple[int, int, list[torch.Tensor]]]:
        for a in range(0, n_rows, rows):
            b = min(a + rows, n_rows)
            ts = []
            for reader, name in stored:
                t, counted = _aligned(reader.get_rows(name, a, b).to(device), dtype)
                ts.append(t)
                if a == 0 and len(dtypes) < len(stored):
                    dtypes.append(counted)
            work = torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32
            yield a, b, [t.to(work) for t in ts]  # (rows, *S[1:]) each, as merge_tensor aligns them

    from dfsmerge.merge.chunked import WholeTensorNeeded

    try:
        p = 0
        while p < chunker.passes:  # read after every pass: a chunker may need another (a fallback)
            for _, _, ts in chunks():
                chunker.gather(p, ts)
            chunker.end_pass(p)
            p += 1
    except WholeTensorNeeded:  # ties the chunks cannot order as the whole-tensor sort does: merge it whole
        yield 0, execute_job(plan, job, device=device, seed=None, chunk_bytes=None)
        return
    except MergeError as err:
        raise MergeError(f"{err} (tensor {job.out_name!r})") from None
    try:
        for a, _, ts in chunks():
            merged = chunker.apply(ts)  # (b - a, *S[1:])
            del ts
            yield a, merged.to(_out_dtype(plan, dtypes))
    except MergeError as err:
        raise MergeError(f"{err} (tensor {job.out_name!r})") from None


class RowParts:
    """A merged tensor still to be computed, as ``(first row, rows)`` parts in row order (:func:`chunk_rows`):
    iterate it once, writing each part (``ShardedWriter.add_tensor_rows``), so the tensor is never whole.

    After :meth:`start` the parts are computed ahead in a background thread (at most ``ahead`` parts wait), so
    merging overlaps with writing and with the jobs before it; :meth:`stop` ends that thread early.
    """

    def __init__(self, plan: MergePlan, job: TensorJob, chunker: Any, rows: int, *, device: str = "cpu",
                 ahead: int = _AHEAD):
        self.plan, self.job, self.chunker, self.rows, self.device = plan, job, chunker, rows, device
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._ahead = ahead

    def __repr__(self) -> str:
        return f"RowParts({self.job.out_name!r}, rows={self.rows})"

    def _parts(self) -> Iterator[tuple[int, torch.Tensor]]:
        return chunk_rows(self.plan, self.job, self.chunker, self.rows, device=self.device)

    def start(self) -> RowParts:
        """Compute the parts ahead in a background thread."""
        self._queue = queue.Queue(maxsize=self._ahead)

        def put(item: Any) -> bool:
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for part in self._parts():
                    if not put(part):
                        return
                put(_DONE)
            except BaseException as err:  # handed to the consumer, raised there
                put(err)

        threading.Thread(target=produce, name=f"dfsmerge-rows-{self.job.out_name}", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        if self._queue is None:
            yield from self._parts()
            return
        try:
            while (item := self._queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.stop()


_DONE = object()  # end of a RowParts stream


def output_manifest(plan: MergePlan) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Name, shape and dtype of every output tensor, in plan order, from the input headers alone."""
    return [output_manifest_entry(plan, job) for job in plan.jobs]


def output_manifest_entry(plan: MergePlan, job: TensorJob) -> tuple[str, tuple[int, ...], torch.dtype]:
    """``job``'s entry of :func:`output_manifest`."""
    dtype, out_dtype = torch_dtype(plan.config.dtype), torch_dtype(plan.config.out_dtype)
    dtypes = [plan.readers[m].get_dtype(_stored_name(plan.readers[m], n, plan.arch)) for m, n in job.inputs]
    model, name = job.inputs[0]
    shape = plan.readers[model].get_shape(_stored_name(plan.readers[model], name, plan.arch))
    if _vocab_indexed(plan, job):
        shape = (plan.vocabulary.rows, *shape[1:])
    if all(d.is_floating_point for d in dtypes):
        dtypes = [dtype or d for d in dtypes]
        return job.out_name, shape, out_dtype or functools.reduce(torch.promote_types, dtypes)
    return job.out_name, shape, dtypes[0]


def iter_merged(plan: MergePlan, *, device: str = "cpu", seed: int | None = 0, workers: int | None = None,
                memory_budget: int | str = "512MB", manifest: list | None = None, chunk: bool = True,
                stream: bool = False) -> Iterator[tuple[TensorJob, torch.Tensor | RowParts]]:
    """Merged tensors in plan order, computed by a small thread pool (torch releases the GIL in its kernels).

    Reading, merging and writing overlap; at most ``workers + 1`` jobs are in flight and their estimated
    working memory (fp32 copies of every input and a few temporaries each, from ``manifest``'s shapes; computed
    when not given) stays under ``memory_budget`` (a job larger than the budget runs alone). With ``chunk``, a
    tensor whose working memory exceeds a quarter of the budget is merged in row chunks of that size where its
    method allows (bit-identical; see :func:`job_chunking`), so it costs its output plus one chunk; with
    ``stream`` as well, such a tensor comes as :class:`RowParts`, merged chunk by chunk while the caller
    iterates it (in the caller's thread), so it costs one chunk.
    """
    from dfsmerge.io import parse_size

    if workers is None:
        workers = 1 if device.startswith("cuda") else 2
    budget = parse_size(memory_budget)
    chunk_bytes = max(1, budget // 4) if chunk else None

    def lazy(job: TensorJob) -> RowParts | None:
        chunked = job_chunking(plan, job, chunk_bytes=chunk_bytes) if stream else None
        return None if chunked is None else RowParts(plan, job, *chunked, device=device)

    if workers <= 1:
        for job in plan.jobs:
            yield job, lazy(job) or execute_job(plan, job, device=device, seed=seed, chunk_bytes=chunk_bytes)
        return
    entries = manifest or output_manifest(plan)
    pending: deque[tuple[TensorJob, Future | RowParts, int]] = deque()
    in_flight = 0
    current: list[RowParts] = []  # the parts last handed out, stopped should the caller give up on them
    with ThreadPoolExecutor(workers, thread_name_prefix="dfsmerge-merge") as pool:
        try:
            for job, (_, shape, out_dtype) in zip(plan.jobs, entries, strict=True):
                cost, chunked = _schedule_cost(plan, job, shape, out_dtype, chunk_bytes=chunk_bytes, stream=stream)
                parts = None if chunked is None or not stream else RowParts(plan, job, *chunked, device=device)
                while pending and (len(pending) > workers or in_flight + cost > budget):
                    done_job, fut, c = pending.popleft()
                    in_flight -= c
                    result = fut if isinstance(fut, RowParts) else fut.result()
                    del fut  # drop the finished tensor before the next job starts
                    current[:] = [result] if isinstance(result, RowParts) else []
                    yield done_job, result
                    del result
                work = parts.start() if parts is not None else pool.submit(execute_job, plan, job, device=device,
                                                                           seed=seed, chunk_bytes=chunk_bytes)
                pending.append((job, work, cost))
                in_flight += cost
            while pending:
                done_job, fut, _ = pending.popleft()
                result = fut if isinstance(fut, RowParts) else fut.result()
                del fut
                current[:] = [result] if isinstance(result, RowParts) else []
                yield done_job, result
                del result
        finally:
            for parts in current:
                parts.stop()
            for _, fut, _ in pending:
                if isinstance(fut, Future):
                    fut.cancel()
                else:
                    fut.stop()


def _schedule_cost(plan: MergePlan, job: TensorJob, shape: tuple[int, ...], out_dtype: torch.dtype, *,
                   chunk_bytes: int | None, stream: bool) -> tuple[int, tuple[Any, int] | None]:
    """What :func:`iter_merged` books for ``job`` against its budget, and its row chunking (None: merged whole)."""
    cost = _working_bytes(math.prod(shape), len(job.inputs))
    if chunk_bytes is None or cost <= chunk_bytes:
        return cost, None
    chunked = job_chunking(plan, job, chunk_bytes=chunk_bytes)
    if chunked is None:
        return cost, None
    return (chunk_bytes if stream else math.prod(shape) * out_dtype.itemsize + chunk_bytes), chunked


# Measured peak over the cost model, per method: (a tensor merged whole, over ``_working_bytes``; a row chunk, over
# its rows' ``_working_bytes``), the largest of 2 to 5 bf16 inputs over two runs with a 20% margin (``python
# benchmarks/merge_memory.py``); tests/faults/test_memory_preflight.py holds every method to its estimate.
_PEAK_FACTOR: dict[str, tuple[float, float]] = {
    "arcee_fusion": (1.0, 1.8), "breadcrumbs": (1.5, 1.0), "breadcrumbs_ties": (1.5, 1.0), "dare_linear": (1.05, 1.0),
    "dare_ties": (1.05, 1.0), "della": (1.65, 1.0), "della_linear": (1.65, 1.0), "karcher": (1.0, 3.6),
    "linear": (1.0, 1.2), "model_stock": (1.1, 1.0), "multislerp": (1.0, 2.95), "nearswap": (1.0, 2.25),
    "nuslerp": (1.0, 2.9), "ram": (2.2, 3.7), "ramplus_tl": (2.25, 4.5), "sce": (1.45, 3.1), "slerp": (1.0, 2.25),
    "task_arithmetic": (1.0, 1.6), "ties": (1.3, 1.9),
}


def job_memory(plan: MergePlan, job: TensorJob, *, chunk_bytes: int | None, stream: bool = True,
               manifest_entry: tuple[str, tuple[int, ...], torch.dtype] | None = None) -> tuple[int, str]:
    """Estimated peak bytes the executor holds while merging ``job`` (inputs read, float32 copies, the method's
    temporaries, the result) and how it is merged (``"whole"`` or ``"in row chunks"``), from the headers alone.

    A chunked job holds one chunk's working memory, the chunker's statistics and the merged parts queued for the
    writer; a chunker that may find the tensor needs merging whole (ties at a rank window or a top-k threshold)
    is counted at the larger of the two.
    """
    from dfsmerge.merge.chunked import _BAND_LIMIT

    _, shape, out_dtype = manifest_entry or output_manifest_entry(plan, job)
    n, numel = len(job.inputs), math.prod(shape)
    f_whole, f_chunk = _PEAK_FACTOR.get(plan.config.merge_method, (1.0, 1.0))
    whole = math.ceil(_working_bytes(numel, n) * f_whole)
    if _vocab_indexed(plan, job):  # the rows cast and re-indexed before the merge: two more copies of each input
        whole += 2 * n * numel * 4
    chunked = job_chunking(plan, job, chunk_bytes=chunk_bytes)
    if chunked is None:
        return whole, "whole"
    chunker, rows = chunked
    reader, name = plan.readers[job.inputs[0][0]], job.inputs[0][1]
    in_shape = reader.get_shape(_stored_name(reader, name, plan.arch))
    n_rows, row = in_shape[0], math.prod(in_shape[1:])
    stats = 0
    if chunker.passes:  # selections' samples and bands, radix histograms, per-row statistics
        stats = n * (min(math.prod(in_shape), _BAND_LIMIT) * 4 + 2**20) + n_rows * n * n * 8
    work = math.ceil(rows * _working_bytes(row, n) * f_chunk)
    held = rows * row * out_dtype.itemsize * (_AHEAD + 2) if stream else numel * out_dtype.itemsize
    chunk = work + stats + held
    if getattr(chunker, "may_need_whole", False):
        chunk = max(chunk, whole + stats)
    return chunk, "in row chunks"


def merge_memory(plan: MergePlan, *, device: str = "cpu", workers: int | None = None,
                 memory_budget: int | str = "512MB", manifest: list | None = None):
    """Peak memory :func:`run_merge` will hold for ``plan``, estimated from the headers alone (no tensor is read).

    :func:`iter_merged`'s schedule is replayed with its own budget bookkeeping; at each point the jobs in flight
    hold :func:`job_memory` each (of the jobs on the thread pool, only ``workers`` run at once: the others hold
    their result at most). The estimate is the largest such sum plus the free memory the C allocator keeps for
    reuse: glibc keeps up to its trim threshold (at most 64 MiB) at the top of each thread's heap, and an
    arena can keep no more than it held, so each merging thread counts ``min(64 MiB, largest job)``. (Measured
    over three 27M-parameter bf16 models: ties peaks at 385 MiB with glibc's defaults, 175 MiB with every
    allocation of 1 MiB or more mapped and unmapped, ``MALLOC_MMAP_THRESHOLD_=1048576``, which merges 20%
    slower.) The interpreter and its libraries are not counted.

    Returns:
        :class:`dfsmerge.io.memory.MemoryEstimate` whose parts are the tensors in flight at the peak and the
        allocator's allowance.
    """
    from dfsmerge.io import parse_size
    from dfsmerge.io.memory import MemoryEstimate

    if workers is None:
        workers = 1 if device.startswith("cuda") else 2
    budget = parse_size(memory_budget)
    chunk_bytes = max(1, budget // 4)
    entries = manifest or output_manifest(plan)
    # (job, booked cost, resident bytes, bytes once finished, how, computed outside the pool)
    pending: deque[tuple[TensorJob, int, int, int, str, bool]] = deque()
    in_flight, peak = 0, MemoryEstimate(parts={})
    threads, largest = 1, 0  # merging threads (the caller's, the pool's, streamed tensors'), the largest job

    def held() -> MemoryEstimate:
        """What the jobs in flight hold at most: all of it for row-chunked ones (their own thread), all of it for
        the ``workers`` pool jobs holding most and the result for the others (queued or finished)."""
        pool = sorted((e for e in pending if not e[5]), key=lambda e: e[3] - e[2])
        running = {id(e) for e in pool[:max(1, workers)]}
        return MemoryEstimate(parts={f"{job.out_name} {how}": resident if own or id(e) in running else done
                                     for e in pending for job, _, resident, done, how, own in [e]})

    for job, entry in zip(plan.jobs, entries, strict=True):
        _, shape, out_dtype = entry
        cost, chunked = _schedule_cost(plan, job, shape, out_dtype, chunk_bytes=chunk_bytes, stream=True)
        resident, how = job_memory(plan, job, chunk_bytes=chunk_bytes, manifest_entry=entry)
        own = chunked is not None  # RowParts compute in their own thread (workers > 1) or in the caller's
        done = resident if own else math.prod(shape) * out_dtype.itemsize
        if workers <= 1:  # one job at a time, written before the next starts
            pending.clear()
        while pending and (len(pending) > workers or in_flight + cost > budget):
            in_flight -= pending.popleft()[1]
        pending.append((job, cost, resident, done, how, own))
        in_flight += cost
        largest = max(largest, resident)
        if workers > 1:
            threads = max(threads, 1 + workers + sum(e[5] for e in pending))
        if (now := held()).total > peak.total:
            peak = now
    if largest:
        peak.parts[f"allocator's free memory ({threads} threads)"] = threads * min(_ARENA_KEEP, largest)
    return peak


def check_merge_memory(plan: MergePlan, *, device: str = "cpu", workers: int | None = None,
                       memory_budget: int | str = "512MB", manifest: list | None = None,
                       max_memory: int | None = None) -> None:
    """Refuse ``plan`` when :func:`merge_memory` exceeds ``max_memory`` (default: the machine's memory).

    Raises:
        ConfigError: one line naming the estimate, the tensors in flight at its peak, the limit and the fix.
    """
    from dfsmerge.io.diskspace import human_bytes
    from dfsmerge.io.memory import check_memory, memory_limit

    est = merge_memory(plan, device=device, workers=workers, memory_budget=memory_budget, manifest=manifest)
    limit, _ = memory_limit(max_memory, device)
    if est.total <= limit:
        return
    ways = []
    if workers != 1 and not device.startswith("cuda"):
        alone = merge_memory(plan, device=device, workers=1, memory_budget=memory_budget, manifest=manifest)
        if alone.total <= limit:
            ways.append(f"run with --workers 1 (estimated {human_bytes(alone.total)})")
    ways.append("merge fewer models or with a method that merges large tensors in row chunks (DARE/DELLA draws, "
                "model_stock and vocabulary-aligned embeddings are merged whole)")
    ways.append("raise --max-memory" if max_memory is not None else "use a machine with more memory")
    check_memory(est, what=f"merge_method={plan.config.merge_method!r} over {len(plan.readers)} models",
                 budget=max_memory, device=device, fix=", ".join(ways[:-1]) + " or " + ways[-1])


def run_merge(config: MergeConfig, out_dir: str | Path, *, device: str = "cpu", seed: int | None = 0,
              allow_pickle: bool = False, force: bool = False, max_shard_size: int | str = "5GB",
              progress: bool = True, workers: int | None = None, memory_budget: int | str = "512MB",
              max_memory: int | None = None) -> Path:
    """Run a recipe and write the merged checkpoint atomically to ``out_dir``.

    Args:
        config: the parsed recipe.
        out_dir: target directory (must not exist unless ``force``).
        device: where tensors are merged (``cuda`` uses the fused kernels where available).
        seed: seed of the random methods (DARE, DELLA); the same seed gives the same model.
        workers: tensors merged concurrently (default: 2 on CPU, 1 on CUDA); results are identical for any value.
        memory_budget: bound on the estimated working memory of the tensors in flight (a larger tensor runs
            alone), so concurrency never multiplies the peak of the biggest tensor.
        max_memory: bytes the merge may hold (``--max-memory``; default the machine's memory, the GPU's on
            CUDA): a recipe whose estimated peak (:func:`merge_memory`, from the headers) is larger is refused
            before any tensor is read or anything is written.
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
    check_merge_memory(plan, device=device, workers=workers, memory_budget=memory_budget, manifest=manifest,
                       max_memory=max_memory)
    results = iter_merged(plan, device=device, seed=seed, workers=workers, memory_budget=memory_budget,
                          manifest=manifest, stream=True)
    with ShardedWriter(out_dir, max_shard_size=max_shard_size, force=force, manifest=manifest) as w:
        for job, tensor in tqdm(results, total=len(plan.jobs), desc="merging", unit="tensor", disable=not progress):
            if isinstance(tensor, RowParts):  # a large tensor: merged and written chunk by chunk
                for start, rows in tensor:
                    w.add_tensor_rows(job.out_name, start, rows)
                    del rows
            else:
                w.add_tensor(job.out_name, tensor)
            del tensor  # written: free it before the next tensor is merged
        w.write_json("config.json", plan.out_config)
        if plan.vocabulary is not None:
            save_tokenizer(plan.vocabulary.tokenizer, w)
        else:
            copy_tokenizer(readers[donor].path, w)
        gen = readers[donor].path / "generation_config.json"
        if gen.is_file():
            w.copy_file(gen)
        w.write_text("mergekit.yaml", config.to_yaml())
        w.write_text("README.md", model_card(config, seed=seed))
    return out_dir


def _tokenizer_donor(config: MergeConfig) -> str:
    """The model whose tokenizer files (without tokenizer handling) and generation config are copied."""
    return config.base_model or config.referenced_models()[0]


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
