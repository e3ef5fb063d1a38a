"""A stage that exists only for tests/orchestration/test_registry.py: its registry row plus this module is all it takes.

``RUNS`` counts real executions, so a test can tell a cached run (not re-executed) from a fresh one.
A value above ``GATE`` fails the stage's gate (a failed verdict: tests/report/test_failed_verdict.py).
"""
from __future__ import annotations

from pipeline.runner import StageContext, StageResult

RUNS: list[int] = []
GATE = 100


def run(ctx: StageContext) -> StageResult:
    factor = int(ctx.cfg["dummy"]["factor"])
    value = 2 * factor
    ctx.output("value").write_text(str(value))
    RUNS.append(factor)
    failed = [f"dummy: value {value} > {GATE}"] if value > GATE else []
    return StageResult(metrics={"value": value}, failed_gates=failed)
