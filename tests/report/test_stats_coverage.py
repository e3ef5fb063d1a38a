"""The delta's 95% interval is a claim about coverage: checked by simulating test sets, not by consistency.

Each cell draws 2,000 test sets of ``n`` images in which the row gains an image over its
reference with probability ``gain`` and loses one with probability ``loss`` (the true delta is
``gain - loss``), and counts how often the reported interval holds the true delta. The grid
includes losses only (``gain = 0``: a compression step that only costs), where the 0.3.x
interval (exact on ``b / (b + c)``, scaled) covered about half the time.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from pipeline.report.stats import delta_from_counts, paired_delta

DRAWS = 2000
MIN_COVERAGE = 0.93  # nominal 0.95; 2,000 draws put the estimate within about 0.01 of the truth
GRID = [(n, gain, loss) for n in (100, 360, 2000)
        for gain, loss in ((0.0, 0.01), (0.0, 0.03), (0.002, 0.01), (0.01, 0.02), (0.02, 0.02), (0.05, 0.0))]


@functools.lru_cache(maxsize=None)
def _interval(b: int, c: int, n: int) -> tuple[float, float]:
    return delta_from_counts(b, c, n).ci95


def coverage(n: int, gain: float, loss: float, draws: int = DRAWS, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [gain, loss, 1.0 - gain - loss], size=draws)
    truth = 100.0 * (gain - loss)
    hits = 0
    for b, c, _ in counts:
        lo, hi = _interval(int(b), int(c), n)
        hits += lo - 1e-9 <= truth <= hi + 1e-9
    return hits / draws


@pytest.mark.parametrize("n,gain,loss", GRID)
def test_interval_covers_the_true_delta_at_the_nominal_rate(n, gain, loss):
    assert coverage(n, gain, loss) >= MIN_COVERAGE


def test_a_row_that_gained_nothing_is_not_bounded_by_its_observed_drop():
    """b = 0, c = 3 of 360: the observed drop is -0.83; the true one may well be larger."""
    ref = np.zeros(360, bool)
    ref[:300] = True
    row = ref.copy()
    row[:3] = False
    d = paired_delta(row, ref)
    assert d.only_row == 0 and d.only_reference == 3
    assert d.ci95[0] < d.delta - 1.0  # a paired bootstrap gives about [-1.94, 0.00]
    assert d.ci95[1] >= 0 and not d.significant
    # Tango's own upper end (not merely widened to 0): three losses do not rule out a small gain
    assert 0.1 < d.ci95[1] < 0.5 and -3.0 < d.ci95[0] < -2.0, d.ci95


def test_an_identical_row_still_has_an_interval_of_its_sampling_error():
    d = delta_from_counts(0, 0, 360)
    assert d.delta == 0 and d.ci95[0] < -0.5 and d.ci95[1] > 0.5


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="b \\+ c <= n"):
        delta_from_counts(5, 6, 10)
