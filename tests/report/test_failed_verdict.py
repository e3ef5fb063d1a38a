"""A failed verdict stands: the runner repeats it without running the stage again (fast, through the real runner).

The dummy stage (tests/helpers/dummy_stage.py) fails its gate when its value exceeds ``GATE``; ``RUNS`` counts how often it
really ran, so a re-measured verdict (the stage executed again for an unchanged config) shows as an extra run.
"""
from __future__ import annotations

import pytest

from pipeline import registry
from pipeline.config import load_config
from pipeline.runner import GateFailed, run_stage, run_store
from tests.helpers import dummy_stage
from tests.orchestration.test_registry import DUMMY


@pytest.fixture
def dummy():
    dummy_stage.RUNS.clear()
    with registry.temporary(DUMMY, section={"factor": 2}):
        yield DUMMY


def test_a_failed_verdict_is_repeated_not_re_measured(dummy, write_config):
    path = write_config({"dummy": {"factor": 60}})
    cfg = load_config(path)
    with pytest.raises(GateFailed, match="value 120 > 100"):
        run_stage(cfg, "dummy")
    assert dummy_stage.RUNS == [60]
    man = run_store(cfg).manifest("dummy")
    assert man.status == "failed" and man.failed_gates == ["dummy: value 120 > 100"]

    with pytest.raises(GateFailed, match="value 120 > 100") as again:
        run_stage(cfg, "dummy")
    assert dummy_stage.RUNS == [60], f"the failed stage ran again ({dummy_stage.RUNS}): its verdict was re-measured"
    assert "not re-measured" in str(again.value) and man.finished_at in str(again.value)

    with pytest.raises(GateFailed):  # --force re-measures on purpose
        run_stage(cfg, "dummy", force=True)
    assert dummy_stage.RUNS == [60, 60]
    assert run_stage(load_config(path, ["dummy.factor=3"]), "dummy") == "done"  # a changed config measures afresh
    assert dummy_stage.RUNS == [60, 60, 3]
