"""The static TensorRT check: each rule on a deliberately broken hand-made graph, and clean exports."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pipeline.deploy.proofs.trt_check import TRT10_SUPPORTED_OPS, check_model, write_reports

TINY_MODEL = {"arch": "resnet19", "width": 0.125, "T": 1, "num_classes": 10, "in_channels": 1}


def qdq_conv_graph(*, act_zp: int = 0, w_scale_per_tensor: bool = False, w_axis: int = 0, dims=("batch", 3, 8, 8),
                   extra_nodes=(), q_without_zp: bool = False, opset: int = 18) -> onnx.ModelProto:
    """input -> Q/DQ -> Conv(weight: W -> Q/DQ per channel) -> Relu -> output, TensorRT-clean by default."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w_scale = np.float32(0.02) if w_scale_per_tensor else (np.abs(w).reshape(4, -1).max(1) / 127).astype(np.float32)
    zeros = np.int8(0) if w_scale_per_tensor else np.zeros(4, np.int8)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.asarray(w_scale), "w_scale"),
             numpy_helper.from_array(np.asarray(zeros), "w_zp"), numpy_helper.from_array(np.asarray(np.float32(0.05)), "a_scale"),
             numpy_helper.from_array(np.asarray(np.int8(act_zp)), "a_zp")]
    q_inputs = ["input", "a_scale"] if q_without_zp else ["input", "a_scale", "a_zp"]
    nodes = [
        helper.make_node("QuantizeLinear", q_inputs, ["xq"], name="act_q"),
        helper.make_node("DequantizeLinear", ["xq", "a_scale", "a_zp"], ["xd"], name="act_dq"),
        helper.make_node("QuantizeLinear", ["W", "w_scale", "w_zp"], ["wq"], name="w_q", axis=w_axis),
        helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zp"], ["wd"], name="w_dq", axis=w_axis),
        helper.make_node("Conv", ["xd", "wd"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["output"], name="relu"),
        *extra_nodes,
    ]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, list(dims))
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4, 8, 8])
    extra_outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for n in extra_nodes for o in n.output]
    graph = helper.make_graph(nodes, "g", [x], [y, *extra_outputs], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def rules_at(report, node: str) -> set[str]:
    return {v.rule for v in report.violations if v.node == node}


def test_clean_qdq_graph_passes():
    report = check_model(qdq_conv_graph(), "clean")
    assert report.ok, report.summary()
    assert report.quantized
    onnx.checker.check_model(qdq_conv_graph(), full_check=True)  # the fixture itself is valid ONNX


def test_loop_is_reported_with_its_node_name():
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)])
    loop = helper.make_node("Loop", ["", "", "output"], ["looped"], name="time_loop", body=body)
    report = check_model(qdq_conv_graph(extra_nodes=[loop]), "loop")
    assert "control_flow" in rules_at(report, "time_loop")


def test_non_zero_zero_point_is_reported_on_q_and_dq():
    report = check_model(qdq_conv_graph(act_zp=3), "zp")
    assert "qdq_zero_point" in rules_at(report, "act_q")
    assert "qdq_zero_point" in rules_at(report, "act_dq")
    assert not rules_at(report, "w_dq")


def test_quantize_without_zero_point_is_uint8():
    report = check_model(qdq_conv_graph(q_without_zp=True), "uint8")
    assert "qdq_type" in rules_at(report, "act_q")


def test_per_tensor_weight_scale_is_reported_where_per_channel_is_required():
    report = check_model(qdq_conv_graph(w_scale_per_tensor=True), "per_tensor")
    assert "weight_per_channel" in rules_at(report, "w_dq")
    assert any("per-tensor" in v.message and "out_channels=4" in v.message for v in report.violations)
    assert not rules_at(report, "act_dq")  # activations are per-tensor by design


def test_weight_scale_on_the_wrong_axis():
    w = qdq_conv_graph(w_axis=1)
    report = check_model(w, "axis")
    assert "weight_per_channel" in rules_at(report, "w_dq")


