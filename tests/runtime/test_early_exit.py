"""Accuracy vs steps, adaptive time steps (early exit) and what ships.

The step graph here is built by hand (onnx.helper) so that every per-step logit is a known constant
(the frame itself): the exit step of each sample is then known exactly, in ONNX Runtime and OpenVINO.
"""
from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from pipeline.report.steps import accuracy_vs_steps, adaptive_scores, choose_ships, choose_tau, exit_at
from pipeline.runtime.backends import get_backend
from pipeline.runtime.stream import confidence, open_step_graph

K, T = 3, 4


def _hand_step_graph(path, T=T, K=K):
    """logits_step = the frame ([B, K, 1, 1], flattened); u_out.0 = u_in.0 + 1 (a step counter); step is read (Cast) but unused."""
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", K, 1, 1]),
              helper.make_tensor_value_info("step", TensorProto.INT64, [1]),
              helper.make_tensor_value_info("u_in.0", TensorProto.FLOAT, ["B", 1])]
    outputs = [helper.make_tensor_value_info("logits_step", TensorProto.FLOAT, ["B", K]),
               helper.make_tensor_value_info("u_out.0", TensorProto.FLOAT, ["B", 1])]
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    nodes = [helper.make_node("Cast", ["step"], ["stepf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["stepf", "zero"], ["nothing"]),
             helper.make_node("Flatten", ["input"], ["flat"], axis=1),
             helper.make_node("Add", ["flat", "nothing"], ["logits_step"]),
             helper.make_node("Add", ["u_in.0", "one"], ["u_out.0"])]
    graph = helper.make_graph(nodes, "hand_step", inputs, outputs, initializer=[one, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in {"T": str(T), "state_shapes": json.dumps([[1]]), "sa_state_shapes": "[]", "precision": "fp32"}.items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# per-step logits of 3 samples over T=4 steps ([B, T, K]); running means decide the exit
X = np.array([
    [[4.0, 0, 0], [4, 0, 0], [4, 0, 0], [4, 0, 0]],        # confident from step 1
    [[0.5, 0, 0], [3.5, 0, 0], [0, 0, 0], [0, 0, 0]],      # running mean (2,0,0) at step 2
    [[0, 0.1, 0], [0, 0.1, 0], [0, 0.1, 0], [0, 0.1, 0]],  # never confident: runs all T steps
], np.float32)[..., None, None]  # events [B, T, C=K, H=1, W=1]


def _running(x):
    x = x.reshape(*x.shape[:3])
    return np.cumsum(x.transpose(1, 0, 2), axis=0) / np.arange(1, x.shape[1] + 1)[:, None, None]


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_early_exit_runner_stops_each_sample_at_its_step_on_a_hand_built_graph(tmp_path, backend):
    ok, reason = get_backend(backend).is_available()
    if not ok:
        pytest.skip(reason)
    path = _hand_step_graph(tmp_path / "step.onnx")
    stepper = open_step_graph(path, get_backend(backend).runner(path))
    assert stepper.T == T and list(stepper.state_shapes) == ["u_in.0"]
    tau = float(confidence(np.array([2.0, 0, 0])))  # exactly the confidence of a running mean (2, 0, 0)
    logits, steps = stepper.run_early_exit(X, tau, "softmax")
    assert steps.tolist() == [1, 2, 4]
    np.testing.assert_allclose(logits, [[4, 0, 0], [2, 0, 0], [0, 0.1, 0]], atol=1e-6)
    # batch 1: the loop really stops (the membrane counter says how many step calls ran)
    _, s = stepper.run_early_exit(X[:1], tau, "softmax")
    assert s.tolist() == [1] and float(stepper.state["u_in.0"][0, 0]) == 1.0 and stepper.t == 1
    _, s = stepper.run_early_exit(X[1:2], tau, "softmax")
    assert s.tolist() == [2] and stepper.t == 2
    # the numpy rule the report scores with gives the same steps and predictions as the loop
    running = stepper.running_means(X)
    np.testing.assert_allclose(running, _running(X), atol=1e-6)
    e_steps, e_preds = exit_at(running, tau, "softmax")
    assert e_steps.tolist() == steps.tolist() and e_preds.tolist() == logits.argmax(1).tolist()
    # the margin criterion stops on the top-1 minus top-2 probability
    _, s = stepper.run_early_exit(X, float(confidence(np.array([2.0, 0, 0]), "margin")), "margin")
    assert s.tolist() == [1, 2, 4]


def test_accuracy_vs_steps_at_T_equals_the_full_streaming_graph(tmp_path):
    path = _hand_step_graph(tmp_path / "step.onnx")
    stepper = open_step_graph(path, get_backend("onnxruntime").runner(path))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, T, K, 1, 1)).astype(np.float32)
    y = rng.integers(0, K, 40)
    full = stepper.run(x)  # the clip logits: mean over T steps
    curve = accuracy_vs_steps(stepper.running_means(x), y)
    assert [r["steps"] for r in curve] == [1, 2, 3, 4]
    assert curve[-1]["top1"] == pytest.approx((full.argmax(1) == y).mean() * 100) and curve[-1]["stats"] is None
    step1 = (x[:, 0, :, 0, 0].argmax(1) == y)
    assert curve[0]["top1"] == pytest.approx(step1.mean() * 100)
    b = int((step1 & ~(full.argmax(1) == y)).sum())
    assert curve[0]["stats"]["only_row"] == b and curve[0]["stats"]["n"] == 40


def _logits_for(correct_first: np.ndarray, confident: np.ndarray) -> np.ndarray:
    """T=2 running means for N samples of 2 classes (label 0): step 1 right/wrong and confident or not, step 2 right."""
    n = len(correct_first)
    r = np.zeros((2, n, 2))
    r[0, :, 0] = np.where(correct_first, 1.0, -1.0) * np.where(confident, 3.0, 0.2)
    r[1, :, 0] = 1.0
    return r


def test_tau_is_chosen_on_validation_not_on_test():
    """Val: confident step-1 answers are right (a low tau exits early at no cost); test: they are wrong. The
    chosen tau is val's, and the test split only scores it (it shows the drop the choice brings there)."""
    n = 20
    conf = np.arange(n) < 10  # half the samples are confident at step 1
    val = _logits_for(np.ones(n, bool), conf)
    test = _logits_for(~conf, conf)  # confident ones wrong at step 1: on test the best tau is "never"
    y = np.zeros(n, int)
    chosen = choose_tau(val, y, max_drop=1.0)
    test_best = choose_tau(test, y, max_drop=1.0)
    assert chosen["split"] == "validation" and chosen["tau"] is not None
    assert chosen["mean_steps"] == pytest.approx(1.0)  # every val sample exits at step 1 (all right there)
    assert test_best["tau"] is None  # test would keep all T steps: the two splits disagree
    scored = adaptive_scores(test, y, chosen["tau"])
    assert scored["mean_steps"] < 2 and scored["top1"] < scored["full_top1"]
    assert scored["stats"]["only_reference"] == int(conf.sum())


def test_tau_ties_go_to_the_larger_tau_and_respect_the_drop():
    n = 10
    r = _logits_for(np.ones(n, bool), np.ones(n, bool))  # all confident and right at step 1
    y = np.zeros(n, int)
    c = choose_tau(r, y, max_drop=0.0)
    assert c["mean_steps"] == 1.0 and c["tau"] == pytest.approx(float(confidence(r[0, 0])))  # the largest that works
    wrong = _logits_for(np.zeros(n, bool), np.ones(n, bool))
    assert choose_tau(wrong, y, max_drop=50.0)["tau"] is None  # exiting early would cost 100 points
    assert math.isclose(choose_tau(wrong, y, max_drop=100.0)["mean_steps"], 1.0)


def test_what_ships_is_the_fastest_row_passing_its_gates():
    ok = {"passed": True}
    rows = [{"artifact": "export/model_fp32.onnx", "backend": "onnxruntime", "precision": "fp32", "T": 4, "top1": 90.0,
             "ships": True, "latency": {"batch": 1, "p50_ms": 2.0}, "gate": ok, "total_gate": ok},
            {"artifact": "export/model_int8.onnx", "backend": "onnxruntime", "precision": "int8", "T": 4, "top1": 80.0,
             "ships": True, "latency": {"batch": 1, "p50_ms": 1.0}, "gate": {"passed": False}, "total_gate": ok},
            {"artifact": "train/best.pt", "backend": "torch", "precision": "fp32", "T": 4, "top1": 91.0,
             "ships": False, "latency": {"batch": 1, "p50_ms": 0.1}}]
    adaptive = [{"artifact": "export/step_fp32.onnx (adaptive)", "backend": "onnxruntime", "precision": "fp32",
                 "mean_steps": 1.5, "top1": 89.5, "p50_ms": 1.2, "tau": 0.9, "criterion": "softmax",
                 "gate": ok, "total_gate": ok},
                {"artifact": "export/step_int8.onnx (adaptive)", "backend": "openvino", "precision": "int8",
                 "mean_steps": 1.5, "top1": 70.0, "p50_ms": 0.5, "tau": 0.9, "criterion": "softmax",
                 "gate": {"passed": False}, "total_gate": ok}]
    ships = choose_ships(rows, adaptive, model_T=4)
    assert set(ships) == {"onnxruntime"}  # openvino's only row fails its gate; torch rows never ship
    assert ships["onnxruntime"]["artifact"] == "export/step_fp32.onnx (adaptive)" and ships["onnxruntime"]["kind"] == "adaptive"
    rows[0]["T"] = 2
    adaptive[0]["p50_ms"] = 3.0
    assert choose_ships(rows, adaptive, model_T=4)["onnxruntime"]["kind"] == "reduced-T"


def test_predict_takes_the_exit_from_the_flag_or_from_the_report(tmp_path, capsys):
    from pipeline.runtime.__main__ import main

    path = _hand_step_graph(tmp_path / "step_fp32.onnx")
    samples = tmp_path / "samples.npz"
    np.savez(samples, x=X, y=np.array([0, 0, 1]))
    tau = float(confidence(np.array([2.0, 0, 0])))
    assert main(["predict", str(path), "--samples", str(samples), "--early-exit", str(tau)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mean_steps"] == pytest.approx(7 / 3) and out["max_steps"] == 4 and out["top1"] == pytest.approx(100.0)
    assert main(["predict", str(path), "--samples", str(samples)]) == 0  # no exit: all T steps
    assert json.loads(capsys.readouterr().out)["mean_steps"] == T
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"steps": {"tau": [
        {"artifact": "export/step_fp32.onnx", "backend": "onnxruntime", "tau": 0.999, "criterion": "margin"}]}}))
    assert main(["predict", str(path), "--samples", str(samples), "--exit-from", str(report)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["early_exit"] == {"tau": 0.999, "criterion": "margin"} and out["mean_steps"] > 1
    report.write_text(json.dumps({"steps": {"skipped": "step attention (SA) mixes all T steps"}}))
    assert main(["predict", str(path), "--samples", str(samples), "--exit-from", str(report)]) == 2
    assert "mixes all T steps" in capsys.readouterr().err


def test_build_engines_sh_builds_the_int8_step_engine_with_the_sa_state_shapes(tmp_path):
    """The registry's step_engine_int8 row plans step_int8.engine from export's step_int8.onnx; its trtexec
    command gives every state input (membranes and causal SA histories) the batch profile, the step index none."""
    from pipeline.deploy.packaging.bundle import engine_specs
    from pipeline.deploy.packaging.trt_script import parse_script, render_script, validate_args
    from stages.build import engine_plan

    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", K, 1, 1]),
              helper.make_tensor_value_info("step", TensorProto.INT64, [1]),
              helper.make_tensor_value_info("u_in.0", TensorProto.FLOAT, ["B", 1]),
              helper.make_tensor_value_info("sa_in.0", TensorProto.FLOAT, ["B", 5, T])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("logits_step", "u_out.0", "sa_out.0")]
    nodes = [helper.make_node("Flatten", ["input"], ["logits_step"], axis=1),
             helper.make_node("Identity", ["u_in.0"], ["u_out.0"]), helper.make_node("Identity", ["sa_in.0"], ["sa_out.0"])]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "step_int8.onnx"))
    plan = engine_plan()
    assert ("step_int8", "step_int8.onnx", "int8") in plan
    build = {"precisions": ["fp16", "int8"], "min_batch": 1, "opt_batch": 4, "max_batch": 16, "workspace_mb": 256,
             "fp32_neurons": False}
    specs = engine_specs(tmp_path, build, plan)
    assert [s.name for s in specs] == ["step_int8"]
    (args,) = parse_script(render_script(specs))
    assert validate_args(args) == [], args
    flags = dict(a.partition("=")[::2] for a in args)
    assert flags["--saveEngine"] == "step_int8.engine" and "--stronglyTyped" in flags
    assert flags["--minShapes"] == f"input:1x{K}x1x1,u_in.0:1x1,sa_in.0:1x5x{T}"
    assert flags["--maxShapes"] == f"input:16x{K}x1x1,u_in.0:16x1,sa_in.0:16x5x{T}"


