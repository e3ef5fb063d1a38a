"""One index over an ONNX graph: who produces a tensor, who reads it, and what a constant holds.

Why one: graph compaction (``pipeline.deploy.graphs.compact``), the TensorRT static check
(``pipeline.deploy.proofs.trt_check``) and the OpenVINO Q/DQ adaptation
(``pipeline.runtime.backends.openvino_qdq``) each walk producers, consumers and constants, and
each had its own copy of that walk. It lives in ``pipeline.runtime`` because the adaptation runs
in the standalone runner the device bundle carries (this package imports nothing else from the
pipeline); deploy/ imports it from here. It needs ``onnx`` (the bundle's runner imports it only for
an INT8 graph that the OpenVINO runner adapts).

The index is a snapshot: built from the graph as it is when :class:`OnnxGraph` is created, so a
caller that rewrites the graph afterwards keeps looking up the original tensors.
A *constant* is an initializer or the ``value`` of a ``Constant`` node, seen through any chain of
``Identity`` nodes (the tracer wraps weights in them).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of ``node``'s attribute ``name``, or ``default`` when the node does not set it."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def default_opset(model: onnx.ModelProto) -> int | None:
    """The opset version of the default (``ai.onnx``) domain, or None when the model imports none."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


class OnnxGraph:
    """Lookups over one ``onnx.GraphProto``: producers, consumers, initializers and constants."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers: dict[str, onnx.TensorProto] = {i.name: i for i in graph.initializer}
        self.constant_nodes: dict[str, onnx.NodeProto] = {n.output[0]: n for n in graph.node
                                                           if n.op_type == "Constant" and n.output}
        self.producer: dict[str, onnx.NodeProto] = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self._values: dict[str, np.ndarray | None] = {}

    def users(self, name: str) -> list[onnx.NodeProto]:
        """The nodes reading tensor ``name`` (a node reading it twice is listed twice), in graph order."""
        return self.consumers.get(name, [])

    def resolve(self, name: str) -> str:
        """``name`` followed back through ``Identity`` nodes to the initializer or ``Constant`` it copies;
        where the chain ends elsewhere (an activation, a graph input), the last name on it."""
        while name not in self.initializers and name not in self.constant_nodes:
            node = self.producer.get(name)
            if node is None or node.op_type != "Identity":
                return name
            name = node.input[0]
        return name

    def value(self, name: str) -> np.ndarray | None:
        """The constant value of tensor ``name`` (decoded once), or None when it is not a constant."""
        name = self.resolve(name)
        if name not in self._values:
            self._values[name] = self._decode(name)
        return self._values[name]

    def _decode(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.constant_nodes.get(name)
        if node is not None:
            tensor = attr(node, "value")
            if tensor is not None:
                return numpy_helper.to_array(tensor)
        return None

    def dtype(self, name: str) -> int | None:
        """The ``TensorProto`` element type of constant ``name``, or None when it is not a constant."""
        name = self.resolve(name)
        if name in self.initializers:
            return self.initializers[name].data_type
        node = self.constant_nodes.get(name)
        tensor = attr(node, "value") if node is not None else None
        return tensor.data_type if tensor is not None else None

    def source(self, name: str) -> onnx.NodeProto | None:
        """The node producing ``name``, looking through ``Identity`` nodes (None for inputs and initializers)."""
        node = self.producer.get(name)
        while node is not None and node.op_type == "Identity":
            node = self.producer.get(node.input[0])
        return node


__all__ = ["OnnxGraph", "attr", "default_opset"]
