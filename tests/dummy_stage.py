"""A stage that exists only for tests/test_registry.py: its registry row plus this module is all it takes.

``RUNS`` counts real executions, so a test can tell a cached run (not re-executed) from a fresh one.
"""
from __future__ import annotations

from pipeline.runner import StageContext, StageResult

RUNS: list[int] = []


def run(ctx: StageContext) -> StageResult:
    factor = int(ctx.cfg["dummy"]["factor"])
    ctx.output("value").write_text(str(2 * factor))
    RUNS.append(factor)
    return StageResult(metrics={"value": 2 * factor})
