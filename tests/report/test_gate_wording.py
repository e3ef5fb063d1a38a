"""A failed gate's message says "above" for a gain and "below" for a drop (issue 20, case 9: it said
"-0.28 points below" where QAT was 0.28 points above its parent, under a gate that demanded a gain)."""
from __future__ import annotations

from pipeline import registry
from pipeline.report import apply_gates
from tests.report.test_report import GATES, rows_fixture

BASELINE = registry.table().baseline_artifact()


def _qat_failure(qat_top1: float, gate: float) -> str:
    failed = apply_gates(rows_fixture(qat_top1=qat_top1), dict(GATES, qat=gate), BASELINE, "parent")
    return next(f for f in failed if f.startswith("qat/qat.pt"))


def test_a_gain_short_of_a_demanded_gain_says_above():
    msg = _qat_failure(74.75, -1.0)  # 0.25 above its parent (reduce_t/t2.pt, 74.5%)
    assert "top-1 74.75% is 0.25 points above reduce_t/t2.pt (74.50%)" in msg, msg
    assert "less than the gain of 1 points that validate.gates.qat=-1 demands" in msg
    assert "-0." not in msg.split(" (")[0]


def test_a_drop_over_the_gate_says_below():
    msg = _qat_failure(70.5, 1.0)
    assert "top-1 70.50% is 4.00 points below reduce_t/t2.pt (74.50%), more than validate.gates.qat=1 allows" in msg
