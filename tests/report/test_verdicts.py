"""Verdicts that cannot be fooled: paired statistics, tie-free top-1, total gates, failures that stay failed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.artifacts import Manifest, RunStore
from pipeline.report.gates import apply_gates
from pipeline.report.report_md import render
from pipeline.report.stats import mcnemar_exact, paired_delta
from pipeline.training.evaluate import count_tied_top1, evaluate

GATES = {"reduce_t": 3.0, "qat": 1.0, "unroll": 0.0, "onnx_fp32": 0.0, "onnx_int8": 1.0, "engine": 1.0, "total": 3.0}


def test_mcnemar_exact_matches_the_binomial_tail():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 2 * P(X <= 0), X ~ Bin(5, 1/2)
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)
    assert mcnemar_exact(50, 50) == 1.0


def test_one_image_of_360_is_noise_and_a_real_drop_is_significant():
    ref = np.zeros(360, bool)
    ref[:300] = True
    gain = ref.copy()
    gain[300] = True  # one more image right: +0.28 points
    d = paired_delta(gain, ref)
    assert d.delta == pytest.approx(100 / 360) and d.only_row == 1 and d.only_reference == 0
    assert not d.significant and d.ci95[0] <= 0 <= d.ci95[1]
    drop = ref.copy()
    drop[:20] = False  # 20 images lost, none gained
    d = paired_delta(drop, ref)
    assert d.significant and d.ci95[1] < 0 and d.delta == pytest.approx(-2000 / 360)
    with pytest.raises(ValueError, match="same images"):
        paired_delta(ref, ref[:10])


def test_interval_and_test_agree_on_every_split_of_discordant_images():
    """The report never shows an interval that excludes 0 next to a 'within noise' mark, or the reverse."""
    n = 400
    for b in range(0, 25):
        for c in range(0, 25):
            row, ref = np.zeros(n, bool), np.zeros(n, bool)
            row[:b] = True
            ref[b:b + c] = True
            d = paired_delta(row, ref)
            lo, hi = d.ci95
            assert lo <= d.delta <= hi
            assert (lo > 0 or hi < 0) == d.significant, (b, c, d)


def test_top1_is_the_first_index_of_the_maximum_and_ties_are_counted():
    logits = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [3.0, 0.0, 3.0], [0.0, 0.0, 5.0]])
    labels = torch.tensor([1, 1, 2, 2])
    res = evaluate(lambda x: logits, [(torch.zeros(4, 1), labels)], progress=False)
    # rows 0 and 2 tie; argmax takes the first index (0) there, so only rows 1 and 3 are right
    assert res["preds"].tolist() == [0, 1, 0, 2] and res["top1"] == 50.0
    assert res["tied_top1"] == 2 == count_tied_top1(logits)
    assert res["labels"].tolist() == labels.tolist()


def _row(name: str, correct: np.ndarray, **kw) -> dict:
    labels = np.zeros(len(correct), dtype=np.int64)
    preds = np.where(correct, 0, 1)
    return {"artifact": name, "status": "ok", "top1": 100.0 * correct.mean(), "preds": torch.from_numpy(preds),
            "labels": torch.from_numpy(labels), "gate_key": kw.get("gate"), "parent": kw.get("parent"),
            "ships": kw.get("ships", False)}


def test_total_gate_catches_losses_that_every_step_gate_allows():
    n = 1000
    base = np.ones(n, bool)
    steps = []
    lost = 0
    for name, gate, parent, drop in (("reduce_t/t2.pt", "reduce_t", "train/best.pt", 25),
                                     ("qat/qat.pt", "qat", "reduce_t/t2.pt", 10),
                                     ("export/model_int8.onnx", "onnx_int8", "qat/qat.pt", 10)):
        lost += drop
        c = base.copy()
        c[:lost] = False
        steps.append(_row(name, c, gate=gate, parent=parent, ships=name.endswith(".onnx")))
    rows = [_row("train/best.pt", base)] + steps
    failed = apply_gates(rows, GATES, "train/best.pt")
    onnx = rows[-1]
    assert all(r["gate"]["passed"] for r in rows[1:])  # each step is within its own tolerance
    assert onnx["total_gate"]["passed"] is False and onnx["total_gate"]["drop"] == pytest.approx(4.5)
    assert rows[1]["total_gate"] is None  # torch checkpoints do not ship
    assert len(failed) == 1 and "validate.gates.total=3" in failed[0] and "significant" in failed[0]
    assert onnx["delta_stats"]["significant"] and onnx["delta_stats"]["ci95"][1] < 0


def test_report_marks_noise_and_shows_both_gates():
    base = np.zeros(360, bool)
    base[:300] = True
    plus_one = base.copy()
    plus_one[300] = True
    rows = [_row("train/best.pt", base), _row("export/model_fp32.onnx", plus_one, gate="onnx_fp32",
                                              parent="train/best.pt", ships=True)]
    apply_gates(rows, GATES, "train/best.pt")
    for r in rows:
        r.update(backend="onnxruntime" if r["ships"] else "torch", precision="fp32", T=2, size_mb=1.0, top5=None,
                 notes=[], tied_top1=3, latency=None, throughput=None, energy=None)
    doc = {"run": "r", "dataset": "d", "num_classes": 10, "test_images": 360, "device": "cpu",
           "pipeline_version": "x", "created": "now", "baseline": {"artifact": "train/best.pt", "top1": rows[0]["top1"]},
           "settings": {"batch_sizes": [1], "warmup": 1, "iterations": 1, "threads": 1, "gate_reference": "parent",
                        "gates": GATES},
           "energy_model": {"convention": "estimate"}, "rows": rows, "gates": {"passed": True, "failed": []}}
    md = render(doc)
    line = next(l for l in md.splitlines() if l.startswith("| export/model_fp32.onnx"))
    assert "+0.28 [" in line and "] ~" in line  # a one-image gain is marked as noise
    assert "pass (onnx_fp32" in line and "pass (total" in line and "| 3 |" in line


def test_a_failed_verdict_is_a_state_of_its_own(tmp_path):
    store = RunStore(tmp_path, "run")
    part = store.open_partial("validate", "k1")
    (part / "report.md").write_text("x")
    store.commit("validate", Manifest(stage="validate", key="k1", status="failed", failed_gates=["qat: too low"]))
    assert store.state("validate", "k1") == "failed"
    assert store.state("validate", "k2") == "stale"  # a config change re-runs it
    assert store.manifest("validate").failed_gates == ["qat: too low"]
