"""Optimizer protocol: ask/tell over an explicit, serialisable state.

Modelled on evosax's ``algorithms/base.py`` (Lange, "evosax: JAX-based Evolution Strategies", 2022): the public
``ask``/``tell`` validate and do the common work (non-finite fitness is worst, best-so-far, generation and
evaluation counters, the pending population), subclasses fill the private hooks ``_ask``/``_tell`` and
``_state_dict``/``_load_state_dict``.

Contract every optimizer keeps (checked by ``tests/optim/test_optim_contract.py``):

- ``ask() -> X`` of shape ``(n, dim)`` (n <= popsize), inside the bounds, integer genes integral, binary genes in
  ``{lo_j, hi_j}``. ``ask`` is idempotent until ``tell``: asking again returns the same pending population.
- ``tell(X, F)`` with the ``X`` that ``ask`` returned and ``F`` of shape ``(n, n_obj)``, values to MINIMISE.
  NaN, +inf and -inf mark a failed candidate and become ``penalty`` (a large finite value every backend accepts).
- ``state_dict()`` is JSON-serialisable except for ``bytes`` values (pickles of the backend); see
  ``dumps_state``/``loads_state`` for a JSON file format. ``make(...).load_state_dict(opt.state_dict())``
  continues exactly as ``opt`` would, also when saved between ``ask`` and ``tell``: the state then holds the
  backend as it was before that ``ask`` and the pending population, and loading replays the ``ask`` (checking
  that it reproduces the stored population), so the resumed optimizer hands out the same pending ``X``.
  Why replay rather than pickle the backend after ``ask``: pycma finds told solutions by ``hash(x.tobytes())``,
  which Python salts per process, so a strategy pickled mid-generation diverges when told in a new process.
  Cost: one backend snapshot per ``ask`` (for CMA-ES in 1000-D about 17 MB, a few ms per candidate).
"""

from __future__ import annotations

import abc
import base64
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from dfsmerge.errors import CheckpointError, ConfigError

STATE_FORMAT = 1
DEFAULT_PENALTY = 1e30


