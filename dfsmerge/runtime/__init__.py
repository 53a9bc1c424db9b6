"""Runtime: the resident layer pool, stitched layer paths with per-hop KV caches, in-place PS buffers, and the
candidate runtime (the lm-eval adapter over it lives in :mod:`dfsmerge.objectives.lm_adapter`)."""

from dfsmerge.runtime.ps_buffers import PSBuffers
from dfsmerge.runtime.runtime import InfeasibleCandidateError, Runtime
from dfsmerge.runtime.stitched import Hop, StitchedModel, StitchedOutput, hops_from_plan

__all__ = ["Hop", "InfeasibleCandidateError", "PSBuffers", "Runtime", "StitchedModel", "StitchedOutput",
           "hops_from_plan"]
