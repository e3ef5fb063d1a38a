"""The shared ONNX graph index (pipeline.runtime.onnx_graph): constants through Identity chains,
producers, consumers and element types, on a hand-made graph whose answers are known."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from pipeline.runtime.onnx_graph import OnnxGraph, attr, default_opset


def graph():
    """x -> Add(x, c) with c = Identity(Identity(Constant)); w (int8 initializer) -> Identity -> DQ;
    Mul(y, y) reads y twice; a Constant set by value_float (not a tensor ``value``)."""
    w = numpy_helper.from_array(np.array([1, -2, 3], np.int8), "w")
    s = numpy_helper.from_array(np.array(0.5, np.float32), "s")
    nodes = [
        helper.make_node("Constant", [], ["c0"], value=numpy_helper.from_array(np.array([2.0], np.float32))),
        helper.make_node("Identity", ["c0"], ["c1"], name="id1"),
        helper.make_node("Identity", ["c1"], ["c2"], name="id2"),
        helper.make_node("Add", ["x", "c2"], ["y"], name="add"),
        helper.make_node("Identity", ["w"], ["w_id"], name="w_id"),
        helper.make_node("DequantizeLinear", ["w_id", "s"], ["wd"], name="dq", axis=0),
        helper.make_node("Identity", ["wd"], ["wd_id"], name="wd_id"),
        helper.make_node("Mul", ["y", "y"], ["z"], name="mul"),
        helper.make_node("Constant", [], ["f"], value_float=1.5),
        helper.make_node("Identity", ["y"], ["y_id"], name="y_id"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("z", "wd_id", "f", "y_id")],
                          initializer=[w, s])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.x", 1)])


def test_constants_are_seen_through_identity_chains():
    g = OnnxGraph(graph().graph)
    np.testing.assert_array_equal(g.value("c2"), [2.0])  # Constant -> Identity -> Identity
    np.testing.assert_array_equal(g.value("w_id"), [1, -2, 3])  # initializer -> Identity
    assert g.resolve("c2") == "c0" and g.resolve("w_id") == "w"
    assert g.dtype("c2") == TensorProto.FLOAT and g.dtype("w_id") == TensorProto.INT8
    assert g.value("y") is None and g.dtype("y") is None  # an activation
    assert g.value("y_id") is None and g.resolve("y_id") == "y"  # Identity of an activation ends at it
    assert g.value("x") is None and g.value("") is None  # a graph input, an absent optional input
    assert g.value("f") is None and g.dtype("f") is None  # value_float: not a tensor constant


def test_producers_consumers_and_sources():
    g = OnnxGraph(graph().graph)
    assert g.producer["y"].name == "add" and "x" not in g.producer
    assert [n.name for n in g.users("y")] == ["mul", "mul", "y_id"]  # read twice by Mul, once by Identity
    assert g.users("nothing") == []
    assert g.source("wd_id").name == "dq"  # through the Identity after the DequantizeLinear
    assert g.source("w_id") is None  # an initializer behind an Identity has no producing node


def test_the_index_is_a_snapshot_of_the_graph_it_was_built_from():
    model = graph()
    g = OnnxGraph(model.graph)
    model.graph.initializer.append(numpy_helper.from_array(np.array([7.0], np.float32), "late"))
    del model.graph.node[:]
    assert g.value("late") is None and g.producer["y"].name == "add"


def test_attr_and_opset():
    model = graph()
    dq = OnnxGraph(model.graph).producer["wd"]
    assert attr(dq, "axis") == 0 and attr(dq, "block_size", 5) == 5 and attr(dq, "missing") is None
    assert default_opset(model) == 17
    del model.opset_import[0]
    assert default_opset(model) is None
