"""Is a top-1 difference between two artifacts real, or noise? Paired statistics on the same images.

Why paired: every row of the report is scored on the same test images, so the difference of
two rows is carried only by the images on which exactly one of them is right (``b``: only the
row is right, ``c``: only the reference is). Treating the two top-1 figures as independent
samples would make the interval several times too wide; ignoring the sampling altogether (as a
bare delta does) presents one image's flip (0.28 points of 360) as a gain.

- ``p_value``: the exact two-sided McNemar test (binomial on the discordant pairs); the delta is
  *significant* when ``p < 0.05``, and *noise* otherwise.
- ``ci95``: a 95% interval of the delta (points) that does not condition on the number of
  discordant images: Tango's score interval for the difference of two paired proportions
  (Tango 1998, Stat. Med. 17:891), the inversion of the score test whose value at 0 is the
  McNemar statistic. Why not the exact interval of ``b / (b + c)`` scaled by ``(b + c) / n``
  (0.3.x): it treats ``b + c`` as known, so a row that gained no image (``b = 0``, the usual
  compression step) got the observed drop as its lower end, and the interval covered the true
  delta about half the time (simulated). Tango's covers at about the nominal rate, losses-only
  rows included (``tests/report/test_stats_coverage.py`` simulates it).
- Consistency with the mark: the score test is a little more liberal than the exact McNemar test
  at small counts, so when ``p >= 0.05`` the interval is widened to reach 0 (only ever wider:
  coverage can only rise). An exact-McNemar rejection always lies outside Tango's interval (checked
  for every split of up to 3,000 discordant images), so the interval excludes 0 exactly when
  the delta is marked significant.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.optimize import brentq
from scipy.stats import binom, norm

ALPHA = 0.05
Z = float(norm.ppf(1 - ALPHA / 2))  # 1.959964


@dataclass(frozen=True)
class PairedDelta:
    """``row`` minus ``reference`` top-1, in points, with its uncertainty."""

    delta: float
    ci95: tuple[float, float]
    p_value: float
    only_row: int  # images only the row gets right (b)
    only_reference: int  # images only the reference gets right (c)
    n: int

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ci95": list(self.ci95), "significant": self.significant}

    def describe(self) -> str:
        """``-1.39 points, 95% CI [-2.50, -0.28], McNemar p=0.016: significant``."""
        lo, hi = self.ci95
        verdict = "significant" if self.significant else "within noise"
        return f"{self.delta:+.2f} points, 95% CI [{lo:+.2f}, {hi:+.2f}], McNemar p={self.p_value:.3g}: {verdict}"


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: P(as extreme a split of the b + c discordant images | no difference)."""
    n = b + c
    if n == 0:
        return 1.0
    return float(min(1.0, 2.0 * binom.cdf(min(b, c), n, 0.5)))


def paired_delta(correct_row: np.ndarray, correct_ref: np.ndarray) -> PairedDelta:
    """Delta (points) of two per-image correctness vectors on the same images, with CI and p-value."""
    a = np.asarray(correct_row, dtype=bool)
    r = np.asarray(correct_ref, dtype=bool)
    if a.shape != r.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired statistics need two non-empty vectors over the same images, got "
                         f"{a.shape} and {r.shape}")
    n = a.size
    diff = a.astype(np.int8) - r.astype(np.int8)  # +1 only the row right, -1 only the reference
    b, c = int((diff > 0).sum()), int((diff < 0).sum())
    return delta_from_counts(b, c, n)


def delta_from_counts(b: int, c: int, n: int) -> PairedDelta:
    """The :class:`PairedDelta` of ``b`` images only the row gets right and ``c`` only the reference, of ``n``."""
    if not (0 <= b and 0 <= c and b + c <= n and n > 0):
        raise ValueError(f"need 0 <= b, c and b + c <= n > 0, got b={b}, c={c}, n={n}")
    p = mcnemar_exact(b, c)
    lo, hi = tango_interval(b, c, n)
    if p >= ALPHA:  # not significant: the interval must reach 0 (see the module docstring)
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    return PairedDelta(delta=100.0 * (b - c) / n, ci95=(100.0 * lo, 100.0 * hi), p_value=p, only_row=b,
                       only_reference=c, n=n)


def _restricted_p21(b: int, c: int, n: int, d: float) -> float:
    """Maximum-likelihood P(only the reference right) given ``P(only row) - P(only ref) = d`` (Tango's closed form)."""
    A = 2.0 * n
    B = -b - c + (2.0 * n - b + c) * d
    C = -c * d * (1.0 - d)
    p = (-B + math.sqrt(max(B * B - 4.0 * A * C, 0.0))) / (2.0 * A)
    return min(max(p, max(0.0, -d)), (1.0 - d) / 2.0)


def score_statistic(b: int, c: int, n: int, d: float) -> float:
    """Tango's score statistic for H0: delta = ``d`` (a proportion, not points); 0 at the observed delta."""
    var = n * (2.0 * _restricted_p21(b, c, n, d) + d * (1.0 - d))
    num = b - c - n * d
    if var <= 0.0:
        return math.copysign(math.inf, num) if num else 0.0
    return num / math.sqrt(var)


def tango_interval(b: int, c: int, n: int, z: float = Z) -> tuple[float, float]:
    """Tango's 95% score interval of ``(b - c) / n`` (proportions): ``{d : |score(d)| <= z}``."""
    est = (b - c) / n
    edge = 1.0 - 1e-12

    def bound(target: float, a: float, e: float) -> float:
        f = lambda d: score_statistic(b, c, n, d) - target  # noqa: E731 (decreasing in d)
        fa, fe = f(a), f(e)
        if fa * fe > 0:  # the statistic never reaches the target inside [-1, 1]: the bound is the edge
            return e
        return float(brentq(f, a, e, xtol=1e-12))

    lo = bound(z, est, -edge) if est > -edge else -1.0
    hi = bound(-z, est, edge) if est < edge else 1.0
    return (min(lo, est), max(hi, est))


__all__ = ["ALPHA", "PairedDelta", "delta_from_counts", "mcnemar_exact", "paired_delta", "score_statistic",
           "tango_interval"]
