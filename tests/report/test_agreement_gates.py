"""Identity rows are gated on changed predictions, not on net top-1 (issue 18, item 3)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.report.gates import allowed_changes, apply_gates
from pipeline.schema import SCHEMA, defaults

GATES = defaults(SCHEMA["validate"]["gates"])
CHANGED = defaults(SCHEMA["validate"]["changed"])
N = 360


def _row(name: str, preds: np.ndarray, labels: np.ndarray, logits: np.ndarray | None = None, **kw) -> dict:
    return {"artifact": name, "status": "ok", "top1": 100.0 * float((preds == labels).mean()),
            "preds": torch.from_numpy(preds), "labels": torch.from_numpy(labels), "logits": logits, "gate_key": kw.get("gate"), "parent": kw.get("parent"),
            "identity_key": kw.get("identity"), "identity_parent": kw.get("identity_parent"), "ships": False}


def _pair(changed_better: int, changed_worse: int) -> list[dict]:
    labels = np.zeros(N, dtype=np.int64)
    base = np.where(np.arange(N) < 300, 0, 1)  # 300 right
    row = base.copy()
    row[300:300 + changed_better] = 0  # wrong -> right
    row[:changed_worse] = 2  # right -> wrong
    return [_row("train/best.pt", base, labels),
            _row("unroll/float.pt", row, labels, gate="unroll", parent="train/best.pt", identity="unroll")]


def test_a_net_zero_row_that_changes_ten_predictions_fails_its_identity_gate():
    rows = _pair(5, 5)
    failed = apply_gates(rows, GATES, "train/best.pt", changed=CHANGED)
    check = rows[1]["agreement_gate"]
    assert rows[1]["gate"]["passed"] is True  # net top-1: 0 points, the accuracy gate cannot see it
    assert check["changed"] == 10 and check["passed"] is False and check["max_changed"] == 1
    assert len(check["changed_images"]) == 10 and any("10 of 360 test predictions differ" in f for f in failed)


def test_an_identical_row_passes_and_lists_nothing():
    rows = _pair(0, 0)
    assert apply_gates(rows, GATES, "train/best.pt", changed=CHANGED) == []
    assert rows[1]["agreement_gate"]["changed"] == 0 and rows[1]["agreement_gate"]["changed_images"] == []


def test_allowed_changes_round_up_to_whole_images_and_zero_means_identity():
    assert allowed_changes(0.25, 2000) == 5 and allowed_changes(0.25, 360) == 1
    assert allowed_changes(0.0, 2000) == 0 and allowed_changes(0.1, 1000) == 1


def test_openvino_int8_row_is_held_to_the_files_exact_numbers():
    """Changed predictions vs ONNX Runtime on the same file, and the logit difference recorded (gated when set)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, N)
    exact = rng.normal(size=(N, 10))
    ov = exact.copy()
    ov[:4] += rng.normal(scale=0.7, size=(4, 10))  # four images off by up to ~0.7, as issue 18 measured
    rows = [_row("train/best.pt", exact.argmax(1), labels, exact),
            _row("unroll/int8.pt", exact.argmax(1), labels, exact),
            _row("export/model_int8.onnx", exact.argmax(1), labels, exact, gate="onnx_int8",
                 parent="unroll/int8.pt", identity="onnx_int8", identity_parent="unroll/int8.pt"),
            _row("export/model_int8.onnx@openvino", ov.argmax(1), labels, ov, gate="onnx_int8",
                 parent="unroll/int8.pt", identity="runtime_int8", identity_parent="export/model_int8.onnx")]
    apply_gates(rows, GATES, "train/best.pt", changed=CHANGED)
    check = rows[3]["agreement_gate"]
    assert check["reference"] == "export/model_int8.onnx"
    assert check["max_logit_diff"] == pytest.approx(float(np.abs(ov - exact).max()))
    assert check["changed"] == int((ov.argmax(1) != exact.argmax(1)).sum())
    top2 = np.sort(exact, axis=1)[:, -2:]
    for c in check["changed_images"]:  # each changed image listed with the reference's own top-2 margin
        assert ov[c["index"]].argmax() == c["pred"] != c["reference_pred"] == exact[c["index"]].argmax()
        assert c["reference_margin"] == pytest.approx(top2[c["index"], 1] - top2[c["index"], 0])
    failed = apply_gates(rows, GATES, "train/best.pt", changed=CHANGED, max_logit_diff={"runtime_int8": 0.1})
    assert rows[3]["agreement_gate"]["passed"] is False and any("logits max |diff|" in f for f in failed)
