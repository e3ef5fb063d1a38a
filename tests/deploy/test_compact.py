"""Graph compaction: the weight Q/DQ fold is exact (ONNX Runtime before == after), onnxslim keeps
the batch axis, the metadata and every conv's Q/DQ, and a lost quantiser is caught."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pipeline.deploy.graphs.compact import (CompactError, batch_dims, check_qdq_kept, compact_onnx, fold_weight_qdq,
                                     graph_stats, qdq_coverage, quantize_like_onnx, simplify)
from pipeline.deploy.graphs.onnx_export import export_onnx, write_metadata
from pipeline.deploy.graphs.unroll import unroll_float, unroll_qat
from tests.helpers import firing_model, quantize_convs
from tests.deploy.test_trt_check import qdq_conv_graph

# small enough for onnxslim to run in seconds: GC and PE on (their shape arithmetic is what the
# simplification removes), step attention off
SMALL = {"arch": "resnet19", "width": 0.0625, "T": 2, "num_classes": 10, "in_channels": 1, "staa": {"sa": False}}


def run_ort(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    """Every ONNX Runtime graph optimisation off: the graph's own semantics, not a fused kernel's."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def quantize_graph(axis: int, channels: int, zp_type: int) -> onnx.ModelProto:
    """x -> QuantizeLinear(scale, zero point) with x a graph input: ONNX Runtime's own rounding."""
    scale = np.array([0.1, 0.5, 2.0][:channels], np.float32) if channels > 1 else np.array(0.5, np.float32)
    zp_np = np.int8 if zp_type == TensorProto.INT8 else np.uint8
    zp = np.array([0, 3, -2][:channels], zp_np) if channels > 1 and zp_np is np.int8 else np.zeros(scale.shape, zp_np)
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], axis=axis)
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
                              [helper.make_tensor_value_info("y", zp_type, [3, 4])],
                              initializer=[numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zp, "z")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


@pytest.mark.parametrize("axis, channels, zp_type", [(0, 3, TensorProto.INT8), (0, 1, TensorProto.INT8),
                                                     (0, 1, TensorProto.UINT8)])
def test_quantize_matches_onnx_runtime_rounding_and_saturation(axis, channels, zp_type):
    """Exact halves (round half to even), values past the int8 range (saturation), negative zero points."""
    x = np.array([[0.05, 0.15, -0.25, 1e3], [0.25, 0.75, -1.25, -0.75], [1.0, 3.0, -5.0, -1e4]], np.float32)
    model = quantize_graph(axis, channels, zp_type)
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    got = quantize_like_onnx(x, init["s"], init["z"], axis, zp_type)
    expected = run_ort(model, x)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


# per-channel weight scales of the kind NNCF writes (max |w| / 127), none a power of two
DIVISION_SCALES = np.array([0.1, 0.3, 0.7, 0.013, 0.0457, 1 / 3, 0.02, 0.00271], np.float32)


def division_sensitive_inputs(scale: np.float32, count: int) -> np.ndarray:
    """``count`` float32 values x, all within the int8 range, where ``rint(x / scale)`` and
    ``rint(x * (1 / scale))`` differ: the values a few ulps either side of the midpoints
    ``(k + 1/2) * scale``, kept where the two roundings disagree."""
    mid = (np.arange(-127, 127, dtype=np.float32) + np.float32(0.5)) * scale
    near = [mid]
    for direction in (np.inf, -np.inf):
        x = mid
        for _ in range(3):
            x = np.nextafter(x, np.float32(direction))
            near.append(x)
    x = np.concatenate(near)
    differ = np.rint(np.divide(x, scale, dtype=np.float32)) != np.rint(x * (np.float32(1) / scale))
    assert differ.sum() >= count, f"scale {scale}: only {differ.sum()} division-sensitive inputs"
    return x[differ][:count]


def test_quantize_divides_like_onnx_runtime_where_a_reciprocal_would_round_differently():
    """Inputs where ``x / s`` and ``x * (1/s)`` round to different integers (they exist for most scales): the fold
    must give ONNX Runtime's own QuantizeLinear result on every one, per channel (weights) and per tensor."""
    x = np.stack([division_sensitive_inputs(s, 8) for s in DIVISION_SCALES])  # [channels, 8]
    reciprocal = np.rint(x * (np.float32(1) / DIVISION_SCALES[:, None])).astype(np.int64)
    for axis_scale, xs in [(DIVISION_SCALES, x), (DIVISION_SCALES[1], x[1:2])]:
        zp = np.zeros(np.shape(axis_scale), np.int8)
        node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], axis=0)
        graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(xs.shape))],
                                  [helper.make_tensor_value_info("y", TensorProto.INT8, list(xs.shape))],
                                  initializer=[numpy_helper.from_array(np.asarray(axis_scale, np.float32), "s"),
                                               numpy_helper.from_array(zp, "z")])
        expected = run_ort(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), xs)
        rec = reciprocal if xs.shape[0] > 1 else reciprocal[1:2]
        assert (expected != rec).all(), "ONNX Runtime multiplies by the reciprocal: these inputs prove nothing"
        np.testing.assert_array_equal(quantize_like_onnx(xs, axis_scale, zp, 0), expected)


