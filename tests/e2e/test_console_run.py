"""A whole run of the CLI with its output redirected (what CI and `make all > log` see).

The console must stay short and plain: the project's own lines, a few per stage, no carriage
returns (progress frames), no third-party INFO (NNCF's) or torch's own stderr lines; and each
stage's stage.log must still hold everything (every epoch, NNCF's INFO lines).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from pipeline import registry
from tests.conftest import REPO

pytestmark = pytest.mark.slow

STAGES = registry.names()
MAX_LINES = 60  # the whole run, 7 stages (measured 50 here, 11 of them validate's rows)


def test_redirected_run_console_is_short_and_plain_and_logs_keep_everything(write_config, tmp_path):
    path = write_config({"train": {"epochs": 4, "max_batches": 1},
                         # a tiny model's INT8 drop is noise: loose gates so that the run ends in exit 0
                         "validate": {"gates": {"reduce_t": 100.0, "qat": 100.0, "onnx_int8": 100.0, "total": 100.0}}})
    log_file = tmp_path / "console.txt"
    with log_file.open("w") as out:  # a file, not a terminal (and not a pipe that pytest reads)
        res = subprocess.run([sys.executable, "-m", "pipeline", "run", "--config", str(path)], cwd=REPO,
                             stdout=out, stderr=subprocess.STDOUT, timeout=1200,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = log_file.read_text()
    lines = text.splitlines()
    assert res.returncode == 0, text
    assert "\r" not in text and "━" not in text, text  # no tqdm or rich progress frames
    assert not [ln for ln in lines if ln.startswith("INFO:") or "nncf" in ln.lower()], text
    assert not [ln for ln in lines if re.match(r"[IWE]\d{4} \d\d:\d\d", ln)], text  # torch's own stderr handler
    assert len(lines) <= MAX_LINES, f"{len(lines)} console lines:\n{text}"
    # per-epoch lines: the console shows the first, an evenly spaced one and the last; the log keeps all
    shown = [ln for ln in lines if " train epoch " in ln]
    assert [re.search(r"epoch (\d+)/4", ln).group(1) for ln in shown] == ["1", "2", "4"], text
    run = tmp_path / "artifacts" / "tiny"
    train_log = (run / "train" / "stage.log").read_text()
    assert all(f"train epoch {e}/4" in train_log for e in range(1, 5))
    assert "reduce_t T=1 epoch 1/1" in (run / "reduce_t" / "stage.log").read_text()
    qat_log = (run / "qat" / "stage.log").read_text()
    assert "qat epoch 1/1" in qat_log and " INFO nncf: " in qat_log  # NNCF's INFO lines: here, not on the console
    for stage in STAGES:
        assert f"[{stage}] done" in text or f"[{stage}] skipped" in text, stage
        assert (run / stage / "stage.log").is_file()