class OptimizerOptions(BaseModel):
    """Options every optimizer accepts; subclasses add their own fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    penalty: float = DEFAULT_PENALTY
    """Fitness given to failed candidates (NaN or infinite objective); must be finite and positive."""

    def preflight(self) -> None:
        """Check outside resources the optimizer needs (an LLM endpoint, an API key) before a run starts; for the
        search to call before it creates the run directory. Default: nothing to check.

        Raises:
            ConfigError: one line naming the option, the value and the fix.
        """


@dataclass(frozen=True, slots=True, eq=False)
class SearchSpace:
    """What the optimizer searches: the box, the start point and the kinds of genes.

    Attributes:
        dim: number of genes.
        lo, hi: bounds, (dim,) float64, finite, lo < hi.
        x0: start point, (dim,) float64 inside the bounds, or None (random/NSGA-II sample the box; CMA-ES
            starts at the centre).
        seed: seed of every random stream of the optimizer.
        popsize: candidates per generation.
        n_obj: number of objectives (columns of F).
        integer_mask: (dim,) bool, genes that take integral values.
        binary_mask: (dim,) bool, genes that take only ``lo_j`` (off) or ``hi_j`` (on); a continuous value
            (x0, CMA-ES samples) counts as on iff it is above (lo_j + hi_j) / 2.
    """

    dim: int
    lo: np.ndarray
    hi: np.ndarray
    x0: np.ndarray | None
    seed: int
    popsize: int
    n_obj: int
    integer_mask: np.ndarray
    binary_mask: np.ndarray

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (floats round-trip exactly through ``json``)."""
        return {
            "dim": self.dim,
            "lo": self.lo.tolist(),
            "hi": self.hi.tolist(),
            "x0": None if self.x0 is None else self.x0.tolist(),
            "seed": self.seed,
            "popsize": self.popsize,
            "n_obj": self.n_obj,
            "integer_mask": self.integer_mask.tolist(),
            "binary_mask": self.binary_mask.tolist(),
        }

    def present(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        """Map backend samples to what the loop evaluates: clip to the box, round integer genes, snap binary
        genes to ``hi`` iff strictly above the midpoint of their bounds, else ``lo`` (for the DFS indicator's
        [-1, 1] bounds this is the genome's own rule "on iff I > 0"). (n, dim) -> (n, dim), a new array."""
        X = np.clip(X, self.lo, self.hi)  # (n, dim)
        if self.integer_mask.any():
            X[:, self.integer_mask] = np.clip(
                np.round(X[:, self.integer_mask]),
                np.ceil(self.lo[self.integer_mask]),
                np.floor(self.hi[self.integer_mask]),
            )
        if self.binary_mask.any():
            b = self.binary_mask
            mid = 0.5 * (self.lo[b] + self.hi[b])  # (n_bin,)
            X[:, b] = np.where(X[:, b] > mid, self.hi[b], self.lo[b])  # on iff above the midpoint
        return X


@dataclass(frozen=True, slots=True)
class Best:
    """Best candidate told so far (single objective).

    Attributes:
        x: (dim,) genome as returned by ``ask``.
        f: its objective value (to minimise).
        generation: generation in which it was told (0-based).
        index: its position among all told candidates (0-based, in ask order), i.e. the loop's eval id when
            the loop numbers candidates in ask order.
    """

    x: np.ndarray
    f: float
    generation: int
    index: int


OPTIMIZERS: dict[str, type[Optimizer]] = {}


def register_optimizer(name: str):
    """Class decorator adding an ``Optimizer`` subclass to the registry under ``name``."""

    def deco(cls: type[Optimizer]) -> type[Optimizer]:
        cls.name = name
        OPTIMIZERS[name] = cls
        return cls

    return deco


class Optimizer(abc.ABC):
    """Base class: public ask/tell/state handling; subclasses implement the private hooks.

    Subclasses set ``Options`` (a frozen pydantic model deriving from ``OptimizerOptions``) and
    ``multi_objective`` and implement ``_setup``, ``_ask``, ``_tell``, ``_state_dict`` and ``_load_state_dict``.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[OptimizerOptions]] = OptimizerOptions
    multi_objective: ClassVar[bool] = True

    def __init__(self, space: SearchSpace, options: OptimizerOptions):
        self.space = space
        self.options = options
        self.generation = 0
        self.n_evals = 0
        self._best: Best | None = None
        self._pending: np.ndarray | None = None  # (n, dim) backend samples awaiting tell
        self._pending_public: np.ndarray | None = None  # (n, dim) what ask() returned
        self._pre_ask_state: dict[str, Any] | None = None  # backend state before the pending ask
        self._setup()

    # ---- hooks -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _setup(self) -> None:
        """Build the backend from ``self.space`` and ``self.options``."""

    @abc.abstractmethod
    def _ask(self) -> np.ndarray:
        """Return the next population, (n, dim) float64; may advance the backend's RNG."""

    @abc.abstractmethod
    def _tell(self, X: np.ndarray, F: np.ndarray) -> None:  # noqa: N803
        """Update the backend with the pending X (n, dim), exactly as ``_ask`` returned it, and finite F (n, n_obj)."""

    @abc.abstractmethod
    def _state_dict(self) -> dict[str, Any]:
        """Backend state (JSON-serialisable except bytes), taken between generations."""

    @abc.abstractmethod
    def _load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore what ``_state_dict`` returned."""

    def _stop(self) -> str | None:
        """Return a reason to stop, or None."""
        return None

    def bind_run_dir(self, run_dir: str | Path) -> None:
        """Hook for the search loop: the run directory, once it exists and before ``load_state_dict``, for
        optimizers that keep their own durable log there (``llm`` writes ``llm.jsonl``). Default: nothing."""

    @classmethod
    def _validate_options(cls, options: OptimizerOptions) -> None:
        """Raise ConfigError for option combinations the pydantic model cannot express."""

    # ---- public API --------------------------------------------------------------------------------------
    @property
    def best(self) -> Best | None:
        """Best-so-far candidate for single-objective runs (None before the first successful tell, and for
        multi-objective runs: use ``dfsmerge.optim.pareto`` on the evaluated F instead)."""
        return self._best

    @property
    def elite_size(self) -> int | None:
        """How many of a generation's best candidates this optimizer's next step depends on (single objective), so
        racing may stop the others early; None: the non-dominated set (the default: multi-objective selection, or
        just the best). CMA-ES: its mu."""
        return None

    @property
    def pending(self) -> bool:
        """Whether a population was asked and not yet told."""
        return self._pending is not None

    def ask(self) -> np.ndarray:
        """Return the population to evaluate next.

        Returns:
            (n, dim) float64 array (a copy), inside the bounds. Asking again before ``tell`` returns the same
            population. ``n == popsize`` for ``cma`` and ``random``; ``nsga2`` (duplicate elimination) may
            return fewer rows when it cannot breed enough distinct genomes, and 0 rows only when it has nothing
            new at all (``stop()`` is then True; tell the empty arrays or end the run).
        """
        if self._pending is None:
            pre = self._state_dict()
            X = np.asarray(self._ask(), dtype=np.float64)
            self._check_population(X)
            self._pre_ask_state = pre
            self._pending = X
            self._pending_public = self.space.present(X)
        return self._pending_public.copy()

    def tell(self, X: np.ndarray, F: np.ndarray) -> None:  # noqa: N803
        """Report the objective values of the pending population.

        Args:
            X: (n, dim) the array ``ask`` returned (checked, element for element).
            F: (n, n_obj) values to minimise; (n,) is accepted when n_obj == 1. NaN and +-inf mark failed
                candidates and are replaced by ``options.penalty``.

        Raises:
            RuntimeError: no population is pending.
            ValueError: X is not the pending population, or F has the wrong shape.
        """
        if self._pending is None:
            raise RuntimeError(f"{self.name}.tell() called with no pending population; call ask() first")
        X = np.asarray(X, dtype=np.float64)
        if X.shape != self._pending_public.shape or not np.array_equal(X, self._pending_public):
            raise ValueError(
                f"{self.name}.tell(): X (shape {X.shape}) is not the population returned by ask() "
                f"(shape {self._pending_public.shape}); tell the exact array ask() returned"
            )
        n = X.shape[0]
        F = np.asarray(F, dtype=np.float64)
        if F.ndim == 1 and self.space.n_obj == 1:
            F = F[:, None]  # (n,) -> (n, 1)
        if F.shape != (n, self.space.n_obj):
            raise ValueError(
                f"{self.name}.tell(): F has shape {F.shape}, expected ({n}, {self.space.n_obj}) "
                "(one row per candidate, one column per objective)"
            )
        ok = np.isfinite(F).all(axis=1)  # (n,) candidates that did not fail
        Fc = np.where(np.isfinite(F), F, self.options.penalty)  # (n, n_obj)
        self._tell(self._pending, Fc)
        if self.space.n_obj == 1 and ok.any():
            i = int(np.flatnonzero(ok)[np.argmin(F[ok, 0])])
            if self._best is None or F[i, 0] < self._best.f:
                self._best = Best(
                    x=self._pending_public[i].copy(),
                    f=float(F[i, 0]),
                    generation=self.generation,
                    index=self.n_evals + i,
                )
        self.generation += 1
        self.n_evals += n
        self._pending = self._pending_public = self._pre_ask_state = None

    def stop(self) -> bool:
        """Whether the optimizer itself wants to stop (e.g. CMA-ES converged); see ``stop_reason``."""
        return self.stop_reason is not None

    @property
    def stop_reason(self) -> str | None:
        """Why the optimizer wants to stop, or None. The loop's own budget is not checked here."""
        return self._stop()

    def state_dict(self) -> dict[str, Any]:
        """Return the full optimizer state: JSON-serialisable except for ``bytes`` values.

        Saved between ``ask`` and ``tell``, it holds the backend as before that ``ask`` plus the pending
        population, which ``load_state_dict`` replays.
        """
        backend = self._pre_ask_state if self._pending is not None else self._state_dict()
        best = self._best
        return {
            "format": STATE_FORMAT,
            "optimizer": self.name,
            "space": self.space.to_json(),
            "options": self.options.model_dump(mode="json"),
            "generation": self.generation,
            "n_evals": self.n_evals,
            "best": None
            if best is None
            else {"x": best.x.tolist(), "f": best.f, "generation": best.generation, "index": best.index},
            "pending": None if self._pending_public is None else self._pending_public.tolist(),
            "backend": backend,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore a state from ``state_dict`` (possibly after a JSON or pickle round trip).

        Args:
            d: the dict ``state_dict`` returned.

        Raises:
            ConfigError: the state was saved by a different optimizer, search space or options.
            CheckpointError: the state is malformed or does not replay the pending population.
        """
        try:
            fmt, name = d["format"], d["optimizer"]
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"optimizer state lacks {e}; it is not a state_dict() of a dfsmerge optimizer") from e
        if fmt != STATE_FORMAT:
            raise CheckpointError(f"optimizer state format={fmt!r}, this version reads {STATE_FORMAT}; start a new run")
        if name != self.name:
            raise ConfigError(
                f"optimizer={self.name!r} but the saved state is from optimizer={name!r}; "
                f"resume with optimizer: {name} or start a new run"
            )
        mine = self.space.to_json()
        diff = [k for k in mine if mine[k] != d["space"].get(k)]
        mine_opts = self.options.model_dump(mode="json")
        diff += [f"options.{k}" for k in mine_opts if mine_opts[k] != d["options"].get(k)]
        if diff:
            raise ConfigError(
                f"optimizer state was saved with different {', '.join(diff)} than this run's configuration; "
                "resume with the configuration the run was started with, or start a new run"
            )
        self._load_state_dict(d["backend"])
        self.generation = int(d["generation"])
        self.n_evals = int(d["n_evals"])
        b = d["best"]
        self._best = (
            None
            if b is None
            else Best(
                x=np.asarray(b["x"], dtype=np.float64), f=float(b["f"]), generation=b["generation"], index=b["index"]
            )
        )
        self._pending = self._pending_public = self._pre_ask_state = None
        if d["pending"] is not None:
            want = np.asarray(d["pending"], dtype=np.float64)
            got = self.ask()  # replays the interrupted ask from the pre-ask backend state
            if got.shape != want.shape or not np.array_equal(got, want):
                raise CheckpointError(
                    f"optimizer state of {self.name!r} does not reproduce its pending population on load "
                    "(different cma/pymoo/numpy version?); resume with the versions the run started with"
                )

    # ---- helpers -----------------------------------------------------------------------------------------
    def _check_population(self, X: np.ndarray) -> None:  # noqa: N803
        if X.ndim != 2 or X.shape[1] != self.space.dim:
            raise RuntimeError(f"{self.name}._ask returned shape {X.shape}, expected (n, {self.space.dim})")
        if not np.isfinite(X).all():
            raise RuntimeError(f"{self.name}._ask returned non-finite genes")


def _mask(value: Any, dim: int, field: str) -> np.ndarray:
    if value is None:
        return np.zeros(dim, dtype=bool)
    m = np.asarray(value)
    if m.shape != (dim,) or m.dtype != bool:
        raise ConfigError(f"{field} has shape {m.shape} and dtype {m.dtype}; pass a boolean array of shape ({dim},)")
    return m.copy()


def default_popsize(dim: int) -> int:
    """CMA-ES's default population size 4 + floor(3 ln dim) (Hansen 2016, Table 1), used by every optimizer."""
    return 4 + int(3 * math.log(max(dim, 1)))


def validate_options(name: str, **options: Any) -> OptimizerOptions:
    """Check an optimizer name and its options without building it (the search config calls this before any
    model is loaded; ``make_optimizer`` calls it too).

    Args:
        name: registry name.
        **options: the optimizer's options.

    Returns:
        The validated, frozen options model.

    Raises:
        ConfigError: unknown name, unknown option or bad value; the message names them and the fix.
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer={name!r} is unknown; use one of {', '.join(sorted(OPTIMIZERS))}")
    cls = OPTIMIZERS[name]
    try:
        opts = cls.Options(**options)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(cls.Options.model_fields)
                owners = sorted(n for n, c in OPTIMIZERS.items() if field in c.Options.model_fields)
                fix = f"a setting of {', '.join(owners)}: remove it or use that optimizer" if owners else "remove it"
                msgs.append(f"option {field}={err.get('input')!r} is not a setting of {name!r} ({fix}); "
                            f"{name!r} takes: {allowed}")
            else:
                msgs.append(f"option {field}={err.get('input')!r}: {err['msg']}")
        raise ConfigError(f"optimizer={name!r}: " + "; ".join(msgs)) from e
    if not (math.isfinite(opts.penalty) and opts.penalty > 0):
        raise ConfigError(f"optimizer={name!r} option penalty={opts.penalty!r} must be finite and > 0 (e.g. 1e30)")
    cls._validate_options(opts)
    return opts


def make_optimizer(
    name: str,
    *,
    dim: int,
    bounds: tuple[Any, Any],
    x0: Any = None,
    seed: int = 0,
    popsize: int | None = None,
    n_obj: int = 1,
    integer_mask: Any = None,
    binary_mask: Any = None,
    **options: Any,
) -> Optimizer:
    """Build a registered optimizer.

    Args:
        name: registry name: ``cma``, ``nsga2`` or ``random`` (see ``OPTIMIZERS``).
        dim: number of genes (>= 1).
        bounds: ``(lo, hi)``, scalars or (dim,) arrays, finite with lo < hi.
        x0: start point (dim,) inside the bounds, or None.
        seed: seed (int >= 0) of every random stream.
        popsize: candidates per generation; None uses 4 + floor(3 ln dim) (at least 4).
        n_obj: number of objectives (>= 1); ``cma`` accepts only 1.
        integer_mask: optional (dim,) bool, genes with integral values.
        binary_mask: optional (dim,) bool, genes that are either lo (off) or hi (on), e.g. DFS indicators.
        **options: optimizer options (``penalty`` for all; see each optimizer's ``Options``).

    Returns:
        A fresh optimizer at generation 0.

    Raises:
        ConfigError: unknown name, bad argument or bad option; the message names the field and the fix.
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer={name!r} is unknown; use one of {', '.join(sorted(OPTIMIZERS))}")
    cls = OPTIMIZERS[name]
    if not isinstance(dim, int | np.integer) or dim < 1:
        raise ConfigError(f"optimizer dim={dim!r} must be an integer >= 1 (the genome length)")
    dim = int(dim)
    try:
        lo = np.broadcast_to(np.asarray(bounds[0], dtype=np.float64), (dim,)).copy()
        hi = np.broadcast_to(np.asarray(bounds[1], dtype=np.float64), (dim,)).copy()
    except (ValueError, TypeError, IndexError) as e:
        raise ConfigError(f"optimizer bounds must be (lo, hi), each a scalar or an array of shape ({dim},): {e}") from e
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise ConfigError("optimizer bounds must be finite; give every gene a finite lower and upper bound")
    bad = np.flatnonzero(~(lo < hi))
    if bad.size:
        j = int(bad[0])
        raise ConfigError(f"optimizer bounds of gene {j} are lo={lo[j]} >= hi={hi[j]}; every gene needs lo < hi")
    if x0 is not None:
        x0 = np.asarray(x0, dtype=np.float64).copy()
        if x0.shape != (dim,):
            raise ConfigError(f"optimizer x0 has shape {x0.shape}; pass an array of shape ({dim},)")
        out = np.flatnonzero(~((x0 >= lo) & (x0 <= hi)))
        if out.size:
            j = int(out[0])
            raise ConfigError(f"optimizer x0[{j}]={x0[j]} lies outside the bounds [{lo[j]}, {hi[j]}]; clip it")
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed={seed!r} must be an integer >= 0")
    if popsize is None:
        popsize = default_popsize(dim)
    if not isinstance(popsize, int | np.integer) or popsize < 2:
        raise ConfigError(f"optimizer popsize={popsize!r} must be an integer >= 2")
    if not isinstance(n_obj, int | np.integer) or n_obj < 1:
        raise ConfigError(f"n_obj={n_obj!r} must be an integer >= 1 (the number of objectives)")
    if n_obj > 1 and not cls.multi_objective:
        raise ConfigError(
            f"optimizer={name!r} is single-objective but the search has n_obj={n_obj} objectives; "
            "use optimizer: nsga2 (or random), or combine: weighted for their weighted sum"
        )
    imask = _mask(integer_mask, dim, "integer_mask")
    bmask = _mask(binary_mask, dim, "binary_mask")
    both = np.flatnonzero(imask & bmask)
    if both.size:
        raise ConfigError(f"gene {int(both[0])} is in both integer_mask and binary_mask; put it in one of them")
    empty = np.flatnonzero(imask & (np.floor(hi) < np.ceil(lo)))
    if empty.size:
        j = int(empty[0])
        raise ConfigError(f"integer gene {j} has bounds [{lo[j]}, {hi[j]}] containing no integer; widen them")
    opts = validate_options(name, **options)
    space = SearchSpace(
        dim=dim,
        lo=lo,
        hi=hi,
        x0=x0,
        seed=int(seed),
        popsize=int(popsize),
        n_obj=int(n_obj),
        integer_mask=imask,
        binary_mask=bmask,
    )
    return cls(space, opts)


# ---- state files -----------------------------------------------------------------------------------------
_BYTES_KEY = "__bytes_b64__"


def _encode(o: Any) -> Any:
    if isinstance(o, bytes):
        return {_BYTES_KEY: base64.b64encode(o).decode("ascii")}
    if isinstance(o, dict):
        return {k: _encode(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_encode(v) for v in o]
    return o


def _decode(o: Any) -> Any:
    if isinstance(o, dict):
        if set(o) == {_BYTES_KEY}:
            return base64.b64decode(o[_BYTES_KEY])
        return {k: _decode(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_decode(v) for v in o]
    return o


def dumps_state(state: dict[str, Any]) -> str:
    """Serialise a ``state_dict()`` to JSON text; ``bytes`` become ``{"__bytes_b64__": ...}``.

    Floats round-trip exactly (Python's json writes the shortest repr); infinities are written as
    ``Infinity`` (Python's json extension).
    """
    return json.dumps(_encode(state))


def loads_state(text: str) -> dict[str, Any]:
    """Inverse of ``dumps_state``.

    Raises:
        CheckpointError: the text is not valid JSON.
    """
    try:
        return _decode(json.loads(text))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"optimizer state is not valid JSON ({e}); the state file is corrupt") from e