def test_dynamic_non_batch_dim_is_reported_at_its_consumer():
    report = check_model(qdq_conv_graph(dims=("batch", 3, "height", 8)), "dyn")
    assert rules_at(report, "act_q") == {"dynamic_dims"}
    assert "axis 2" in report.violations[0].message
    assert check_model(qdq_conv_graph(dims=("batch", 3, 8, 8))).ok  # the batch alone may be dynamic


def test_unsupported_and_custom_ops_are_reported():
    unique = helper.make_node("Unique", ["output"], ["uniq"], name="unique_op")
    custom = helper.make_node("SpikeFire", ["output"], ["fired"], name="custom_op", domain="com.example")
    report = check_model(qdq_conv_graph(extra_nodes=[unique, custom]), "ops")
    assert "op_supported" in rules_at(report, "unique_op")
    assert "op_supported" in rules_at(report, "custom_op")
    assert "Unique" not in TRT10_SUPPORTED_OPS and "GreaterOrEqual" in TRT10_SUPPORTED_OPS


def test_opset_outside_tensorrt_10_range():
    report = check_model(qdq_conv_graph(opset=22), "new_opset")
    assert "opset" in report.by_rule()


def test_report_json(tmp_path):
    reports = [check_model(qdq_conv_graph(), "clean"), check_model(qdq_conv_graph(act_zp=1), "bad")]
    data = write_reports(reports, tmp_path / "trt_check.json")
    on_disk = json.loads((tmp_path / "trt_check.json").read_text())
    assert data == on_disk and not on_disk["ok"]
    assert on_disk["graphs"]["clean"]["ok"] and not on_disk["graphs"]["bad"]["ok"]
    assert {v["node"] for v in on_disk["graphs"]["bad"]["violations"]} == {"act_q", "act_dq"}


def test_clean_exported_snn_graphs_pass(tmp_path):
    """The real exports (float and Q/DQ) of an unrolled SNN pass every rule."""
    from pipeline.deploy.graphs.onnx_export import export_onnx
    from pipeline.deploy.graphs.unroll import unroll_float, unroll_qat
    from tests.helpers import firing_model, quantize_convs

    x = torch.randn(4, 1, 16, 16)
    model = firing_model(TINY_MODEL, x)
    export_onnx(unroll_float(model), (x[:2],), tmp_path / "fp32.onnx")
    export_onnx(unroll_qat(quantize_convs(model, [x])), (x[:2],), tmp_path / "int8.onnx")
    fp32, int8 = check_model(tmp_path / "fp32.onnx"), check_model(tmp_path / "int8.onnx")
    assert fp32.ok, fp32.summary()
    assert int8.ok, int8.summary()
    assert int8.quantized and not fp32.quantized
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    qdq_convs = [n for n in graph.node if n.op_type == "Conv" and producer.get(n.input[1]) == "DequantizeLinear"]
    assert len(qdq_convs) == 19  # every backbone conv (stem, 16 block convs, 2 shortcuts) is Q/DQ


def test_folded_int8_weight_graph_passes_and_a_uint8_weight_is_flagged():
    """The compacted form (int8 weight initializer -> DequantizeLinear) is TensorRT-clean; a weight
    quantised to uint8 (no int8 zero point) is not."""
    from pipeline.deploy.graphs.compact import fold_weight_qdq

    model = qdq_conv_graph()
    assert fold_weight_qdq(model) == 1
    report = check_model(model, "folded")
    assert report.ok, report.summary()
    assert "QuantizeLinear" in report.op_counts and report.op_counts["DequantizeLinear"] == 2
    for init in model.graph.initializer:
        if init.name == "w_zp":
            init.CopyFrom(numpy_helper.from_array(np.zeros(4, np.uint8), "w_zp"))
    assert "qdq_type" in rules_at(check_model(model, "uint8 weight"), "w_dq")
