"""The validate stage: every artifact gets a row, gates fail the run after the report is written."""
from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys

import pytest
import torch

from conftest import REPO

IMPOSSIBLE = "validate.gates.qat=-100"
# validate.gates.reduce_t is part of reduce_t's cache key (it picks the T handed to qat): keep it
# fixed across the two calls so that the second one re-runs validate only
LOOSE_REDUCE_T = "validate.gates.reduce_t=100"


def _fake_run(tmp_path, write_config):
    """A run folder with a firing float baseline, a reduced-T copy, an unrolled module, its ONNX
    export and a skipped build: every backend except TensorRT, no training (seconds, not minutes)."""
    from pipeline.checkpoint import model_payload, save_atomic
    from pipeline.config import load_config
    from pipeline.deploy.graphs.onnx_export import export_onnx, write_metadata
    from tests.helpers import firing_model
    from pipeline.deploy.graphs.unroll import FLOAT_RECIPE, UnrolledInfo, save_unrolled, unroll_float
    from pipeline.registry import spec
    from pipeline.runner import StageContext, run_store
    from pipeline.data import data_bundle, data_meta, model_config

    cfg = load_config(str(write_config({"validate": {"limit_test": 16, "batch_sizes": [1, 4], "iterations": 2}})), ())
    bundle = data_bundle(cfg)
    mcfg, meta = model_config(cfg, bundle), data_meta(bundle)
    x = torch.stack([bundle.test[i][0] for i in range(16)])
    model = firing_model(mcfg, x)
    dirs = {s: tmp_path / "up" / s for s in ("train", "reduce_t", "unroll", "export", "build")}
    for d in dirs.values():
        d.mkdir(parents=True)
    save_atomic(model_payload(model, mcfg, meta), dirs["train"] / "best.pt")
    t1 = copy.deepcopy(model).set_time_steps(1)
    save_atomic(model_payload(t1, mcfg, meta), dirs["reduce_t"] / "t1.pt")
    (dirs["reduce_t"] / "metrics.json").write_text(json.dumps({"chosen_T": 1}))
    flat = unroll_float(model)
    save_unrolled(dirs["unroll"] / "float.pt", flat, UnrolledInfo("float", 2, mcfg, meta, True, FLOAT_RECIPE))
    parity = {"n": 32, "max_abs_diff": 1e-8, "top1_mismatches": 0, "min_spike_agreement": 1.0,
              "spike_agreement": {"stem.sn.lif": 1.0}}
    (dirs["unroll"] / "metrics.json").write_text(json.dumps({"T": 2, "float": {"parity": parity}}))
    onnx_path = export_onnx(flat, (x[:2],), dirs["export"] / "model_fp32.onnx", opset=17)
    write_metadata(onnx_path, {"T": "2", "precision": "fp32"})
    (dirs["build"] / "manifest.json").write_text(json.dumps(
        {"status": "skipped", "reason": "TensorRT is not installed", "metrics": {"precisions": ["fp16", "int8"]}}))
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(cfg=cfg, spec=spec("validate"), out=out, inputs=dirs, store=run_store(cfg), device="cpu",
                       log=logging.getLogger("test.validate"))
    return ctx


