"""Cache keys follow the bytes: a stage's key holds the digest of what its upstream stages wrote.

Fast tests on two plugin stages (tests/helpers/chain_stage.py) through the real runner; the same fault on
the real pipeline (train retrained with other bytes) is tests/e2e/test_stale_e2e.py.
"""
from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from pipeline import registry
from pipeline.cli import main as cli_main
from pipeline.config import load_config
from pipeline.registry import Output, StageSpec
from pipeline.runner import run_stage, run_store, stage_states, stale_reasons, upstream_digest
from tests.helpers import chain_stage

UP = StageSpec("up", (), ("up",), (
    Output("value", "value.txt", "report"),
    Output("history", "history.csv", "log"),
), "writes bytes", module="tests.helpers.chain_stage")
DOWN = StageSpec("down", ("up.value",), ("down",), (Output("copy", "copy.txt", "report"),),
                 "reads up's bytes", module="tests.helpers.chain_stage")


@pytest.fixture
def chain():
    chain_stage.NOISE[0], chain_stage.RUNS[:] = "", []
    with registry.temporary(UP, section={"factor": 2}), registry.temporary(DOWN, section={"factor": 1}):
        yield


def _states(cfg) -> dict[str, str]:
    return {name: state for name, state, _, _ in stage_states(cfg) if name in ("up", "down")}


def test_upstream_rerun_with_other_bytes_invalidates_downstream(chain, write_config):
    cfg = load_config(write_config())
    store = run_store(cfg)
    assert run_stage(cfg, "up") == "done" and run_stage(cfg, "down") == "done"
    assert run_stage(cfg, "down") == "cached"
    assert store.manifest("down").inputs == {"up": upstream_digest(store, "up")}

    chain_stage.NOISE[0] = "x"  # same config, other bytes (another thread count, another machine)
    assert run_stage(cfg, "up", force=True) == "done"
    assert _states(cfg) == {"up": "done", "down": "stale"}
    assert stale_reasons(cfg, "down") == ["upstream 'up' wrote other bytes"]
    res = CliRunner().invoke(cli_main, ["status", "--config", cfg["_source"]])
    assert re.search(r"^down\s+stale .*upstream 'up' wrote other bytes", res.output, re.M), res.output
    assert run_stage(cfg, "down") == "done"
    assert (store.stage_dir("down") / "copy.txt").read_text() == "2x"


def test_upstream_rerun_with_the_same_bytes_keeps_downstream(chain, write_config):
    """Records (logs, timings, history) differ on every run: they are not what ``down`` read."""
    cfg = load_config(write_config())
    run_stage(cfg, "up"), run_stage(cfg, "down")
    before = upstream_digest(run_store(cfg), "up")
    assert run_stage(cfg, "up", force=True) == "done"  # history.csv and stage.log now differ
    assert upstream_digest(run_store(cfg), "up") == before
    assert run_stage(cfg, "down") == "cached" and chain_stage.RUNS == ["up", "down", "up"]


def test_status_names_the_reason(chain, write_config):
    path = write_config()
    cfg = load_config(path)
    run_stage(cfg, "up"), run_stage(cfg, "down")
    store = run_store(cfg)
    assert stale_reasons(cfg, "down") == []
    assert stale_reasons(load_config(path, ["down.factor=5"]), "down") == ["config changed (down)"]
    assert stale_reasons(load_config(path, ["up.factor=5"]), "down") == ["upstream 'up' changed (config changed (up))"]
    (store.stage_dir("down") / "copy.txt").write_text("edited")
    assert stale_reasons(cfg, "down") == ["own outputs changed on disk: copy.txt"]
    res = CliRunner().invoke(cli_main, ["status", "--config", str(path)])
    assert re.search(r"^down\s+stale .*own outputs changed on disk: copy.txt", res.output, re.M), res.output


def test_a_full_disk_is_one_message_and_leaves_nothing(chain, write_config):
    """Issue 20 case 4, the runner's part: a write failure names the folder and the free space, and no
    temporary file or partial folder is left (a real torch.save under a file-size limit: test_disk_full.py)."""
    from pipeline.runner import StageError

    cfg = load_config(write_config())
    store = run_store(cfg)
    chain_stage.NOISE[0] = "disk full"
    with pytest.raises(StageError) as e:
        run_stage(cfg, "up")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"[up] no space left on the device writing {store.partial_dir('up') / 'value.txt'}: ")
    assert f"MB free on the disk of {store.root} (artifacts_dir)" in message
    assert "partial folder up.partial was removed" in message and "python -m pipeline.stage up --config" in message
    assert not store.partial_dir("up").exists() and not store.stage_dir("up").exists()
    assert [p.name for p in store.root.rglob("*") if "tmp" in p.name] == []


def test_killed_run_leftovers_are_shown_then_cleaned(chain, write_config):
    """Issue 20 case 5: a killed export's probe-* folder was committed into export/, and a killed --force
    run's partial folder stayed, unseen by status. Scratch now lives beside the stage folder; what a killed
    run leaves is listed by status and removed by the next run of the stage."""
    path = write_config()
    cfg = load_config(path)
    store = run_store(cfg)
    assert run_stage(cfg, "up") == "done"
    key = store.manifest("up").key
    killed_force = store.open_partial("up", key)  # a --force run killed mid-way
    (killed_force / "value.txt").write_text("half")
    probe = store.scratch_dir("up") / "probe-abc"
    probe.mkdir(parents=True)
    (probe / "probe.onnx").write_bytes(b"x" * 2_400_000)
    res = CliRunner().invoke(cli_main, ["status", "--config", str(path)])
    assert f"left by a killed run of up: {store.scratch_dir('up')} (2.4 MB)" in res.output, res.output
    assert f"left by a killed run of up: {killed_force} (0.0 MB)" in res.output, res.output

    assert run_stage(cfg, "up") == "cached"
    assert not store.scratch_dir("up").exists() and not killed_force.exists()
    assert "left by" not in CliRunner().invoke(cli_main, ["status", "--config", str(path)]).output

    # a run killed before its commit, by an older version that kept scratch in the partial folder
    store.remove("up")
    part = store.open_partial("up", key)
    (part / "probe-old").mkdir()
    (part / "probe-old" / "probe.onnx").write_text("graph")
    (part / ".value.txt.tmp-4242").write_text("half")
    assert run_stage(cfg, "up") == "done"
    assert not [p for p in store.root.rglob("*") if "probe" in p.name or "tmp" in p.name]
    assert set(store.manifest("up").outputs) == {"value.txt", "history.csv", "stage.log", "metrics.json"}


def test_ctrl_c_says_what_was_kept_and_how_to_resume(chain, write_config):
    """Issue 20 case 9: Ctrl-C printed only "Aborted!"."""
    path = write_config()
    store = run_store(load_config(path))
    chain_stage.NOISE[0] = "ctrl-c"
    res = CliRunner().invoke(cli_main, ["stage", "up", "--config", str(path)])
    assert res.exit_code == 130, res.output
    assert "Aborted!" not in res.output
    assert (f"[up] interrupted (Ctrl-C); finished stages are kept; its partial run is kept in "
            f"{store.partial_dir('up')}: the same command resumes it (python -m pipeline.stage up --config {path}")\
        in res.output, res.output
    assert (store.partial_dir("up") / "last.pt").is_file() and not (store.root / ".lock").exists()
