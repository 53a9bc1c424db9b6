"""Fitness from few documents: a candidate is scored on ``size`` chosen documents of a task and its full-set score
estimated from them (issue 26).

- ``anchor`` (Vivek et al., *Anchor Points: Benchmarking Models with Much Fewer Examples*, arXiv 2309.08638):
  documents are clustered by their correctness pattern across the models scored in full, into at most ``size / 2``
  clusters (never more than the distinct patterns); each cluster gives its medoid plus a share of the other
  ``size - k`` documents about proportional to its size (:func:`allocate`; seeded draws from its members), and the
  estimate is the stratified mean: each cluster's share of the documents times its drawn documents' mean. One
  medoid per cluster (the paper's choice) fails a search: fitted on candidates that solve almost nothing, nearly
  every document falls in one "never solved" cluster whose single medoid then carried 99% of the estimate (toy
  joint search, generation 0: 297 of 300 documents), so progress on those documents, which is what the search has
  to find, was invisible to it.
- ``irt`` (Polo et al., *tinyBenchmarks*, arXiv 2402.14992, sec. 3; MERGE^3, Mencattini et al., arXiv 2502.10436): a
  2PL item response model ``P(correct) = sigmoid(a_d * theta_m - b_d)`` is fitted on the same responses; the
  subset is the medoids of the documents clustered by their IRT parameters ``(a_d, b_d)``; a candidate's ability
  ``theta`` is fitted on its subset responses and the estimate is p-IRT: the observed subset responses plus the
  predicted probabilities of the other documents, over all documents.
- ``random``: a uniform sample of documents (seeded); the estimate is its mean.

Everything here is deterministic numpy (seeded k-medoids, fixed-iteration Newton/gradient fits), so a fit made
again from the same responses is the same fit; the search also stores it in the run.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

Method = Literal["anchor", "irt", "random"]


class SubsetConfig(BaseModel):
    """``objectives: - {name: ..., native: true, subset: {...}}``: score candidates on a few documents.

    Args:
        method: ``anchor``, ``irt`` or ``random`` (see the module).
        size: documents each candidate is scored on.
        fit_generations: the first generations scored on all documents; their per-document results fit the
            subset and the estimator (``random`` may use 0).
        refit_every: after that, every this many generations one generation is scored on all documents again and
            the subset refitted on every full result so far (None: never).
        elite: at the end the best ``elite`` estimated candidates are scored on all documents, and the run's best
            is chosen among candidates scored in full only.
        full_below: a generation is scored on all documents (and the subset refitted after it) when the previous
            generation's scores on a subset task all lie within ``min(full_below, size / 2)`` documents' worth of
            0 or of 1 (:func:`low_signal`): its best would answer too few of the ``size`` documents (or its worst
            miss too few) for the subset to rank the candidates (None: never). A search whose candidates still
            score near 0 is then scored in full until one of them shows the skill.
        seed: seed of the k-medoids start and the random subset (default: the search's seed).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Method
    size: int = Field(ge=1)
    fit_generations: int = Field(default=1, ge=1)
    refit_every: int | None = Field(default=None, ge=1)
    elite: int = Field(default=3, ge=1)
    full_below: float | None = Field(default=5.0, gt=0)
    seed: int | None = None


def low_signal(scores, size: int, full_below: float | None) -> bool:
    """Whether a generation's ``scores`` (per-document means in [0, 1]) are too close to 0 or to 1 for ``size``
    documents to rank them: its best is below ``min(full_below, size / 2) / size``, or its worst above one minus
    that. A candidate at 2% answers one of 50 documents on average, so a generation at 0-3% mostly ties on the
    subset while the full set still tells 1% from 3% (toy joint search, 300 documents: the full-set search left
    0-3% at generation 6, 12, ~30 and ~30 of 42 on seeds 0-3; on 50 or 25 estimated documents without this rule,
    four of eight searches never did). False without scores or with ``full_below`` None."""
    if full_below is None or not len(scores):
        return False
    floor = min(full_below, size / 2) / size
    return max(scores) < floor or min(scores) > 1 - floor


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


def kmedoids(X: np.ndarray, k: int, seed: int, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """k-medoids (alternating assignment / medoid update, k-means++ start) of the rows of ``X`` (n, f).

    Returns:
        (medoid row indices (k,), the cluster of every row (n,)); distinct rows beyond the number of distinct
        points are filled with the next rows in a seeded order so that exactly ``k`` medoids come back.
    """
    n = X.shape[0]
    rng = np.random.default_rng(seed)
    D = np.sqrt(((X[:, None, :] - X[None, :, :]) ** 2).sum(-1))  # (n, n)
    med = [int(rng.integers(n))]
    for _ in range(1, k):  # k-means++: far points first; ties and zero distances by the seeded order
        d = D[:, med].min(1)
        if d.max() <= 0:
            rest = [i for i in rng.permutation(n).tolist() if i not in med]
            med.extend(rest[:k - len(med)])
            break
        med.append(int(rng.choice(n, p=d ** 2 / (d ** 2).sum())))
    med = np.array(med)
    for _ in range(iters):
        assign = D[:, med].argmin(1)  # (n,)
        new = med.copy()
        for c in range(k):
            members = np.flatnonzero(assign == c)
            if len(members):
                new[c] = members[D[np.ix_(members, members)].sum(1).argmin()]
        if np.array_equal(new, med):
            break
        med = new
    return med, D[:, med].argmin(1)


def fit_irt(R: np.ndarray, M: np.ndarray | None = None, *, steps: int = 400, lr: float = 0.05, l2: float = 0.1
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Joint maximum a posteriori fit of a 2PL IRT model on responses ``R`` (models, documents) in [0, 1], with mask
    ``M`` (1 where observed): ``P = sigmoid(a_d * theta_m - b_d)``, priors theta ~ N(0, 1), log a ~ N(0, 1)
    (a > 0), b ~ N(0, 10) (``l2`` scales them); full-batch Adam, fixed steps. Returns (theta, a, b)."""
    m, n = R.shape
    M = np.ones_like(R) if M is None else M
    params = [np.zeros(m), np.zeros(n), np.zeros(n)]  # theta, log a, b
    mom = [np.zeros_like(p) for p in params]
    vel = [np.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        theta, la, b = params
        a = np.exp(la)
        P = _sigmoid(a[None, :] * theta[:, None] - b[None, :])  # (m, n)
        G = (P - R) * M  # d(-loglik)/d logit
        grads = [G @ a + l2 * theta,
                 (G * theta[:, None]).sum(0) * a + l2 * la,
                 -G.sum(0) + l2 * 0.1 * b]
        for i, g in enumerate(grads):  # Adam (Kingma & Ba, Alg. 1)
            mom[i] = 0.9 * mom[i] + 0.1 * g
            vel[i] = 0.999 * vel[i] + 0.001 * g * g
            params[i] = params[i] - lr * (mom[i] / (1 - 0.9 ** t)) / (np.sqrt(vel[i] / (1 - 0.999 ** t)) + 1e-8)
    return params[0], np.exp(params[1]), params[2]


def fit_theta(r: np.ndarray, a: np.ndarray, b: np.ndarray, *, iters: int = 30, prior: float = 0.1) -> float:
    """A model's ability from its responses ``r`` to items ``(a, b)``: MAP with a N(0, 1) prior (Newton)."""
    theta = 0.0
    for _ in range(iters):
        p = _sigmoid(a * theta - b)
        g = float(((p - r) * a).sum() + prior * theta)
        h = float((p * (1 - p) * a * a).sum() + prior)
        theta -= g / h
    return theta


def allocate(counts: np.ndarray, size: int) -> np.ndarray:
    """Split ``size`` draws over clusters of ``counts`` documents: one each, then each further draw to the cluster
    whose drawn documents weigh most (``counts / draws``, D'Hondt's divisor rule; ties to the lower index), never more
    than its documents. Draws end up about proportional to the sizes and no document carries a large weight. Needs
    ``len(counts) <= size <= sum(counts)``."""
    counts = np.asarray(counts, dtype=np.float64)
    alloc = np.ones(len(counts), dtype=np.int64)
    for _ in range(size - len(counts)):
        alloc[int(np.argmax(np.where(alloc < counts, counts / alloc, -np.inf)))] += 1
    return alloc


def fit_subset(method: str, R: np.ndarray, size: int, seed: int) -> dict:
    """Choose ``size`` documents from full responses ``R`` (models, documents) and fit the estimator.

    Returns:
        A JSON-able fit: ``{"method", "positions": [document positions], "weights": [...] (anchor),
        "a", "b": item parameters of every document (irt), "n_docs", "n_models"}``.
    """
    R = np.asarray(R, dtype=np.float64)
    m, n = R.shape
    size = min(size, n)
    out: dict = {"method": method, "n_docs": n, "n_models": m}
    if method == "random":
        pos = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
        return {**out, "positions": pos.tolist()}
    if method == "anchor":
        X = R.T  # (n, m): documents as points, their correctness across the models
        k = min(-(-size // 2), len(np.unique(X, axis=0)))  # room for proportional draws; no duplicate medoids
        med, assign = kmedoids(X, k, seed)
        counts = np.bincount(assign, minlength=k)  # (k,)
        alloc = allocate(counts, size)
        rng = np.random.default_rng(seed)
        pos, weights = [], []
        for c in range(k):  # the medoid, then seeded draws among the cluster's other documents
            others = np.flatnonzero(assign == c)
            others = rng.permutation(others[others != med[c]])
            pos.extend([int(med[c]), *others[:alloc[c] - 1].tolist()])
            weights.extend([counts[c] / n / alloc[c]] * int(alloc[c]))  # stratified mean: cluster share / draws
        order = np.argsort(pos)
        return {**out, "positions": np.asarray(pos)[order].tolist(), "weights": np.asarray(weights)[order].tolist()}
    theta, a, b = fit_irt(R)
    emb = np.stack([a, b], 1)  # (n, 2): tinyBenchmarks' IRT anchor points cluster the item parameters
    emb = (emb - emb.mean(0)) / (emb.std(0) + 1e-9)
    med, assign = kmedoids(emb, size, seed)
    order = np.argsort(med)
    return {**out, "positions": med[order].tolist(), "a": a.tolist(), "b": b.tolist(),
            "weights": (np.bincount(assign, minlength=size) / n)[order].tolist()}


def estimate(fit: dict, r: np.ndarray) -> float:
    """The full-set mean estimated from responses ``r`` on ``fit["positions"]`` (in that order)."""
    r = np.asarray(r, dtype=np.float64)
    if fit["method"] == "random":
        return float(r.mean())
    if fit["method"] == "anchor":
        return float(np.dot(fit["weights"], r))
    a, b = np.asarray(fit["a"]), np.asarray(fit["b"])
    pos = np.asarray(fit["positions"])
    theta = fit_theta(r, a[pos], b[pos])
    p = _sigmoid(a * theta - b)  # (n,): p-IRT, tinyBenchmarks Eq. (3.3): observed where seen, predicted elsewhere
    p[pos] = r
    return float(p.mean())


def require_native_mean(p, setting: str, feature: str, drop: str) -> None:
    """Refuse a prepared task that ``feature`` (racing, subset fitness: both score a candidate document by document)
    cannot use: scored through lm-eval, or a metric that is not a mean over documents.

    Raises:
        ConfigError: ``"{setting}, but objective ..."``, naming the fix and ``drop`` (how to turn the feature off).
    """
    from dfsmerge.errors import ConfigError

    o = p.objective
    if p.native is None:
        raise ConfigError(f"{setting}, but objective {o.name!r} is scored through lm-eval (native: false); {feature} "
                          f"needs native: true, or {drop}")
    metric = p.metric.split(",")[0]
    agg = p.task.aggregation().get(metric)
    if getattr(agg, "__name__", "") != "mean":
        raise ConfigError(f"{setting}, but objective {o.name!r} metric {metric!r} aggregates with "
                          f"{getattr(agg, '__name__', agg)!r}, not a mean over documents; {feature} needs a mean of "
                          f"per-document 0/1 or [0, 1] values (acc, acc_norm, exact_match), or {drop}")


def check_subset_task(prepared) -> None:
    """Refuse a prepared task (:class:`dfsmerge.objectives.tasks.PreparedTask`) that subset fitness cannot score:
    not native, or a metric that is not a mean over documents.

    Raises:
        ConfigError: naming the objective and the fix.
    """
    from dfsmerge.errors import ConfigError
    o = prepared.objective
    require_native_mean(prepared, "subset is set", "subset fitness", "drop subset")
    n = len(prepared.native.docs)
    if o.subset is not None and o.subset.size >= n:
        raise ConfigError(f"objective {o.name!r} subset.size={o.subset.size} is not below the task's {n} documents; "
                          f"use a size below {n}, or drop subset to score every document")
