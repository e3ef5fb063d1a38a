"""Report document: gates, the versioned JSON schema, markdown and plots from synthetic rows."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from pipeline import registry
from pipeline.report import CONVENTION, SCHEMA_VERSION, apply_gates, build_report, render, validate_report
from pipeline.report.plots import draw_all

GATES = {"reduce_t": 3.0, "qat": 1.0, "unroll": 0.0, "onnx_fp32": 0.0, "onnx_int8": 1.0, "engine": 1.0, "total": 3.0}

BASELINE = registry.table().baseline_artifact()  # "train/best.pt"


def row(name, stage, backend, precision, T, top1, gate=None, parent=None, status="ok", preds=None, rates=True):
    """A measured row as ``pipeline.report.measure.measure`` returns it."""
    ok = status == "ok"
    return {
        "artifact": name, "stage": stage, "backend": backend, "precision": precision, "T": T, "status": status,
        "size_mb": 1.5 if ok else None, "parent": parent, "gate_key": gate, "notes": [], "top1": top1 if ok else None,
        "ships": backend in ("onnxruntime", "tensorrt"), "tied_top1": 0 if ok else None, "labels": None,
        "top5": None, "loss": 0.5 if ok else None, "n": 4 if ok else 0,
        "latency": {"batch": 1, "p50_ms": 2.0, "p95_ms": 3.0, "mean_ms": 2.2} if ok else None,
        "throughput": {"batch": 8, "images_per_s": 900.0} if ok else None,
        "benchmarks": [], "preds": torch.tensor(preds) if preds is not None else None,
        "firing_rates": {"stem.sn.lif": 0.2, "layer1.0.sn1.lif": 0.1} if ok and backend == "torch" and rates else None,
        "mean_firing_rate": 0.15 if ok and backend == "torch" and rates else None,
        "energy": {"energy_uj": 0.01, "energy_pj": 1e4, "macs": 100.0, "sops": 50.0, "dense_macs": 150.0,
                   "source": name} if ok else None,
        "layers": [{"name": "stem.conv.conv", "kind": "conv", "spike_driven": False, "macs": 100.0,
                    "input_rate": 0.9, "sops": 0.0, "energy_pj": 460.0}] if ok and backend == "torch" else None,
    }


def rows_fixture(qat_top1=74.0):
    return [
        row(BASELINE, "train", "torch", "fp32", 4, 75.0, preds=[0, 1, 2, 3]),
        row("reduce_t/t2.pt", "reduce_t", "torch", "fp32", 2, 74.5, "reduce_t", BASELINE, preds=[0, 1, 2, 0]),
        row("qat/qat.pt", "qat", "torch", "int8", 2, qat_top1, "qat", "reduce_t/t2.pt", preds=[0, 1, 0, 0]),
        row("unroll/int8.pt", "unroll", "torch", "int8", 2, qat_top1, "unroll", "qat/qat.pt", preds=[0, 1, 0, 0]),
        row("export/model_int8.onnx", "export", "onnxruntime", "int8", 2, qat_top1, "onnx_int8", "unroll/int8.pt",
            preds=[0, 1, 0, 0]),
        row("build/model_int8.engine", "build", "tensorrt", "int8", None, None, "engine", "export/model_int8.onnx",
            status="skipped: TensorRT is not installed"),
    ]


def make_doc(rows, failed, plots=()):
    return build_report(rows, run="tiny", dataset="digits", num_classes=10, test_images=4, created="2025-01-01T00:00:00",
                        pipeline_version="0.1.0", device="cpu", settings={"batch_sizes": [1, 8], "warmup": 1,
                        "iterations": 3, "threads": 1, "gate_reference": "parent", "gates": GATES},
                        baseline=BASELINE, energy_model={"e_mac_pj": 4.6, "e_ac_pj": 0.9, "convention": CONVENTION},
                        parity={"unroll/float": {"n": 4, "max_abs_diff": 1e-7, "top1_mismatches": 0,
                                                    "min_spike_agreement": 1.0, "spike_agreement": {"stem.sn.lif": 1.0}}}, failed=failed, plots=list(plots))


def test_gates_against_parent_and_baseline():
    rows = rows_fixture()
    failed = apply_gates(rows, GATES, BASELINE, "parent")
    by = {r["artifact"]: r for r in rows}
    assert failed == []  # qat drops 0.5 vs its parent t2 (74.5): within 1.0
    assert by["qat/qat.pt"]["gate"]["drop"] == pytest.approx(0.5)
    assert by["qat/qat.pt"]["delta"] == pytest.approx(-1.0)
    assert by["qat/qat.pt"]["agreement"] == pytest.approx(50.0)
    assert by[BASELINE]["gate"] is None and by[BASELINE]["delta"] == 0
    skipped = by["build/model_int8.engine"]
    assert skipped["gate"]["passed"] is None and skipped["delta"] is None

    rows = rows_fixture()
    failed = apply_gates(rows, GATES, BASELINE, "baseline")  # cumulative: every step is held to the float
    assert [f.split(":")[0] for f in failed] == ["unroll/int8.pt"]  # unroll=0 vs float fails; qat (1.0) holds
    rows = rows_fixture()
    failed = apply_gates(rows, dict(GATES, qat=-100.0), BASELINE, "parent")
    assert len(failed) == 1 and "qat/qat.pt" in failed[0] and "validate.gates.qat=-100" in failed[0]


def test_errored_gated_row_fails():
    rows = rows_fixture()
    rows[4] = row("export/model_int8.onnx", "export", "onnxruntime", "int8", 2, None, "onnx_int8", "unroll/int8.pt",
                  status="error: RuntimeError: bad graph")
    failed = apply_gates(rows, GATES, BASELINE)
    assert len(failed) == 2 and all("could not be checked" in f for f in failed)  # step and total gate


def test_report_json_schema_roundtrip_and_version():
    rows = rows_fixture()
    failed = apply_gates(rows, GATES, BASELINE)
    doc = json.loads(json.dumps(make_doc(rows, failed)))  # must be JSON-serialisable as is
    assert doc["schema_version"] == SCHEMA_VERSION == 5
    assert validate_report(doc) == []
    assert doc["gates"] == {"passed": True, "failed": []}
    assert set(doc["layers"]) == {BASELINE, "reduce_t/t2.pt", "qat/qat.pt", "unroll/int8.pt"}
    assert "preds" not in doc["rows"][0]

    bad = copy.deepcopy(doc)
    del bad["rows"][1]["top1"]
    bad["rows"][2]["backend"] = "tflite"
    bad["rows"][3]["gate"].pop("passed")
    errs = validate_report(bad)
    assert any("missing 'top1'" in e for e in errs)
    assert any("tflite" in e for e in errs)
    assert any("gate lacks passed" in e for e in errs)
    assert validate_report(dict(doc, schema_version=1))[0].startswith("schema_version is 1")
    bad = copy.deepcopy(doc)
    bad["rows"][4]["total_gate"].pop("stats")
    assert any("total_gate lacks stats" in e for e in validate_report(bad))


def test_markdown_and_plots(tmp_path):
    rows = rows_fixture(qat_top1=70.0)
    failed = apply_gates(rows, GATES, BASELINE)
    doc = make_doc(rows, failed)
    doc["plots"] = draw_all(doc, lambda plot: tmp_path / registry.file("validate", "plot", plot=plot))
    assert doc["plots"] == ["accuracy_vs_latency.png", "firing_rates.png", "accuracy_vs_T.png"]
    for name in doc["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = render(doc)
    header = next(l for l in md.splitlines() if l.startswith("| artifact"))
    for col in ("size MB", "top-1 %", "top-5 %", "delta", "agreement %", "p50 ms (b1)", "p95 ms (b1)",
                "img/s (b8)", "energy µJ/img*", "gate", "int8 ops executed", "int8 MACs %"):
        assert col in header
    assert "**FAIL** (qat: drop 4.50 > 1 vs reduce_t/t2.pt)" in md
    assert "**FAIL** (total: drop 5.00 > 3 vs train/best.pt)" in md  # the ONNX row, against the float
    assert "skipped: TensorRT is not installed" in md
    assert "**Gates: FAILED**" in md and "estimate" in md
    # 5 table headers; the artifact rows; 2 firing-rate layers + mean; 1 layer-ops row; 1 parity row; 1 spike row
    assert md.count("\n| ") == 5 + len(rows) + 3 + 1 + 1 + 1
    assert "| stem.sn.lif | 0.2000 | 0.2000 | 0.2000 | 0.2000 |" in md
    assert "| unroll/float | 4 | 1e-07 | 0 | 1 |" in md


def executed(int8_convs, convs, int8_matmuls=0, matmuls=0, share=None, reason="float kernels here"):
    """An executed dict as ``runner.executed_precision()`` returns it."""
    return {"int8_ops": int8_convs + int8_matmuls, "ops": convs + matmuls, "int8_convs": int8_convs, "convs": convs,
            "int8_mac_share": share, "conv_macs": 1e6, "int8_conv_macs": None, "kernels": {"Conv": convs},
            "source": "test", "float_reason": reason if int8_convs == 0 else None}


def test_executed_columns_and_fake_quant_label():
    rows = rows_fixture()
    by = {r["artifact"]: r for r in rows}
    by[BASELINE]["executed"] = executed(0, 19, share=0.0, reason="torch eager")
    by["unroll/int8.pt"]["executed"] = executed(0, 19, share=0.0, reason="torch eager runs fake-quant")
    by["export/model_int8.onnx"]["executed"] = executed(0, 70, 0, 18, share=0.0, reason="ORT runs DQ -> float Conv")
    ov = dict(by["export/model_int8.onnx"], artifact="export/model_int8.onnx@openvino", backend="openvino",
              executed=executed(68, 70, 35, 52, share=0.99998))
    rows.insert(5, ov)
    failed = apply_gates(rows, GATES, BASELINE)
    doc = json.loads(json.dumps(make_doc(rows, failed)))
    assert validate_report(doc) == []
    md = render(doc)
    lines = {l.split(" |")[0][2:]: l for l in md.splitlines() if l.startswith("| ")}
    assert "| int8 ops executed | int8 MACs % |" in lines["artifact"]
    assert lines["export/model_int8.onnx (**fake-quant**)"].startswith(
        "| export/model_int8.onnx (**fake-quant**) | onnxruntime | int8 | 0/88 | 0.0 |")
    assert "| openvino | int8 | 103/122 | 100.0 |" in lines["export/model_int8.onnx@openvino"]
    assert "| train/best.pt | torch | fp32 | 0/19 | 0.0 |" in lines[BASELINE]  # fp32 in float: no label
    assert "| qat/qat.pt | torch | int8 | - | - |" in lines["qat/qat.pt"]  # not measured: no claim either way
    assert "- `export/model_int8.onnx` (onnxruntime): ORT runs DQ -> float Conv." in md
    assert "- `unroll/int8.pt` (torch): torch eager runs fake-quant." in md
    assert md.count("**fake-quant**") == 3  # two rows and the explanation under the table
    bad = copy.deepcopy(doc)
    del bad["rows"][4]["executed"]["int8_mac_share"]
    assert any("executed lacks int8_mac_share" in e for e in validate_report(bad))
