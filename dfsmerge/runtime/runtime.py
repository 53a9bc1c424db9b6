"""Runtime: turns a :class:`~dfsmerge.genome.Candidate` into a callable model over resident weights.

PS part: re-merged into the resident :class:`PSBuffers` in place (skipped when the recipe did not change).
DFS part: one :class:`StitchedModel` whose step list is swapped per candidate; no weight is copied.
In joint/staged mode the PS-merged model is in the pool as model A (:data:`dfsmerge.genome.MERGED`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from dfsmerge.errors import DfsmergeError
from dfsmerge.genome.dfs import Infeasible
from dfsmerge.runtime.prefix import DEFAULT_MEMORY_MB, PrefixStats, PrefixStore
from dfsmerge.runtime.ps_buffers import PSBuffers
from dfsmerge.runtime.stitched import StitchedModel

if TYPE_CHECKING:
    from dfsmerge.genome import Candidate
    from dfsmerge.runtime.pool import LayerPool


class InfeasibleCandidateError(DfsmergeError):
    """The candidate's path is infeasible; score it as the worst fitness instead of running it."""


class Runtime:
    """Prepares candidates over one pool.

    Args:
        pool: the resident layer pool (with the PS source models when PS is searched).
        ps_template: the model whose architecture the merged copy takes (enables PS; usually the base model).
        merged_as_base: add the merged model to the pool as model A (joint/staged modes).
        seed: seed of random merge methods.
        prefix_cache_mb: the prefix store's budget (None or 0: no prefix reuse).
        keep_merged_mb: merged weights kept for recipes applied again (:class:`PSBuffers`' ``keep_mb``).
    """

    def __init__(self, pool: LayerPool, *, ps_template: str | None = None, merged_as_base: bool = False,
                 seed: int = 0, prefix_cache_mb: float | None = DEFAULT_MEMORY_MB, keep_merged_mb: float = 0):
        from dfsmerge.genome import MERGED

        self.pool = pool
        self.buffers: PSBuffers | None = None
        self.prefix_store = PrefixStore(prefix_cache_mb) if prefix_cache_mb else None
        self.stats = PrefixStats()  # forward work of the PS-only model (the stitched model counts its own)
        if ps_template is not None:
            self.buffers = PSBuffers({m.name: m.model for m in pool}, ps_template, seed=seed,
                                     keep_mb=keep_merged_mb)
            if self.prefix_store is not None:
                self.prefix_store.mark_volatile([self.buffers.model])
            self.buffers.model.register_forward_pre_hook(self._count_tokens, with_kwargs=True)
            if merged_as_base:
                pool.add_model(MERGED, self.buffers.model, source="ps-recipe", as_base=True)
        self._stitched: StitchedModel | None = None

    def _count_tokens(self, module, args, kwargs) -> None:
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None:
            ids = kwargs.get("inputs_embeds")
            n = 0 if ids is None else ids.shape[0] * ids.shape[1]
        else:
            n = ids.numel()
        self.stats.calls += 1
        self.stats.tokens += n
        self.stats.forward_tokens += n

    def work(self) -> PrefixStats:
        """Forward work so far, PS-only model and stitched model together (a new object: compare with
        :meth:`PrefixStats.since`)."""
        return self.stats + (PrefixStats() if self._stitched is None else self._stitched.prefix_stats)

    def prepare(self, candidate: Candidate) -> nn.Module:
        """The model of ``candidate``: the stitched model (DFS part) or the merged model (PS only).

        Raises:
            InfeasibleCandidateError: the path is :class:`Infeasible`.
            ConfigError: a PS part without ``ps_template``, or a path outside the pool.
        """
        from dfsmerge.errors import ConfigError

        if isinstance(candidate.path, Infeasible):
            raise InfeasibleCandidateError(f"infeasible candidate: {candidate.path.reason}")
        if candidate.ps is not None:
            if self.buffers is None:
                raise ConfigError("candidate has a PS recipe but the runtime has no PS buffers; pass ps_template")
            if candidate.ps != self.buffers.recipe:
                if self.prefix_store is not None:
                    self.prefix_store.bump()  # before the weights change: no stored state may outlive them
                self.buffers.apply(candidate.ps)
        if candidate.path is None:
            if self.buffers is None:
                raise ConfigError("candidate has neither a PS recipe nor a path")
            return self.buffers.model
        plan = candidate.path
        if self._stitched is None:
            self._stitched = StitchedModel.from_pool(self.pool, plan)
            self._stitched.prefix_store = self.prefix_store
        else:
            self._stitched.set_plan(self.pool, self.pool.validate_plan(plan))
        return self._stitched
