"""Racing (issue 18): score a generation's candidates block by block and stop those that cannot enter its elite.

CMA-ES uses only the ranks of the mu best candidates of a generation (the others get the same negative or zero
weights whatever their exact values), NSGA-II's front is made of non-dominated candidates, and a search reports its
best. So once a candidate's *best possible* final fitness is worse than the *worst possible* final fitness of
``elite`` other candidates, scoring its remaining documents changes nothing that matters; it keeps its partial
estimate (the mean over the documents it was scored on) and is marked as such. This is Maron & Moore's Hoeffding
race ("Hoeffding races: accelerating model selection search", NIPS 1993) applied to one generation at a time, all
candidates advancing block by block together, so decisions depend on scores only, never on timing or backend
(deterministic for a seed, and replayable on resume from the per-block sums each record keeps).

Bounds on a task score ``F`` that is the mean of N per-document values in [0, 1], after the first n documents of a
uniformly random order (a sample without replacement) with sum s and mean ``m = s / n``:

- ``exact``: the remaining documents score between 0 and 1: ``[s / N, (s + N - n) / N]``. A candidate is stopped
  only when it certainly misses the elite.
- ``hoeffding``: ``|m - F| <= sqrt((1 - (n - 1) / N) ln(2 / delta') / (2 n))`` with probability at least
  ``1 - delta'`` (Hoeffding's inequality with Serfling's finite-population factor: R. J. Serfling, "Probability
  inequalities for the sum in sampling without replacement", Ann. Statist. 1974).
- ``kl``: the Chernoff bound in its Kullback-Leibler form, ``P(m <= F - t) <= exp(-n kl(F - t, F))`` and likewise
  above (Hoeffding 1963, Theorem 1; its Theorem 4 carries it to sampling without replacement), inverted: ``F`` lies
  where ``n kl(m, F) <= ln(4 / delta')``, intersected with the ``hoeffding`` interval at the same ``delta' / 2``.
  Much tighter than ``hoeffding`` near 0 and 1, where most weak candidates of a search score (by Pinsker's
  inequality never looser than plain Hoeffding).

Every interval is intersected with the ``exact`` one. ``delta' = delta / ((blocks - 1) * candidates)``, so that every
bound of a generation holds at once with probability at least ``1 - delta``.

Everything here is pure (tested on constructed rankings in tests/search/test_racing.py); the loop drives it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dfsmerge.objectives.config import ObjectiveConfig
from dfsmerge.objectives.fitness import WORST, scalar_fitness


def _kl(p: float, q: float) -> float:
    """Kullback-Leibler divergence between Bernoulli(p) and Bernoulli(q)."""
    out = 0.0
    if p > 0.0:
        out += p * math.log(p / q) if q > 0.0 else math.inf
    if p < 1.0:
        out += (1.0 - p) * math.log((1.0 - p) / (1.0 - q)) if q < 1.0 else math.inf
    return out


def _kl_limit(m: float, level: float, upper: bool) -> float:
    """The farthest ``q`` from ``m`` (above it if ``upper``) with ``kl(m, q) <= level`` (bisection: kl(m, .) grows
    monotonically away from m)."""
    lo, hi = (m, 1.0) if upper else (0.0, m)
    if _kl(m, hi if upper else lo) <= level:
        return hi if upper else lo
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if (_kl(m, mid) <= level) == upper:
            lo = mid
        else:
            hi = mid
    return lo if upper else hi


def score_interval(s: float, n: int, total: int, bound: str, delta: float) -> tuple[float, float]:
    """Bounds on the final mean of ``total`` values in [0, 1] of which the first ``n`` of a random order, summing
    to ``s``, are known (see the module docstring for ``bound``: exact, hoeffding, kl)."""
    if total <= 0:
        return 0.0, 0.0
    if n >= total:
        return s / total, s / total
    lo, hi = s / total, (s + total - n) / total
    if bound == "exact" or n == 0:
        return lo, hi
    m = min(1.0, max(0.0, s / n))
    if bound == "kl":
        delta = delta / 2.0  # two bounds of one candidate, each holding with probability 1 - delta' / 2
        level = math.log(2.0 / delta) / n
        lo, hi = max(lo, _kl_limit(m, level, upper=False)), min(hi, _kl_limit(m, level, upper=True))
    eps = math.sqrt((1.0 - (n - 1) / total) * math.log(2.0 / delta) / (2.0 * n))
    return max(lo, m - eps), min(hi, m + eps)


@dataclass
class Tally:
    """One candidate's race so far.

    Attributes:
        blocks: per scored block, ``{objective key: [sum, documents]}`` (task objectives).
        totals: ``{objective key: documents in all}``; directions: ``{key: 'maximize' | 'minimize'}``.
        exact, exact_scores: ``{objective key: value to minimise}`` and ``{key: raw score}`` of the objectives known
            whole (costs, synthetic).
        stopped: the race stopped it before its last block. error: the candidate failed.
        cost, timings: summed over its blocks.
    """

    blocks: list[dict[str, list[float]]] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)
    directions: dict[str, str] = field(default_factory=dict)
    exact: dict[str, float] = field(default_factory=dict)
    exact_scores: dict[str, float | None] = field(default_factory=dict)
    stopped: bool = False
    error: str | None = None
    cost: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def add(self, partial: Mapping[str, Sequence], scores: Mapping[str, float | None], values: Mapping[str, float],
            cost: Mapping[str, float], timings: Mapping[str, float]) -> None:
        """Add one block's result (``partial``: ``{key: [sum, n, total, direction]}``; the other keys of
        ``scores``/``values`` are objectives known whole)."""
        self.blocks.append({k: [float(v[0]), int(v[1])] for k, v in partial.items()})
        for k, v in partial.items():
            self.totals[k] = int(v[2])
            self.directions[k] = str(v[3])
        self.exact.update({k: v for k, v in values.items() if k not in partial})
        self.exact_scores.update({k: v for k, v in scores.items() if k not in partial})
        for d, src in ((self.cost, cost), (self.timings, timings)):
            for k, v in src.items():
                if isinstance(v, int | float):
                    d[k] = d.get(k, 0) + v

    def sums(self, upto: int | None = None) -> dict[str, tuple[float, int]]:
        """``{key: (sum, documents)}`` over the first ``upto`` blocks (default all scored)."""
        out: dict[str, tuple[float, int]] = {}
        for b in self.blocks[:upto]:
            for k, (s, n) in b.items():
                s0, n0 = out.get(k, (0.0, 0))
                out[k] = (s0 + s, n0 + int(n))
        return out

    @property
    def complete(self) -> bool:
        return all(n >= self.totals[k] for k, (_, n) in self.sums().items()) if self.totals else True

    def estimate(self) -> dict[str, float]:
        """Each task objective's score on the documents scored (the final score once complete)."""
        return {k: (s / n if n else math.nan) for k, (s, n) in self.sums().items()}

    def value_bounds(self, bound: str, delta: float, upto: int | None = None
                     ) -> tuple[dict[str, float], dict[str, float]]:
        """``(optimistic, pessimistic)`` values to minimise per objective after ``upto`` blocks."""
        lo: dict[str, float] = dict(self.exact)
        hi: dict[str, float] = dict(self.exact)
        for k, (s, n) in self.sums(upto).items():
            a, b = score_interval(s, n, self.totals[k], bound, delta)
            if self.directions[k] == "maximize":
                lo[k], hi[k] = -b, -a
            else:
                lo[k], hi[k] = a, b
        return lo, hi

    def values(self) -> dict[str, float]:
        """Values to minimise of the estimate (direction applied), exact objectives included."""
        out = dict(self.exact)
        for k, v in self.estimate().items():
            out[k] = WORST if math.isnan(v) else (-v if self.directions[k] == "maximize" else v)
        return out

    def to_json(self, n_blocks: int) -> dict[str, Any]:
        """What ``evals.jsonl`` keeps (``race``): enough to replay the race on resume."""
        return {"blocks": self.blocks, "of": n_blocks, "stopped": self.stopped,
                "docs": sum(n for _, n in self.sums().values()), "totals": self.totals,
                "directions": self.directions, "exact": self.exact}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Tally:
        return cls(blocks=[{k: list(v) for k, v in b.items()} for b in d["blocks"]], stopped=bool(d["stopped"]),
                   totals=dict(d["totals"]), directions=dict(d["directions"]),
                   exact={k: (WORST if v is None else float(v)) for k, v in d["exact"].items()})


