"""The search space of one run: :class:`GenomeSpace` joins the PS genome (:mod:`dfsmerge.genome.ps`) and the DFS
genome (:mod:`dfsmerge.genome.dfs`, Sakana AI, arXiv 2403.13187, sec. 3.2) into one vector
``x = [PS genes | I | W genes | embedding genes]`` that decodes to a :class:`Candidate`.

Modes: ``ps`` (PS only), ``dfs`` (DFS only), ``joint`` (one vector, both parts; the PS-merged model is model A of
the DFS pool) and ``staged`` (stage 1 searches PS; stage 2 searches DFS with the stage-1 recipe fixed as model A,
as the paper).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import numpy as np

from dfsmerge.errors import ConfigError
from dfsmerge.genome.dfs import DFSGenome, Infeasible
from dfsmerge.genome.plan import PathPlan
from dfsmerge.genome.ps import PSGenome, PSRecipe

Mode = Literal["ps", "dfs", "staged", "joint"]
MERGED = "merged"
"""Pool name of the PS-merged model when it is model A of the DFS pool (joint/staged modes)."""
PS_MODEL_IN_PLAN = "@ps"
"""Value of the PS-merged model in a plan's ``models`` (joint/staged): the recipe in ``candidate.ps`` makes it."""


@dataclass(frozen=True, slots=True)
class ModeSpec:
    """What a search mode searches.

    Attributes:
        ps: the genome holds PS genes (in some stage). dfs: it holds DFS genes (in some stage).
        stages: 1, or 2 for staged mode (stage 1 PS, stage 2 DFS).
        merged_is_model_a: the PS-merged model (:data:`MERGED`) is model A of the DFS pool.
    """

    ps: bool
    dfs: bool
    stages: int
    merged_is_model_a: bool

    def parts(self, stage: int = 1) -> tuple[bool, bool]:
        """(PS genes, DFS genes) in the genome vector of ``stage``."""
        if self.stages == 2:
            return stage == 1, stage == 2
        return self.ps, self.dfs


MODE_TABLE: dict[str, ModeSpec] = {
    "ps": ModeSpec(ps=True, dfs=False, stages=1, merged_is_model_a=False),
    "dfs": ModeSpec(ps=False, dfs=True, stages=1, merged_is_model_a=False),
    "joint": ModeSpec(ps=True, dfs=True, stages=1, merged_is_model_a=True),
    "staged": ModeSpec(ps=True, dfs=True, stages=2, merged_is_model_a=True),
}
MODES: tuple[str, ...] = get_args(Mode)


# ====================================================================== Candidate
@dataclass(frozen=True)
class Candidate:
    """A decoded genome: the PS recipe (or None) and the layer path (or None, or :class:`Infeasible`)."""

    ps: PSRecipe | None = None
    path: PathPlan | Infeasible | None = None

    @property
    def feasible(self) -> bool:
        return not isinstance(self.path, Infeasible)

    def to_dict(self) -> dict[str, Any]:
        """``{"ps": mergekit recipe or None, "path": plan dict or None}`` (plus ``"infeasible": reason``), as
        ``evals.jsonl`` stores a candidate."""
        out: dict[str, Any] = {"ps": self.ps.to_mergekit() if self.ps is not None else None, "path": None}
        if isinstance(self.path, Infeasible):
            out["infeasible"] = self.path.reason
        elif self.path is not None:
            out["path"] = self.path.to_dict()
        return out

    def key(self, genome: Sequence[float] | np.ndarray | None = None) -> str:
        """The candidate key: a stable hash of :meth:`to_dict` (same recipe and path -> same key, across processes
        and sessions; ``evals.jsonl`` stores it). Pass ``genome`` when an objective reads the genome vector itself
        (synthetic objectives), so that genomes decoding alike are still told apart."""
        return stable_key(self.to_dict(), None if genome is None else np.asarray(genome, dtype=np.float64).tobytes())


