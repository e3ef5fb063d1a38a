"""The real pipeline on a tiny causal-SA run through validate: accuracy vs steps, tau on validation, adaptive rows,
what ships, the plot and the metrics."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_causal_run_reports_accuracy_vs_steps_and_adaptive_rows(write_config):
    cfg = write_config({"model": {"T": 2, "staa": {"sa_mode": "causal"}}, "reduce_t": {"steps": [1], "choose": 2},
                        "data": {"limit_test": 100},
                        "validate": {"gates": {k: 100 for k in ("reduce_t", "qat", "unroll", "onnx_fp32", "onnx_int8",
                                                                "engine", "total")},
                                     "limit_test": None, "early_exit": {"latency_samples": 8}}}, name="causal")
    res = subprocess.run([sys.executable, "-m", "pipeline", "run", "--config", str(cfg)], cwd=REPO,
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    folder = cfg.parent / "artifacts" / "causal" / "validate"
    from pipeline.report import validate_report

    doc = json.loads((folder / "report.json").read_text())
    assert validate_report(doc) == []
    st = doc["steps"]
    curves = {(c["artifact"], c["backend"]): c for c in st["curves"] if c["status"] == "ok"}
    assert ("export/step_fp32.onnx", "onnxruntime") in curves and ("export/step_int8.onnx", "onnxruntime") in curves
    from pipeline.config import load_config
    from pipeline.data import data_bundle

    c = load_config(str(cfg))
    val_n = min(len(data_bundle(c).val), c["data"]["limit_test"])  # the validation split, as validate limits it
    assert val_n != doc["test_images"]  # the sizes tell the splits apart
    for t in st["tau"]:
        assert t["split"] == "validation" and t["T"] == 2 and t["n"] == val_n
    for a in st["adaptive"]:
        c = curves[(a["artifact"].replace(" (adaptive)", ""), a["backend"])]
        assert [r["steps"] for r in c["rows"]] == [1, 2]
        assert a["full_top1"] == c["rows"][-1]["top1"]  # step T of the curve = the full streaming graph
        assert 1 <= a["mean_steps"] <= a["max_steps"] <= 2 and a["n"] == doc["test_images"]
    # the FP32 step graph at T computes the unrolled FP32 graph (export's parity): the same top-1 up to a flip
    onnx_row = next(r for r in doc["rows"] if r["artifact"] == "export/model_fp32.onnx")
    assert abs(curves[("export/step_fp32.onnx", "onnxruntime")]["rows"][-1]["top1"] - onnx_row["top1"]) <= \
        100.0 / doc["test_images"] + 1e-9
    assert "onnxruntime" in doc["ships"] and (folder / "accuracy_vs_steps.png").is_file()
    md = (folder / "report.md").read_text()
    assert "## Accuracy vs steps" in md and "## Summary: what ships" in md
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["early_exit"]["tau"] and metrics["ships"] == doc["ships"]
    # what the export stage shipped for this causal model (the real NNCF INT8 graph): both step graphs, each
    # checked T steps against its unrolled graph on both runtimes, and both in the TensorRT static check
    export = folder.parent / "export"
    s = json.loads((export / "metrics.json").read_text())["streaming"]
    assert s["exported"] and s["sa_state_tensors"] == 17 and s["int8"]["sa_state_tensors"] == 17
    for m in (s, s["int8"]):
        for runtime in ("onnxruntime", "openvino"):
            assert m["parity_runtimes"][runtime]["spikes_differing"] == 0
    trt = json.loads((export / "trt_check.json").read_text())
    assert {"step_fp32.onnx", "step_int8.onnx"} <= set(trt["graphs"]) and trt["ok"]