def losers(optimistic: Sequence[Sequence[float]], pessimistic: Sequence[Sequence[float]], alive: Iterable[int],
           elite: int | None) -> set[int]:
    """The alive candidates that cannot enter the elite (everything minimised).

    Args:
        optimistic, pessimistic: per candidate (all of the generation's, alive or not), its best and worst possible
            final values (one per objective; one entry for a scalar fitness).
        alive: candidates still racing.
        elite: single objective: the elite's size (mu for CMA-ES); None: the non-dominated set.

    A candidate loses when ``elite`` others are certainly better (their worst beats its best), or, for the
    non-dominated set, when one other certainly dominates it.
    """
    out: set[int] = set()
    n = len(optimistic)
    for i in alive:
        if elite is not None:
            better = sum(1 for j in range(n) if j != i and pessimistic[j][0] < optimistic[i][0])
            if better >= elite:
                out.add(i)
        else:
            for j in range(n):
                if j != i and all(p <= o for p, o in zip(pessimistic[j], optimistic[i], strict=True)) and any(
                        p < o for p, o in zip(pessimistic[j], optimistic[i], strict=True)):
                    out.add(i)
                    break
    return out


def run_race(tallies: list[Tally], todo: list[int], score_block: Callable[[list[int], int], None], *,
             n_blocks: int, bound: str, delta: float, objectives: Sequence[ObjectiveConfig], elite: int | None,
             best_known: float) -> None:
    """Race the candidates ``todo`` (indices into ``tallies``; the others are known: complete, or replayed from
    their logged blocks) through ``n_blocks`` blocks, in place.

    Args:
        score_block: ``score_block(indices, block)`` adds block ``block``'s result to each of those tallies (and
            sets ``error`` on a failure).
        objectives: what the optimizer sees: one vector entry per objective when ``elite`` is None, else their
            scalar fitness (:func:`~dfsmerge.objectives.fitness.scalar_fitness`; weights are positive, so the
            bounds of the values bound it).
        best_known: the best fitness of complete candidates outside this generation: a stopped candidate whose
            estimate beats every complete candidate is scored to the end (racing never picks the best).
    """
    keys = [o.key for o in objectives]

    def bounds(t: Tally, upto: int | None) -> tuple[list[float], list[float]]:
        if t.error is not None:
            return [WORST] * (len(keys) if elite is None else 1), [WORST] * (len(keys) if elite is None else 1)
        lo, hi = t.value_bounds(bound, delta, upto)
        if elite is None:
            return [lo.get(k, WORST) for k in keys], [hi.get(k, WORST) for k in keys]
        return [scalar_fitness(lo, objectives)], [scalar_fitness(hi, objectives)]

    # one failure probability for the whole generation (Bonferroni over every comparison round of every candidate)
    delta = delta / max(1, (n_blocks - 1) * len(todo))
    for blk in range(n_blocks):
        alive = [i for i in todo if not tallies[i].stopped and tallies[i].error is None
                 and len(tallies[i].blocks) <= blk]
        if alive:
            score_block(alive, blk)
        if blk == n_blocks - 1:
            break
        # every candidate's interval after this block (a known one as it stood then: replayed from its blocks)
        opt, pes = zip(*(bounds(t, blk + 1) for t in tallies), strict=True)
        running = [i for i in todo if not tallies[i].stopped and tallies[i].error is None]
        for i in losers(opt, pes, running, elite):
            tallies[i].stopped = True
    # racing never decides the best: a stopped candidate whose estimate beats every complete one is completed
    while True:
        complete = [bounds(t, None)[1][0] for t in tallies if t.error is None and not t.stopped]
        best = min([best_known, *complete]) if elite is not None else None
        if best is None:
            break
        rescue = [i for i in todo if tallies[i].stopped and tallies[i].error is None
                  and scalar_fitness(tallies[i].values(), objectives) < best]
        if not rescue:
            break
        for i in rescue:
            tallies[i].stopped = False
        for blk in range(n_blocks):
            need = [i for i in rescue if len(tallies[i].blocks) <= blk and tallies[i].error is None]
            if need:
                score_block(need, blk)

