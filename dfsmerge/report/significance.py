"""Paired significance of a difference between two models scored on the same documents.

A merge "win" on a few hundred documents is often noise; the two models' per-document outcomes are paired (same
document), so the tests here use the pairing:

- 0/1 outcomes (accuracy, exact match): the exact McNemar test (McNemar 1947; exact form: a two-sided binomial test
  of the discordant pairs, ``n10`` documents only model A gets right against ``n01`` only B gets right, with
  ``p = 0.5``). Documents both get right or both get wrong carry no information about the difference.
- Anything else (log-likelihoods, acc_norm with ties, F1): a paired bootstrap (Efron & Tibshirani 1993, ch. 16):
  resample documents with replacement, keep the pairs together, and read a percentile confidence interval and a
  two-sided p-value of "mean difference = 0" off the resampled mean differences.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dfsmerge.errors import ConfigError


@dataclass(frozen=True, slots=True)
class PairedTest:
    """The paired comparison of model A with model B on ``n`` documents.

    Attributes:
        n: documents.
        mean_a, mean_b: the two mean outcomes. delta: ``mean_a - mean_b``.
        method: ``"mcnemar"`` (exact, 0/1 outcomes) or ``"bootstrap"`` (paired, percentile).
        p_value: two-sided p-value of "no difference".
        ci: 95% (``1 - alpha``) confidence interval of ``delta`` (bootstrap only; None for McNemar).
        n10, n01: McNemar's discordant pairs (A right and B wrong, and the reverse); None for the bootstrap.
    """

    n: int
    mean_a: float
    mean_b: float
    delta: float
    method: str
    p_value: float
    ci: tuple[float, float] | None = None
    n10: int | None = None
    n01: int | None = None

    def describe(self) -> str:
        """One line: ``+0.12 (McNemar exact p=0.015, 14 vs 4 discordant, n=200)``."""
        if self.method == "mcnemar":
            how = f"McNemar exact p={self.p_value:.3g}, {self.n10} vs {self.n01} discordant"
        else:
            lo, hi = self.ci or (math.nan, math.nan)
            how = f"paired bootstrap p={self.p_value:.3g}, 95% CI [{lo:+.4g}, {hi:+.4g}]"
        return f"{self.delta:+.4g} ({how}, n={self.n})"

    def to_json(self) -> dict:
        return {"n": self.n, "mean_a": self.mean_a, "mean_b": self.mean_b, "delta": self.delta,
                "method": self.method, "p_value": self.p_value, "ci": None if self.ci is None else list(self.ci),
                "n10": self.n10, "n01": self.n01}


def _pair(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ConfigError(f"paired test: outcomes of shape {x.shape} and {y.shape} are not paired; score both "
                          "models on the same documents")
    if x.size == 0:
        raise ConfigError("paired test: no documents; score at least one document")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ConfigError("paired test: a per-document outcome is not finite; check the task's metric")
    return x, y


def is_binary(a: Sequence[float]) -> bool:
    """Every outcome is 0 or 1."""
    x = np.asarray(a, dtype=np.float64)
    return bool(np.isin(x, (0.0, 1.0)).all())


def _binom_two_sided_half(k: int, n: int) -> float:
    """Two-sided p-value of ``k`` successes in ``n`` fair coin flips: ``min(1, 2 P(X <= min(k, n - k)))``."""
    if n == 0:
        return 1.0
    m = min(k, n - k)
    tail = math.fsum(math.comb(n, i) for i in range(m + 1)) / 2.0 ** n  # exact integers, one division
    return min(1.0, 2.0 * tail)


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """The exact McNemar test of two models' 0/1 outcomes on the same documents.

    Raises:
        ConfigError: unpaired, empty or non-0/1 outcomes.
    """
    x, y = _pair(a, b)
    if not (is_binary(x) and is_binary(y)):
        raise ConfigError("McNemar needs 0/1 outcomes (accuracy, exact match); use paired_bootstrap for the rest")
    n10 = int(((x == 1) & (y == 0)).sum())
    n01 = int(((x == 0) & (y == 1)).sum())
    return PairedTest(n=int(x.size), mean_a=float(x.mean()), mean_b=float(y.mean()), delta=float(x.mean() - y.mean()),
                      method="mcnemar", p_value=_binom_two_sided_half(n10, n10 + n01), n10=n10, n01=n01)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, n_boot: int = 10_000, alpha: float = 0.05,
                     seed: int = 0) -> PairedTest:
    """Paired bootstrap of the mean difference ``mean(a) - mean(b)``: percentile CI and two-sided p-value.

    Args:
        a, b: per-document outcomes of models A and B, same documents in the same order.
        n_boot: resamples. alpha: 1 - the CI's coverage. seed: the resampling's seed (results are reproducible).

    Raises:
        ConfigError: unpaired or empty outcomes, ``n_boot < 100``.
    """
    x, y = _pair(a, b)
    if n_boot < 100:
        raise ConfigError(f"paired_bootstrap n_boot={n_boot} is too few for a p-value; use at least 1000")
    d = x - y  # (n,)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // d.size)  # bound the (chunk, n) index matrix
    for lo in range(0, n_boot, chunk):
        idx = rng.integers(0, d.size, size=(min(chunk, n_boot - lo), d.size))  # (chunk, n)
        means[lo:lo + idx.shape[0]] = d[idx].mean(axis=1)
    lo_q, hi_q = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    # two-sided: twice the share of resampled differences on the far side of 0 (1 when nothing differs)
    p = 1.0 if np.all(d == 0) else min(1.0, 2.0 * min((means <= 0).mean(), (means >= 0).mean()))
    return PairedTest(n=int(d.size), mean_a=float(x.mean()), mean_b=float(y.mean()), delta=float(d.mean()),
                      method="bootstrap", p_value=float(p), ci=(float(lo_q), float(hi_q)))


def paired_test(a: Sequence[float], b: Sequence[float], *, n_boot: int = 10_000, seed: int = 0) -> PairedTest:
    """McNemar (exact) when both outcome lists are 0/1, else the paired bootstrap."""
    if is_binary(a) and is_binary(b):
        return mcnemar_exact(a, b)
    return paired_bootstrap(a, b, n_boot=n_boot, seed=seed)


# ================================================================================================ report lines
SIGNIFICANCE_FILE = "significance.json"
"""Where :func:`dfsmerge.analysis.ablation.run_significance` writes a run's tests (in ``RUN/report/``)."""


def significance_lines(sig: Mapping[str, Any], names: Mapping[str, str] | None = None) -> list[str]:
    """The report's section on ``significance.json``: per split, the best against the start and each source."""
    lines = []
    for split, s in sig["splits"].items():
        where = "the objectives' own split" if split == "objective" else f"split `{split}`"
        lines += [f"Best (id {sig['best']}) against the start and each source on {where}, paired on the same "
                  "documents (exact McNemar for 0/1 outcomes, paired bootstrap otherwise):", "",
                  "| against | " + " | ".join(f"{k} (best {s['best'][k]:.4g})" for k in s["objectives"]) + " |",
                  "|---|" + "---|" * len(s["objectives"])]
        for a in s["against"]:
            model = a["model"]
            if model.startswith("source ") and names and names.get(model[7:], model[7:]) != model[7:]:
                model += f" ({names[model[7:]]})"
            cells = []
            for k in s["objectives"]:
                t = a["tests"][k]
                cells.append(f"{a['scores'][k]:.4g}: Δ {t['delta']:+.4g}, p={t['p_value']:.3g}")
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines
