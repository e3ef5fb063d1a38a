"""A damaged resume checkpoint (``train.partial/last.pt``): one message that says exactly what to run,
and that command works (issue 20, case 6: a 59-line traceback whose advice, --force, failed the same way)."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from pipeline.cli import stage_main
from pipeline.config import load_config
from pipeline.registry import spec
from pipeline.runner import StageError, run_stage, run_store, stage_key


def test_damaged_last_pt_says_what_to_run_and_force_starts_afresh(write_config):
    path = write_config({"train": {"epochs": 1, "max_batches": 1}})
    cfg = load_config(path)
    store = run_store(cfg)
    part = store.open_partial("train", stage_key(cfg, spec("train"), store))
    (part / "last.pt").write_bytes(b"PK\x03\x04 half a zip, cut by a full disk")

    with pytest.raises(StageError) as e:
        run_stage(cfg, "train")
    message = str(e.value)
    assert "\n" not in message
    assert f"cannot resume the interrupted run from {part / 'last.pt'}: it is damaged" in message
    command = message.rsplit(": ", 1)[1]
    assert command == f"python -m pipeline.stage train --config {path} --force", message
    assert (part / "last.pt").is_file()  # kept until the user says otherwise

    res = CliRunner().invoke(stage_main, command.split()[3:])  # exactly what it said
    assert res.exit_code == 0, res.output
    assert not part.exists() and store.state("train", stage_key(cfg, spec("train"), store)) == "done"


def test_the_command_it_names_keeps_the_set_overrides(write_config, tmp_path):
    """A run made with ``--set`` (here another artifacts_dir): the named command must address that run,
    not the one the bare config file describes (issue 20 re-run: it dropped the overrides, so --force
    started a 15-epoch run in ./artifacts and left the damaged partial where it was)."""
    path = write_config({"train": {"epochs": 1, "max_batches": 1}})
    other = tmp_path / "elsewhere"
    cfg = load_config(path, [f"artifacts_dir={other}"])
    store = run_store(cfg)
    part = store.open_partial("train", stage_key(cfg, spec("train"), store))
    (part / "last.pt").write_bytes(b"PK\x03\x04 half a zip, cut by a full disk")

    with pytest.raises(StageError) as e:
        run_stage(cfg, "train")
    command = str(e.value).rsplit(": ", 1)[1]
    assert command == f"python -m pipeline.stage train --config {path} --set artifacts_dir={other} --force", command

    res = CliRunner().invoke(stage_main, command.split()[3:])  # exactly what it said
    assert res.exit_code == 0, res.output
    assert not part.exists() and store.state("train", stage_key(cfg, spec("train"), store)) == "done"
    assert not (tmp_path / "artifacts").exists()  # the config file's own folder was never touched
