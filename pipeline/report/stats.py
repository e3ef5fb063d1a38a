"""Is a top-1 difference between two artifacts real, or noise? Paired statistics on the same images.

Why paired: every row of the report is scored on the same test images, so the difference of
two rows is carried only by the images on which exactly one of them is right (``b``: only the
row is right, ``c``: only the reference is). Treating the two top-1 figures as independent
samples would make the interval several times too wide; ignoring the sampling altogether (as a
bare delta does) presents one image's flip (0.28 points of 360) as a gain.

- ``p_value``: the exact two-sided McNemar test (binomial on the discordant pairs); the delta is
  *significant* when ``p < 0.05``, and *noise* otherwise.
- ``ci95``: the matching 95% interval of the delta (points): the exact (Clopper-Pearson) interval
  of the share of discordant images that favour the row, scaled to points. It is the inversion
  of the same exact test, so the interval excludes 0 exactly when ``p < 0.05`` (a bootstrap
  interval can disagree with the test at the boundary, and a report must not say both).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import beta

ALPHA = 0.05


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
    k = min(b, c)
    log_half = n * math.log(0.5)
    tail = sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half)
               for i in range(k + 1))
    return min(1.0, 2.0 * tail)


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
    delta = 100.0 * (b - c) / n
    return PairedDelta(delta=delta, ci95=_exact_interval(b, c, n), p_value=mcnemar_exact(b, c), only_row=b,
                       only_reference=c, n=n)


def _exact_interval(b: int, c: int, n: int) -> tuple[float, float]:
    """95% interval of ``100 * (b - c) / n`` given the ``b + c`` discordant images (Clopper-Pearson)."""
    d = b + c
    if d == 0:
        return (0.0, 0.0)
    lo = float(beta.ppf(ALPHA / 2, b, c + 1)) if b > 0 else 0.0
    hi = float(beta.ppf(1 - ALPHA / 2, b + 1, c)) if c > 0 else 1.0
    scale = 100.0 * d / n
    return (scale * (2 * lo - 1), scale * (2 * hi - 1))


__all__ = ["ALPHA", "PairedDelta", "mcnemar_exact", "paired_delta"]