def test_tau_ties_in_mean_steps_go_to_the_larger_tau():
    """T=3, every sample right and more confident at step 1 (logit 3) than at step 2 (logit 2): both confidences
    exit every sample at step 1; the larger (the more careful exit) is chosen."""
    n = 6
    r = np.zeros((3, n, 2))
    r[0, :, 0], r[1, :, 0], r[2, :, 0] = 3.0, 2.0, 1.0
    c = choose_tau(r, np.zeros(n, int), max_drop=0.0)
    assert c["mean_steps"] == 1.0 and c["candidates"] == 3
    assert c["tau"] == pytest.approx(float(confidence(np.array([3.0, 0.0]))))


def _doc_with_steps(tmp_path):
    from pipeline.report import build_report

    rng = np.random.default_rng(1)
    val, test = rng.normal(size=(T, 30, K)), rng.normal(size=(T, 40, K))
    yv, yt = rng.integers(0, K, 30), rng.integers(0, K, 40)
    choice = choose_tau(val, yv, 3.0)
    sc = adaptive_scores(test, yt, choice["tau"])
    lat = {"batch": 1, "p50_ms": 1.0, "p95_ms": 2.0, "mean_ms": 1.2, "samples": 5, "mean_steps": sc["mean_steps"]}
    row = {"artifact": "export/step_fp32.onnx (adaptive)", "backend": "onnxruntime", "precision": "fp32", "status": "ok",
           "T": T, "n": 40, **{k: sc[k] for k in ("tau", "criterion", "mean_steps", "max_steps", "top1", "full_top1",
                                                 "stats")},
           "p50_ms": 1.0, "latency": lat, "full_latency": dict(lat, p50_ms=2.0),
           "gate": {"name": "reduce_t", "max_drop": 3.0, "reference": "x", "reference_top1": sc["full_top1"],
                    "drop": sc["full_top1"] - sc["top1"], "passed": True, "stats": None}, "total_gate": None}
    steps = {"criterion": "softmax", "adaptive": [row],
             "curves": [{"artifact": "export/step_fp32.onnx", "backend": "onnxruntime", "precision": "fp32",
                         "status": "ok", "T": T, "n": 40, "rows": accuracy_vs_steps(test, yt)}],
             "tau": [{"artifact": "export/step_fp32.onnx", "backend": "onnxruntime", "precision": "fp32", **choice}]}
    return build_report([], run="r", dataset="d", num_classes=K, test_images=40, created="now", pipeline_version="0",
                        device="cpu", settings={"batch_sizes": [1], "warmup": 1, "iterations": 1, "threads": 1, "gate_reference": "parent",
                                                "gates": {}}, baseline="train/best.pt", energy_model={"convention": "estimate"}, parity={},
                        failed=[], plots=[], steps=steps, ships=choose_ships([], [row], T))


