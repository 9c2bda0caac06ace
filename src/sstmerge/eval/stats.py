"""Uncertainty of evaluation numbers: intervals over items and paired tests between two models.

Pure functions of per-item outcomes (arrays of 0/1 or of scores in [0, 1]); the statistics come from
scipy, nothing is hand-rolled that scipy already has.

* A rate over ``n`` items with ``k`` successes gets the **Wilson score interval** (``scipy.stats.binomtest
  (k, n).proportion_ci(method="wilson")``); it stays inside [0, 1] and is honest at 0 % and 100 %, where the
  normal ("Wald") interval collapses to a point.
* A mean of non-binary scores (token F1, a rate averaged over seeds) gets a **bootstrap interval over items**
  (``scipy.stats.bootstrap``, percentile method, seeded): resample the items with replacement, recompute the mean.
* Two models on the **same items** are compared by a paired test: the **exact McNemar test** for binary
  outcomes (only the discordant items count: b = A right & B wrong, c = A wrong & B right; under H0 each
  discordant item goes either way with probability 1/2, so p = the two-sided binomial test of b in b + c,
  ``scipy.stats.binomtest``), and the **paired bootstrap** for scores (resample items, keep the pairs,
  recompute mean(A − B); p = twice the smaller tail of that distribution around 0).
  Identical outcomes give p = 1 in both.
* A score that averages several columns (the results table's ``safety`` and ``utility``) resamples each
  column's items independently (a stratified bootstrap: ``scipy.stats.bootstrap`` with several samples).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
ALPHA = 0.05  # a paired difference is "significant" when p < ALPHA
N_RESAMPLES = 2000
SEED = 0  # bootstrap resampling is seeded: the same outcomes always give the same interval


@dataclass(frozen=True)
class Interval:
    """A point estimate with its ``confidence`` interval [low, high] over ``n`` items."""

    value: float
    low: float
    high: float
    n: int
    method: str  # "wilson" | "bootstrap"

    def as_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n, "method": self.method}


@dataclass(frozen=True)
class PairedTest:
    """A comparison of model A with model B on the same ``n`` items: difference of means (A − B), its interval
    and the two-sided p-value of "no difference". ``discordant``: (A only, B only) for McNemar, else None."""

    difference: float
    low: float
    high: float
    p_value: float
    n: int
    method: str  # "mcnemar_exact" | "paired_bootstrap"
    discordant: tuple[int, int] | None = None

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA

    def as_dict(self) -> dict:
        out = {"difference": self.difference, "low": self.low, "high": self.high, "p_value": self.p_value,
               "n": self.n, "method": self.method, "significant": self.significant}
        if self.discordant is not None:
            out["discordant"] = list(self.discordant)
        return out


def _as_array(values: Sequence[float], what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)  # (n,)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{what}: need a non-empty 1-D sequence of per-item outcomes, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: per-item outcomes must be finite numbers")
    return x


def is_binary(values: Sequence[float]) -> bool:
    x = np.asarray(values, dtype=np.float64)
    return bool(np.isin(x, (0.0, 1.0)).all())


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> Interval:
    """Wilson score interval of the rate ``successes / n``.

    (p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n),  z = Φ⁻¹(1 − α/2)   (scipy computes it).
    """
    from scipy.stats import binomtest

    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return Interval(successes / n, float(ci.low), float(ci.high), int(n), "wilson")


def bootstrap_interval(values: Sequence[float], confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                       seed: int = SEED) -> Interval:
    """Percentile bootstrap interval of the mean of per-item scores (items resampled with replacement)."""
    from scipy.stats import bootstrap

    x = _as_array(values, "bootstrap_interval")
    mean = float(x.mean())
    if np.all(x == x[0]):  # no spread: every resample has the same mean
        return Interval(mean, mean, mean, x.size, "bootstrap")
    res = bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="percentile",
                    random_state=np.random.default_rng(seed), vectorized=True)
    return Interval(mean, float(res.confidence_interval.low), float(res.confidence_interval.high), x.size, "bootstrap")


def item_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The interval of a column's mean over its items: Wilson when every outcome is 0/1, else the bootstrap."""
    x = _as_array(values, "item_interval")
    if is_binary(x):
        return wilson_interval(int(x.sum()), x.size, confidence)
    return bootstrap_interval(x, confidence)