def test_validate_stage_rows_report_and_gates(tmp_path, write_config):
    from pipeline.report import validate_report
    from stages import validate

    ctx = _fake_run(tmp_path, write_config)  # 16 test images, batch sizes 1 and 4
    ctx.cfg["validate"]["gates"].update(reduce_t=-100.0, onnx_fp32=100.0)  # reduced T must fail, ONNX pass
    result = validate.run(ctx)
    doc = json.loads((ctx.out / "report.json").read_text())
    assert validate_report(doc) == []
    rows = {r["artifact"]: r for r in doc["rows"]}
    assert list(rows) == ["train/best.pt", "reduce_t/t1.pt", "unroll/float.pt", "export/model_fp32.onnx",
                          "export/model_fp32.onnx@openvino", "build/model_fp16.engine", "build/model_int8.engine"]
    base, onnx = rows["train/best.pt"], rows["export/model_fp32.onnx"]
    assert base["status"] == "ok" and base["delta"] == 0 and base["agreement"] == 100
    assert [b["batch"] for b in base["benchmarks"]] == [1, 4] and base["throughput"]["batch"] == 4
    assert base["latency"]["batch"] == 1 and base["delta_stats"] is None  # the baseline is not compared to itself
    assert base["firing_rates"] and base["energy"]["energy_uj"] > 0 and doc["layers"]["train/best.pt"]
    assert rows["unroll/float.pt"]["agreement"] == 100  # same weights, BN folded: same predictions
    assert onnx["backend"] == "onnxruntime" and onnx["T"] == 2 and onnx["ships"]
    # the row's figures are ONNX Runtime's own argmax on the same 16 test images, ties counted
    import onnxruntime as ort
    from pipeline.data import data_bundle

    bundle = data_bundle(ctx.cfg)
    x = torch.stack([bundle.test[i][0] for i in range(16)]).numpy()
    y = torch.tensor([bundle.test[i][1] for i in range(16)]).numpy()
    sess = ort.InferenceSession(str(ctx.inputs["export"] / "model_fp32.onnx"), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert onnx["top1"] == 100.0 * (logits.argmax(1) == y).mean() and onnx["n"] == 16
    assert onnx["tied_top1"] == int(((logits == logits.max(1, keepdims=True)).sum(1) > 1).sum())
    assert onnx["energy"]["source"] == "unroll/float.pt" and onnx["firing_rates"] is None
    assert onnx["gate"]["passed"] and onnx["gate"]["reference"] == "unroll/float.pt"
    # a deployable graph is held against the float baseline too; the torch rows are not
    assert onnx["total_gate"]["reference"] == "train/best.pt" and rows["unroll/float.pt"]["total_gate"] is None
    assert onnx["delta_stats"]["n"] == 16 and len(onnx["delta_stats"]["ci95"]) == 2
    # the same graph compiled by OpenVINO: same gate and parent, true FP32, measured like the ONNX Runtime row
    ov = rows["export/model_fp32.onnx@openvino"]
    assert ov["backend"] == "openvino" and ov["status"] == "ok" and ov["ships"] and ov["n"] == 16
    assert ov["gate"]["passed"] and ov["gate"]["reference"] == "unroll/float.pt" and ov["gate"]["name"] == "onnx_fp32"
    assert ov["total_gate"]["reference"] == "train/best.pt" and ov["agreement"] == onnx["agreement"]
    assert ov["energy"]["source"] == "unroll/float.pt" and [b["batch"] for b in ov["benchmarks"]] == [1, 4]
    # every measured row says what its runtime executed; FP32 graphs ran no integer kernel
    for r in (base, onnx, ov, rows["unroll/float.pt"]):
        assert r["executed"]["int8_ops"] == 0 and r["executed"]["ops"] > 0, r["artifact"]
    assert onnx["executed"]["convs"] == ov["executed"]["convs"] and "optimised graph" in onnx["executed"]["source"]
    summary = result.metrics["artifacts"]
    assert summary["export/model_fp32.onnx@openvino"]["int8_ops"] == 0
    assert summary["export/model_fp32.onnx"]["ops"] == onnx["executed"]["ops"]
    assert summary["export/model_fp32.onnx"]["int8_mac_share"] == 0.0
    eng = rows["build/model_int8.engine"]
    assert eng["status"] == "skipped: TensorRT is not installed" and eng["gate"]["passed"] is None
    assert eng["executed"] is None
    assert rows["reduce_t/t1.pt"]["gate"]["passed"] is False
    assert result.failed_gates and "reduce_t/t1.pt" in result.failed_gates[0]
    assert doc["gates"]["passed"] is False and doc["parity"]["unroll/float"]["max_abs_diff"] == 1e-8
    for name in ("report.md", "accuracy_vs_latency.png", "firing_rates.png", "accuracy_vs_T.png"):
        assert (ctx.out / name).stat().st_size > 0
    md = (ctx.out / "report.md").read_text()
    assert "**FAIL** (reduce_t" in md and "| stem.sn.lif | 1 |" in md and "gate (total)" in md
    assert "int8 ops executed" in md and "fake-quant" not in md.split("\n\n*int8 ops executed*")[0]


def _cli(*args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_pipeline_end_to_end_gate_failure_exit_code(write_config):
    """The real pipeline on TINY: an impossible gate writes the report, then exits 1; the same command
    again still exits 1 and names the gate (the recorded verdict, not re-measured); `status` says
    failed; lifting every gate (a config change) re-runs only validate and exits 0."""
    cfg = write_config()
    res = _cli("pipeline", "run", "--config", str(cfg), "--set", IMPOSSIBLE, "--set", LOOSE_REDUCE_T)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "gate failed" in res.stderr and "qat/qat.pt" in res.stderr
    folder = cfg.parent / "artifacts" / "tiny" / "validate"
    for name in ("report.md", "report.json", "accuracy_vs_latency.png", "firing_rates.png", "accuracy_vs_T.png"):
        assert (folder / name).is_file(), name
    from pipeline.report import validate_report

    doc = json.loads((folder / "report.json").read_text())
    assert validate_report(doc) == []
    qat = next(r for r in doc["rows"] if r["artifact"] == "qat/qat.pt")
    assert qat["gate"]["passed"] is False and doc["gates"]["passed"] is False
    backends = {r["backend"] for r in doc["rows"] if r["status"] == "ok"}
    assert {"torch", "onnxruntime"} <= backends
    stamp = (folder / "report.json").stat().st_mtime_ns

    for again in (("pipeline", "run"), ("pipeline.stage", "validate")):  # a failed verdict stays failed
        res = _cli(*again, "--config", str(cfg), "--set", IMPOSSIBLE, "--set", LOOSE_REDUCE_T)
        assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
        assert "qat/qat.pt" in res.stderr and "not re-measured" in res.stderr
    assert (folder / "report.json").stat().st_mtime_ns == stamp
    res = _cli("pipeline", "status", "--config", str(cfg), "--set", IMPOSSIBLE, "--set", LOOSE_REDUCE_T)
    line = next(l for l in res.stdout.splitlines() if l.startswith("validate"))
    assert line.split()[1] == "failed" and "gate(s) failed" in line

    sets = [a for g in ("qat", "unroll", "onnx_fp32", "onnx_int8", "engine", "total")
            for a in ("--set", f"validate.gates.{g}=100")] + ["--set", LOOSE_REDUCE_T]
    res = _cli("pipeline.stage", "validate", "--config", str(cfg), *sets)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads((folder / "report.json").read_text())
    assert doc["gates"]["passed"] is True