def test_report_carries_accuracy_vs_steps_adaptive_rows_and_what_ships(tmp_path):
    import copy

    from pipeline.report import render, validate_report
    from pipeline.report.plots import accuracy_vs_steps as plot

    doc = _doc_with_steps(tmp_path)
    assert validate_report(doc) == []
    json.dumps(doc, allow_nan=False)  # strict JSON: no inf for "never exit"
    bad = copy.deepcopy(doc)
    bad["steps"]["tau"][0]["split"] = "test"
    assert any("validation split" in e for e in validate_report(bad))
    bad = copy.deepcopy(doc)
    bad["steps"]["curves"][0]["rows"].pop(0)
    assert any("expected 1" in e for e in validate_report(bad))
    md = render(doc)
    assert "## Summary: what ships" in md and "## Accuracy vs steps" in md and "## Adaptive time steps" in md
    assert md.count("\n| 4 |") == 1 and "export/step_fp32.onnx (adaptive)" in md
    assert plot(doc, tmp_path / "a.png") and (tmp_path / "a.png").stat().st_size > 0
    skipped = dict(doc, steps={"skipped": "step attention (SA) mixes all T steps"}, ships={})
    assert validate_report(skipped) == [] and "Skipped: step attention (SA) mixes all T steps" in render(skipped)
    assert not plot(skipped, tmp_path / "b.png")
