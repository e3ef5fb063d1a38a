"""configs/nmnist.yaml through every stage on real N-MNIST recordings, shipping a multi-step model.

The config's own T (8), reduce_t.steps ([4, 2]) and STAA settings, with a CPU-sized schedule set
through ``--set`` (width 1/8, a few batches; about 3 minutes on 2 shared cores). What it proves:
an event model carried 8 -> 4 -> 2 reloads strictly in reduce_t, goes through QAT, unrolling
(parity gates), export (parity gates) and validation, and what ships runs at the chosen T >= 2.

The accuracy gates (reduce_t, qat, onnx_int8, total) are opened wide here, the FP32 gates
(unroll at 0, onnx_fp32 at 0.5 points: under one image of this split) are not: 900 training recordings and a few-minute schedule reach about
35-55% top-1 (a plain LIF net the same; measured), where one image of the 100-image test split
is a point, so those verdicts would test the schedule's noise, not the pipeline.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.checkpoint import load_model
from tests.conftest import REPO, shared_file

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]

SCHEDULE = [
    "model.width=0.125", "data.batch_size=16", "data.eval_batch_size=100", "train.threads=1",
    "train.epochs=3", "train.max_batches=20", "train.warmup_epochs=0", "train.lr=0.01",
    "reduce_t.epochs=1", "reduce_t.max_batches=5",
    "qat.epochs=1", "qat.max_batches=3", "qat.calibration_samples=64",
    "unroll.parity_images=32", "export.parity_images=32",
    "validate.batch_sizes=[1, 8]", "validate.warmup=1", "validate.iterations=3",
    "validate.gates.reduce_t=100", "validate.gates.qat=100", "validate.gates.onnx_int8=100",
    "validate.gates.total=100",
]


def test_nmnist_config_runs_every_stage_and_ships_T_at_least_2(tmp_path: Path):
    events = shared_file("nmnist_small_events.npz")
    sets = SCHEDULE + [f"artifacts_dir={tmp_path / 'artifacts'}", f"data.train_file={events}",
                       f"data.cache_dir={tmp_path / 'frames'}"]
    cmd = [sys.executable, "-m", "pipeline", "run", "--config", str(REPO / "configs" / "nmnist.yaml")]
    for item in sets:
        cmd += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, f"pipeline run exited {proc.returncode}:\n{tail}"

    run_dir = tmp_path / "artifacts" / "nmnist"
    reduce_t = json.loads((run_dir / "reduce_t" / "metrics.json").read_text())
    assert reduce_t["T0"] == 8 and sorted(row["T"] for row in reduce_t["table"]) == [2, 4]
    assert reduce_t["chosen_T"] >= 2, reduce_t.get("choice_reason")
    for T in (4, 2):  # step attention kept its T=8 width: both reload strictly at their own T
        assert load_model(run_dir / "reduce_t" / f"t{T}.pt")[0].T == T
    report = json.loads((run_dir / "validate" / "report.json").read_text())
    assert report["gates"]["passed"] is True, report["gates"]
    shipped = [r for r in report["rows"] if r["ships"] and r["status"] == "ok"]
    assert shipped, [(r["artifact"], r["status"]) for r in report["rows"]]
    assert all(r["T"] == reduce_t["chosen_T"] >= 2 for r in shipped), [(r["artifact"], r["T"]) for r in shipped]
    exact = {r["artifact"]: (r["gate"] or {}).get("passed") for r in report["rows"]
             if r["artifact"] in ("unroll/float.pt", "export/model_fp32.onnx")}
    assert exact == {"unroll/float.pt": True, "export/model_fp32.onnx": True}, exact
    print(f"\nchosen T={reduce_t['chosen_T']} ({reduce_t.get('choice_reason')}); report rows:")
    for r in report["rows"]:
        print({k: r.get(k) for k in ("artifact", "backend", "precision", "T", "top1", "status")},
              {k: (r.get(k) or {}).get("passed") for k in ("gate", "total_gate")})
