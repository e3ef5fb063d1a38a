"""train -> reduce_t -> qat through the real runner on the tiny digits config."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import load_model
from pipeline.compress.quantize import load_qat_model
from pipeline.compress.timesteps import choose_T
from pipeline.data import data_bundle, eval_loader
from pipeline.training.evaluate import evaluate
from pipeline.config import load_config
from pipeline.report.plots import TRAINING_CURVES, draw_training_curves
from pipeline.runner import StageError, run_stage
from pipeline.training.history import read_history

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
    assert row["file"] == "t1.pt" and "| 1" in rm["table_md"]
    # the choice is made on the validation split and reproducible from the recorded val scores
    assert rm["selected_on"] == "val" and rm["val_n"] > 0 and row["val_top1"] is not None
    gate = cfg["validate"]["gates"]["reduce_t"]
    assert rm["chosen_T"] == choose_T(rm["table"], 2, rm["baseline_val_top1"], gate)[0]
    student, ck = load_model(rdir / "t1.pt")
    assert student.T == 1 and ck["reduce_t"]["after_top1"] == row["after_top1"]
    # the reported test figure is the saved student's accuracy on the test split, nothing else
    bundle = data_bundle(cfg)
    test = evaluate(student, eval_loader(cfg, bundle.test, cfg["data"]["limit_test"]), progress=False)
    val = evaluate(student, eval_loader(cfg, bundle.val), progress=False)
    assert test["top1"] == row["after_top1"] and val["top1"] == row["val_top1"] and test["n"] == rm["test_n"]
    assert load_model(rdir / "chosen.pt")[0].T == rm["chosen_T"]
    assert not (rdir / "t1_fit").exists()
    manifest = json.loads((rdir / "manifest.json").read_text())
    assert {"t1.pt", "chosen.pt", "metrics.json"} <= set(manifest["outputs"])

    assert run_stage(cfg, "qat") == "done"
    qdir = run_dir / "qat"
    qm = json.loads((qdir / "metrics.json").read_text())
    assert qm["T"] == rm["chosen_T"]
    chosen_test = rm["baseline_top1"] if rm["chosen_T"] == 2 else row["after_top1"]
    assert qm["float_top1"] == chosen_test  # qat starts from exactly the chosen checkpoint
    assert qm["neuron_internal_quantizers"] == 0 and qm["spike_quantizers"] > 0 and qm["weight_quantizers"] > 0
    assert qm["qdq_module_agreement"] >= 99.0
    assert (qdir / "nncf_config.json").is_file() and not (qdir / "ptq.pt").exists() and not (qdir / "qat_fit").exists()
    module, ckpt = load_qat_model(qdir / "qat.pt")
    with torch.no_grad():
        assert module(torch.rand(2, 1, 16, 16)).shape == (2, 10)

    # training logs: one history.csv row per epoch run (and T), TensorBoard scalars, the curves plot
    hist = {s: read_history(run_dir / s / "history.csv") for s in ("train", "reduce_t", "qat")}
    assert [(r["epoch"], r["T"]) for r in hist["train"]] == [(1, 2), (2, 2)]
    assert [(r["epoch"], r["T"]) for r in hist["reduce_t"]] == [(1, 1)]
    assert [(r["epoch"], r["T"]) for r in hist["qat"]] == [(1, rm["chosen_T"])]
    assert [r["val_top1"] for r in hist["reduce_t"]] == [h["val_top1"] for h in row["history"]]
    assert all(r["train_loss"] > 0 and r["lr"] is not None and r["seconds"] > 0 for h in hist.values() for r in h)
    for s in ("train", "reduce_t", "qat"):
        assert list((run_dir / s / "tb").glob("events.out.tfevents.*")), s
    plots = run_dir / "plots"
    plots.mkdir()
    png = f"{TRAINING_CURVES}.png"
    assert draw_training_curves({s: run_dir / s / "history.csv" for s in hist}, plots / png) == png
    assert (plots / png).stat().st_size > 10_000

    bad = load_config(path, ["qat.keep_float=[no_such_layer]"])
    with pytest.raises(StageError, match="no_such_layer"):
        run_stage(bad, "qat")