def stable_key(obj: Any, extra: bytes | None = None) -> str:
    """32 hex digits of the SHA-256 of ``obj``'s canonical JSON (sorted keys, full float precision) and ``extra``."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob + (extra or b"")).hexdigest()[:32]


# ====================================================================== GenomeSpace
@dataclass(frozen=True)
class GenomeSpace:
    """The search space of one run: PS genes, DFS genes or both.

    Args:
        mode: ``ps``, ``dfs``, ``joint`` or ``staged``.
        ps: the PS genome (modes ps, joint, staged).
        dfs: the DFS genome (modes dfs, joint, staged); in joint/staged mode its first pool model must be
            :data:`MERGED` (the PS-merged model is model A).
        stage: staged mode only: 1 searches the PS part, 2 the DFS part with ``fixed_ps`` as model A.
        fixed_ps: the stage-1 result used in stage 2.
    """

    mode: Mode
    ps: PSGenome | None = None
    dfs: DFSGenome | None = None
    stage: int = 1
    fixed_ps: PSRecipe | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODE_TABLE:
            raise ConfigError(f"mode={self.mode!r} is not known; use one of {', '.join(MODES)}")
        spec = self.spec
        if spec.ps and self.ps is None:
            raise ConfigError(f"mode={self.mode!r} needs a PS genome (genome.ps)")
        if spec.dfs and self.dfs is None:
            raise ConfigError(f"mode={self.mode!r} needs a DFS genome (genome.dfs)")
        if spec.merged_is_model_a and self.dfs.model_a != MERGED:
            raise ConfigError(f"mode={self.mode!r}: the DFS pool's model A must be the PS-merged model named "
                              f"{MERGED!r}; got {self.dfs.model_a!r}")
        if spec.stages == 2:
            if self.stage not in (1, 2):
                raise ConfigError(f"stage={self.stage} must be 1 (PS) or 2 (DFS)")
            if self.stage == 2 and self.fixed_ps is None:
                raise ConfigError("staged mode, stage 2 needs fixed_ps (the best recipe of stage 1)")

    def with_stage(self, stage: int, fixed_ps: PSRecipe | None = None) -> GenomeSpace:
        """The staged space at ``stage`` (2 needs the stage-1 best recipe)."""
        return replace(self, stage=stage, fixed_ps=fixed_ps)

    @property
    def parts(self) -> tuple[PSGenome | None, DFSGenome | None]:
        """The (PS, DFS) genomes this space's vector holds, in vector order (None where absent)."""
        return self._parts

    @property
    def spec(self) -> ModeSpec:
        """This space's row of :data:`MODE_TABLE`."""
        return MODE_TABLE[self.mode]

    @property
    def _parts(self) -> tuple[PSGenome | None, DFSGenome | None]:
        has_ps, has_dfs = self.spec.parts(self.stage)
        return (self.ps if has_ps else None), (self.dfs if has_dfs else None)

    @property
    def dim(self) -> int:
        ps, dfs = self._parts
        return (ps.dim if ps else 0) + (dfs.dim if dfs else 0)

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        ps, dfs = self._parts
        los, his = [], []
        for part in (ps, dfs):
            if part is not None:
                lo, hi = part.bounds
                los.append(lo)
                his.append(hi)
        return np.concatenate(los), np.concatenate(his)

    def initial(self) -> np.ndarray:
        ps, dfs = self._parts
        return np.concatenate([p.initial() for p in (ps, dfs) if p is not None])

    def initial_stds(self, sigma0: float) -> np.ndarray:
        """Per-gene start step sizes: ``sigma0 * range`` for PS genes, the DFS genome's own
        (:meth:`DFSGenome.initial_stds`) for its genes."""
        ps, dfs = self._parts
        parts = []
        if ps is not None:
            lo, hi = ps.bounds
            parts.append(sigma0 * (hi - lo))
        if dfs is not None:
            parts.append(dfs.initial_stds(sigma0))
        return np.concatenate(parts)

    def decode(self, x: Sequence[float] | np.ndarray) -> Candidate:
        """Genome vector -> :class:`Candidate` (an infeasible path is returned as :class:`Infeasible`).

        Raises:
            ConfigError: wrong vector length.
        """
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.shape[0] != self.dim:
            raise ConfigError(f"genome vector has length {x.shape[0]}; this {self.mode} space needs dim={self.dim}")
        ps, dfs = self._parts
        n = ps.dim if ps else 0
        recipe = ps.decode(x[:n]) if ps else self.fixed_ps
        path = dfs.decode(x[n:]) if dfs else None
        return Candidate(recipe, path)

    def encode(self, candidate: Candidate) -> np.ndarray:
        """Candidate -> genome vector with ``decode(encode(c)) == c``.

        Raises:
            ConfigError: the candidate does not belong to this space (missing part, infeasible path, a path the
                DFS genome cannot express, or a PS recipe other than the fixed one in stage 2).
        """
        ps, dfs = self._parts
        parts = []
        if ps is not None:
            if candidate.ps is None:
                raise ConfigError(f"candidate has no PS recipe; the {self.mode} space needs one")
            parts.append(ps.encode(candidate.ps))
        elif self.fixed_ps is not None and candidate.ps != self.fixed_ps:
            raise ConfigError("candidate's PS recipe differs from the stage-1 recipe fixed in this space")
        if dfs is not None:
            if candidate.path is None or isinstance(candidate.path, Infeasible):
                raise ConfigError(f"candidate has no feasible path ({candidate.path}); cannot encode it")
            parts.append(dfs.encode(candidate.path))
        return np.concatenate(parts) if parts else np.zeros(0)
