"""From a :class:`SearchConfig` to the :class:`~dfsmerge.genome.GenomeSpace` it searches: model references resolved
(``zoo:`` models built when missing), layer counts read from each ``config.json`` (no weights are loaded)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from dfsmerge.arch import get_architecture
from dfsmerge.errors import ConfigError
from dfsmerge.genome import MERGED, MODE_TABLE, PS_MODEL_IN_PLAN, GenomeSpace, PSGenome
from dfsmerge.genome.dfs import DFSGenome
from dfsmerge.io import open_checkpoint, resolve_model_path
from dfsmerge.runtime.pool import check_compatible
from dfsmerge.search.config import SearchConfig
from dfsmerge.zoo import default_zoo_dir, load_zoo, resolve_zoo_model


@dataclass(frozen=True)
class ResolvedModels:
    """Model name -> checkpoint path or hub id, for the PS genome, the DFS pool and the whole layer pool."""

    ps: dict[str, str]  # gene models (in order)
    ps_extra: dict[str, str]  # base model without genes
    base: str | None  # name of the PS base model
    dfs: dict[str, str]  # DFS pool models other than the PS-merged one (in pool order)
    task_paths: tuple[str, ...]  # config task paths + the zoo's task dir

    @property
    def pool(self) -> dict[str, str]:
        """Every model the layer pool loads (PS sources then DFS models), first one = model A of a DFS-only run."""
        out = dict(self.dfs) if not self.ps else {}
        for d in (self.ps, self.ps_extra, self.dfs):
            for k, v in d.items():
                if k in out and out[k] != v:
                    raise ConfigError(f"model name {k!r} refers to both {out[k]!r} and {v!r}; rename one of them")
                out.setdefault(k, v)
        return out


def resolve_ref(ref: str, config: SearchConfig) -> str:
    """A path or hub id for a model reference (``zoo:<name>`` resolved, building the zoo when missing)."""
    if ref.startswith("zoo:"):
        return str(resolve_zoo_model(ref, config.zoo_dir, size=config.zoo_size, seed=0, progress=False))
    p = Path(ref).expanduser()
    return str(p.resolve()) if p.exists() else ref  # a local directory (absolute), else a hub id


def resolve_models(config: SearchConfig) -> ResolvedModels:
    """Resolve every model reference of ``config``.

    Raises:
        ConfigError: a ``zoo:`` reference names no zoo model, or names collide.
    """
    g = config.genome
    task_paths = list(config.task_paths)
    zoo_used = False

    def res(ref: str) -> str:
        nonlocal zoo_used
        zoo_used |= ref.startswith("zoo:")
        return resolve_ref(ref, config)

    ps: dict[str, str] = {}
    extra: dict[str, str] = {}
    base = None
    dfs: dict[str, str] = {}
    spec = MODE_TABLE[g.mode]
    if spec.ps:
        ps = {m.name: res(m.model) for m in g.models}
        b = g.base_entry()
        if b is not None:
            base = b.name
            if b.name not in ps:
                extra[b.name] = res(b.model)
    if spec.dfs:
        entries = g.dfs.models if g.dfs.models is not None else g.models  # joint/staged: merged + sources
        dfs = {m.name: res(m.model) for m in entries}
        if not spec.ps and not dfs:
            raise ConfigError("genome.mode='dfs' needs models (genome.models or genome.dfs.models)")
    if zoo_used:
        root = Path(config.zoo_dir).expanduser() if config.zoo_dir else default_zoo_dir(config.zoo_size, 0)
        td = str(load_zoo(root).task_dir)
        if td not in task_paths:
            task_paths.append(td)
    return ResolvedModels(ps=ps, ps_extra=extra, base=base, dfs=dfs, task_paths=tuple(task_paths))


def num_layers_of(paths: Mapping[str, str]) -> dict[str, int]:
    """Decoder layer count of each model, from its config (no tensors are read)."""
    out = {}
    for name, p in paths.items():
        cfg = open_checkpoint(p, name=name).config
        n = cfg.get("num_hidden_layers")
        if not isinstance(n, int):
            raise ConfigError(f"model {name!r} ({p}): config.json has no num_hidden_layers; is it a causal LM?")
        out[name] = n
    return out


def check_models(models: ResolvedModels) -> None:
    """What the models' config files can tell, checked before any weight is read or a run directory exists: every
    model's architecture is supported, and the DFS pool's models can share one layer path.

    Raises:
        ArchitectureError: one line naming the model, what is wrong and what is supported.
    """
    from transformers import AutoConfig  # transformers loads only when a search checks its models

    for name, p in {**models.ps, **models.ps_extra, **models.dfs}.items():
        if p != PS_MODEL_IN_PLAN:
            get_architecture(open_checkpoint(p, name=name).config, source=f"model {name!r} ({p})")
    pool = [(name, p) for name, p in models.dfs.items() if p != PS_MODEL_IN_PLAN]
    if models.ps:  # joint / staged: the merged model is built from the PS models, so one stands for it
        pool.insert(0, next(iter(models.ps.items())))
    configs = [SimpleNamespace(name=n, config=AutoConfig.from_pretrained(str(resolve_model_path(p))))
               for n, p in pool]
    for other in configs[1:]:
        check_compatible(configs[0], other)


def build_space(config: SearchConfig, models: ResolvedModels | None = None):
    """The genome space of ``config`` (stage 1 in staged mode).

    Returns:
        ``(space, models)``: the :class:`~dfsmerge.genome.GenomeSpace` and the :class:`ResolvedModels`.

    Raises:
        ConfigError: a genome option that does not fit the models (layer granularity, path lengths, ...).
    """
    g = config.genome
    spec = MODE_TABLE[g.mode]
    models = models or resolve_models(config)
    layers = num_layers_of({**models.ps, **models.ps_extra, **models.dfs})
    ps = None
    if models.ps:
        counts = {layers[k] for k in (*models.ps, *models.ps_extra)}
        if len(counts) != 1:
            raise ConfigError(f"PS models have different layer counts {dict((k, layers[k]) for k in models.ps)}; "
                              "parameter-space merging needs one architecture (use mode: dfs for mixed depths)")
        ps = PSGenome(models=models.ps, merge_method=g.merge_method, num_layers=counts.pop(),
                      base_model=models.base, extra_models=models.ps_extra, layer_granularity=g.layer_granularity,
                      filters=g.filters, normalize=g.normalize, allow_negative_weights=g.allow_negative_weights,
                      smooth=g.smooth, dtype=config.dtype, initial_weight=g.initial_weight)
    dfs = None
    if spec.dfs:
        d = g.dfs
        if not spec.merged_is_model_a:
            pool_layers = {k: layers[k] for k in models.dfs}
            paths = dict(models.dfs)
        else:
            pool_layers = {MERGED: ps.num_layers, **{k: layers[k] for k in models.dfs}}
            paths = {MERGED: PS_MODEL_IN_PLAN, **models.dfs}
        dfs = DFSGenome(layers=pool_layers, models=paths, repetitions=d.repetitions, scales=d.scales,
                        scale_bound=d.scale_bound, scale_step=d.scale_step, min_length=d.min_length,
                        max_length=d.max_length,
                        max_repeats=d.max_repeats, force_first=d.force_first, force_last=d.force_last,
                        repair=d.repair, init_on=d.init_on, init_off=d.init_off, embed_choices=d.embed_choices)
    return GenomeSpace(mode=g.mode, ps=ps, dfs=dfs), models


def binary_mask(space) -> list[bool]:
    """Which genes are DFS indicator genes (on/off), for the optimizers' mixed binary handling."""
    ps, dfs = space._parts
    n_ps = ps.dim if ps else 0
    mask = [False] * space.dim
    if dfs is not None:
        for t in range(dfs.num_slots):
            mask[n_ps + t] = True
    return mask
