"""Fault injection on the real pipeline: train re-runs with other bytes, and nothing built from the
old weights survives as "cached" (issue 20, failure 1).

The fault: ``train/best.pt`` is truncated, and train re-runs on another thread count (other float
summation order, so other bytes under the same config). Before cache keys held the upstream bytes,
reduce_t .. validate all stayed cached and the report described weights that no longer existed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

STAGES = ("train", "reduce_t", "qat", "unroll", "export", "build", "validate")
LOOSE = {"validate": {"gates": {"reduce_t": 100.0, "qat": 100.0, "onnx_int8": 100.0, "total": 100.0}}}


def _cli(*args: str, threads: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=1500, env={**os.environ, "OMP_NUM_THREADS": str(threads)})


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_retrained_upstream_with_other_bytes_reruns_every_downstream_stage(write_config):
    path = write_config(LOOSE)
    run = path.parent / "artifacts" / "tiny"
    res = _cli("run", "--config", str(path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    best = run / "train" / "best.pt"
    old_sha = _sha(best)
    finished = {s: json.loads((run / s / "manifest.json").read_text())["finished_at"] for s in STAGES}

    with open(best, "r+b") as f:  # the fault: a damaged checkpoint
        f.truncate(best.stat().st_size // 2)
    res = _cli("status", "--config", str(path))
    assert re.search(r"^train\s+stale .*own outputs changed on disk: best.pt", res.stdout, re.M), res.stdout

    res = _cli("run", "--config", str(path), threads=2)  # retrained on 2 threads: other bytes
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert _sha(best) != old_sha, "the fault did not take: train wrote the same bytes on 2 threads"
    summary = next(line for line in res.stdout.splitlines() if line.startswith("run 'tiny':"))
    assert "cached" not in summary, summary  # every stage built from the old weights ran again
    for stage in STAGES:
        man = json.loads((run / stage / "manifest.json").read_text())
        assert man["finished_at"] != finished[stage], stage
    assert "[reduce_t] stale (upstream 'train' wrote other bytes)" in res.stderr + res.stdout

    res = _cli("status", "--config", str(path))
    rows = {line.split()[0]: line.split()[1] for line in res.stdout.splitlines()[2:]}
    assert rows == {"train": "done", "reduce_t": "done", "qat": "done", "unroll": "done", "export": "done",
                    "build": "skipped", "validate": "done"}, res.stdout