def test_fold_of_a_hand_made_qdq_conv_is_exact():
    model = qdq_conv_graph()
    model.ir_version = 8  # what the exporter writes; ONNX Runtime reads up to IR 13
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    before = run_ort(model, x)
    folded = copy.deepcopy(model)
    assert fold_weight_qdq(folded) == 1
    ops = [n.op_type for n in folded.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 2  # the activation Q stays
    inits = {i.name: i for i in folded.graph.initializer}
    assert "W" not in inits and inits["wq"].data_type == TensorProto.INT8
    onnx.checker.check_model(folded, full_check=True)
    np.testing.assert_array_equal(run_ort(folded, x), before)


@pytest.fixture(scope="module")
def small_graphs(tmp_path_factory):
    """A firing SMALL net exported as FP32 and as Q/DQ INT8 (weights as float behind Q -> DQ)."""
    root = tmp_path_factory.mktemp("compact")
    torch.manual_seed(0)
    x = torch.randn(8, 1, 16, 16)
    model = firing_model(SMALL, x)
    fp32 = export_onnx(unroll_float(model), (x[:2],), root / "fp32.onnx")
    int8 = export_onnx(unroll_qat(quantize_convs(copy.deepcopy(model), [x])), (x[:2],), root / "int8.onnx")
    for path in (fp32, int8):
        write_metadata(path, {"T": "2", "precision": path.stem})
    return fp32, int8, x.numpy()


def test_int8_fold_and_simplify_keep_outputs_and_every_conv_quantised(small_graphs, tmp_path):
    _, src, x = small_graphs
    raw = onnx.load(str(src))
    cov = qdq_coverage(raw)
    quantised = cov["conv_weight_dq"]  # the backbone convs (the reference quantiser leaves GC's 1x1 convs float)
    assert quantised == cov["conv_input_dq"] == 19 and cov["Conv"] > quantised
    path = tmp_path / "int8.onnx"
    onnx.save(raw, str(path))
    info = compact_onnx(path)
    final = onnx.load(str(path))
    assert info["folded_weight_quantizers"] == quantised
    after = qdq_coverage(final)
    assert after["conv_weight_dq"] == after["conv_input_dq"] == quantised and after["Conv"] == cov["Conv"]
    # only the weight Q nodes went (onnxslim may merge identical activation pairs that feed two convs)
    assert after["QuantizeLinear"] <= cov["QuantizeLinear"] - quantised and after["QuantizeLinear"] > 0
    assert after["DequantizeLinear"] - after["QuantizeLinear"] == quantised  # one DQ per int8 weight
    inits = {i.name: i for i in final.graph.initializer}
    producer = {o: n for n in final.graph.node for o in n.output}
    weight_dqs = [producer[c.input[1]] for c in final.graph.node if c.op_type == "Conv"
                  and producer.get(c.input[1]) is not None and producer[c.input[1]].op_type == "DequantizeLinear"]
    assert len(weight_dqs) == quantised
    assert all(inits[dq.input[0]].data_type == TensorProto.INT8 for dq in weight_dqs)
    for b in (1, 3):  # the dynamic batch still works, and the values are the same to the bit
        np.testing.assert_allclose(run_ort(str(path), x[:b]), run_ort(str(src), x[:b]), atol=1e-6, rtol=0)
    assert batch_dims(final) == batch_dims(raw) == {"input": "batch", "logits": "batch"}
    assert {p.key: p.value for p in final.metadata_props} == {"T": "2", "precision": "int8"}
    assert graph_stats(final)["initializer_bytes"] < 0.5 * graph_stats(raw)["initializer_bytes"]


def test_simplify_shrinks_the_fp32_graph_and_keeps_its_contract(small_graphs):
    src, _, x = small_graphs
    raw = onnx.load(str(src))
    slim = simplify(raw)
    before, after = graph_stats(raw), graph_stats(slim)
    assert after["nodes"] < 0.7 * before["nodes"], (before, after)
    assert after["top_ops"].get("Constant", 0) == 0 and before["top_ops"]["Constant"] > 50
    assert batch_dims(slim) == {"input": "batch", "logits": "batch"}
    assert [o.version for o in slim.opset_import] == [18] and slim.ir_version == raw.ir_version
    assert {p.key for p in slim.metadata_props} == {"T", "precision"}
    onnx.checker.check_model(slim, full_check=True)
    np.testing.assert_allclose(run_ort(slim, x), run_ort(raw, x), atol=1e-6, rtol=0)


def test_a_conv_that_loses_its_quantised_weight_is_caught():
    model = qdq_conv_graph()
    before = qdq_coverage(model)
    for node in model.graph.node:  # rewire the conv to the float weight, as a bad fusion would
        if node.op_type == "Conv":
            node.input[1] = "W"
    after = qdq_coverage(model)
    assert after["conv_weight_dq"] == before["conv_weight_dq"] - 1
    with pytest.raises(CompactError, match="quantised convs"):
        check_qdq_kept(before, after, "g")