def mean_of_means_interval(samples: Sequence[Sequence[float]], confidence: float = CONFIDENCE,
                           n_resamples: int = N_RESAMPLES, seed: int = SEED) -> Interval:
    """Interval of (1/m) Σ_j mean(samples[j]): each column's items resampled independently (stratified bootstrap)."""
    from scipy.stats import bootstrap

    xs = [_as_array(s, f"mean_of_means_interval[{j}]") for j, s in enumerate(samples)]
    if not xs:
        raise ValueError("mean_of_means_interval: no samples")
    value = float(np.mean([x.mean() for x in xs]))
    if all(np.all(x == x[0]) for x in xs):
        return Interval(value, value, value, sum(x.size for x in xs), "bootstrap")

    def statistic(*resampled, axis=-1):
        return np.mean([r.mean(axis=axis) for r in resampled], axis=0)

    res = bootstrap(tuple(xs), statistic, confidence_level=confidence, n_resamples=n_resamples, method="percentile",
                    random_state=np.random.default_rng(seed), vectorized=True)
    return Interval(value, float(res.confidence_interval.low), float(res.confidence_interval.high),
                    sum(x.size for x in xs), "bootstrap")


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Exact McNemar test of two models' 0/1 outcomes on the same items.

    b_ = #(A=1, B=0), c_ = #(A=0, B=1); p = binomtest(b_, b_ + c_, 1/2), two-sided (p = 1 without discordant items).
    The interval of mean(A − B) = (b_ − c_)/n is the paired bootstrap's.
    """
    from scipy.stats import binomtest

    x, y = _paired(a, b, "mcnemar_exact")
    if not (is_binary(x) and is_binary(y)):
        raise ValueError("mcnemar_exact: outcomes must be 0/1; use paired_bootstrap for scores")
    only_a, only_b = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
    p = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    boot = paired_bootstrap(x, y)  # the interval of the difference
    return PairedTest(boot.difference, boot.low, boot.high, min(p, 1.0), x.size, "mcnemar_exact", (only_a, only_b))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_resamples: int = N_RESAMPLES,
                     seed: int = SEED) -> PairedTest:
    """Paired bootstrap of mean(A − B) over items: its percentile interval and p = min(1, 2·min(P*(d ≤ 0), P*(d ≥ 0)))."""
    x, y = _paired(a, b, "paired_bootstrap")
    d = x - y  # (n,) per-item differences; resampling items keeps each pair together
    if np.all(d == d[0]):
        return PairedTest(float(d[0]), float(d[0]), float(d[0]), 1.0 if d[0] == 0 else 0.0, d.size, "paired_bootstrap")
    dist = _bootstrap_means(d, n_resamples, seed)
    p = min(1.0, 2.0 * min(float((dist <= 0).mean()), float((dist >= 0).mean())))
    low, high = np.quantile(dist, [(1 - CONFIDENCE) / 2, 1 - (1 - CONFIDENCE) / 2])
    return PairedTest(float(d.mean()), float(low), float(high), p, d.size, "paired_bootstrap")


def paired_test(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """McNemar (exact) when both models' outcomes are 0/1, else the paired bootstrap."""
    return mcnemar_exact(a, b) if is_binary(a) and is_binary(b) else paired_bootstrap(a, b)


def paired_mean_of_means(pairs: Sequence[tuple[Sequence[float], Sequence[float]]], n_resamples: int = N_RESAMPLES,
                         seed: int = SEED) -> PairedTest:
    """Paired test of a mean of column means (``safety``, ``utility``): each column's per-item differences are
    resampled independently; p as in :func:`paired_bootstrap`."""
    ds = [np.subtract(*_paired(a, b, f"paired_mean_of_means[{j}]")) for j, (a, b) in enumerate(pairs)]
    if not ds:
        raise ValueError("paired_mean_of_means: no columns")
    value = float(np.mean([d.mean() for d in ds]))
    if all(np.all(d == 0) for d in ds):
        return PairedTest(0.0, 0.0, 0.0, 1.0, sum(d.size for d in ds), "paired_bootstrap")
    rng = np.random.default_rng(seed)
    dist = np.mean([d[rng.integers(0, d.size, size=(n_resamples, d.size))].mean(axis=1) for d in ds], axis=0)
    p = min(1.0, 2.0 * min(float((dist <= 0).mean()), float((dist >= 0).mean())))
    low, high = np.quantile(dist, [(1 - CONFIDENCE) / 2, 1 - (1 - CONFIDENCE) / 2])
    return PairedTest(value, float(low), float(high), p, sum(d.size for d in ds), "paired_bootstrap")


def _paired(a: Sequence[float], b: Sequence[float], what: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_array(a, f"{what} (A)"), _as_array(b, f"{what} (B)")
    if x.shape != y.shape:
        raise ValueError(f"{what}: paired tests need the same items for both models, got {x.size} and {y.size}")
    return x, y


def _bootstrap_means(d: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    from scipy.stats import bootstrap

    res = bootstrap((d,), np.mean, n_resamples=n_resamples, method="percentile", vectorized=True,
                    random_state=np.random.default_rng(seed))
    return np.asarray(res.bootstrap_distribution)
