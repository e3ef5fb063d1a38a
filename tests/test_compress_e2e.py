"""train -> reduce_t -> qat through the real runner on the tiny digits config."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import load_model
from pipeline.compress.quantize import load_qat_model
from pipeline.config import load_config
from pipeline.runner import StageError, run_stage

pytestmark = pytest.mark.slow


def test_train_reduce_t_qat_end_to_end(write_config):
    # STAA on the last stage only and 64 test images: every code path, a third of the NNCF trace time
    path = write_config({"model": {"staa": {"placement": "last_k"}}, "data": {"limit_test": 64}})
    cfg = load_config(path)
    assert run_stage(cfg, "train") == "done"
    assert run_stage(cfg, "reduce_t") == "done"
    run_dir = Path(cfg["artifacts_dir"]) / "tiny"
    rdir = run_dir / "reduce_t"
    rm = json.loads((rdir / "metrics.json").read_text())
    assert rm["T0"] == 2 and [row["T"] for row in rm["table"]] == [1]
    row = rm["table"][0]
    assert 0 <= row["before_top1"] <= 100 and 0 <= row["after_top1"] <= 100 and row["file"] == "t1.pt"
    assert rm["chosen_T"] in (1, 2) and "| 1" in rm["table_md"]
    student, ck = load_model(rdir / "t1.pt")
    assert student.T == 1 and ck["reduce_t"]["after_top1"] == row["after_top1"]
    assert load_model(rdir / "chosen.pt")[0].T == rm["chosen_T"]
    assert not (rdir / "t1_fit").exists()
    manifest = json.loads((rdir / "manifest.json").read_text())
    assert {"t1.pt", "chosen.pt", "metrics.json"} <= set(manifest["outputs"])

    assert run_stage(cfg, "qat") == "done"
    qdir = run_dir / "qat"
    qm = json.loads((qdir / "metrics.json").read_text())
    assert qm["T"] == rm["chosen_T"]
    for key in ("float_top1", "ptq_top1", "qat_top1"):
        assert 0 <= qm[key] <= 100
    assert qm["neuron_internal_quantizers"] == 0 and qm["spike_quantizers"] > 0 and qm["weight_quantizers"] > 0
    assert qm["qdq_module_agreement"] >= 99.0
    assert (qdir / "nncf_config.json").is_file() and not (qdir / "ptq.pt").exists() and not (qdir / "qat_fit").exists()
    module, ckpt = load_qat_model(qdir / "qat.pt")
    with torch.no_grad():
        assert module(torch.rand(2, 1, 16, 16)).shape == (2, 10)

    bad = load_config(path, ["qat.keep_float=[no_such_layer]"])
    with pytest.raises(StageError, match="no_such_layer"):
        run_stage(bad, "qat")
