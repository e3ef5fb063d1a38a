"""Adapt an exported INT8 Q/DQ graph so OpenVINO's CPU plugin computes exactly what the file means.

Why: on AVX2 CPUs without VNNI, OpenVINO runs a Q/DQ conv as u8 x s8 with ``vpmaddubsw``, which
adds two adjacent-channel products into a *saturating int16*. Our activations are int8 with zero
point 0, which OpenVINO shifts to u8 (zero point 128): a spike (level 127) becomes 255 and
255*127*2 = 64770 > 32767 saturates (a second error, not root-caused, hits the stem conv). On the
trained default model that gave 61.7% argmax agreement with exact Q/DQ execution (max logit diff
4.95); adapted: 100% (256/256), max diff 0.14 (float noise), 98.96% of conv MACs still in u8.

What (on an in-memory copy; the file keeps TensorRT's int8 zero-point-0 form):

- a *spike* Q/DQ pair (its input is ``Cast`` of a comparison, or ``Where(cond, 1, 0)``, through ops
  that only move values: reshape, concat, max-pool...) -> uint8, zero point 0, same scale: the same
  levels (0 and round(1/scale) <= 127), no shift, 127*127*2 < 32767, so those convs stay u8 and exact;
- every other activation Q/DQ pair (per-tensor, int8, zero point 0) -> the same arithmetic in float:
  ``Mul(Clip(Round(Div(x, s)), -128, 127), s)``, so OpenVINO keeps those ops in f32.

Weight DequantizeLinear nodes (int8 initializers) are left as they are.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..onnx_graph import OnnxGraph, attr, default_opset

# ops that only move, copy or select values (data input first, except Concat): a spike stays a spike
KEEPS_SPIKES = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose", "Identity", "Split", "Slice",
                          "Gather", "Expand", "Tile", "Concat", "MaxPool"})
# ops whose output is boolean: Cast(any of them) is exactly 0/1
BOOL_OPS = frozenset({"GreaterOrEqual", "Greater", "Less", "LessOrEqual", "Equal", "Not", "And", "Or", "Xor"})
SPIKE_MAX_LEVEL = 127  # uint8 levels above this would differ from int8 (clipped at 127) and could saturate again
HOW = ("spike Q/DQ pairs -> uint8 with zero point 0 (same scale and levels, u8 kernels, no shift to zero point 128 "
       "and no int16 saturation in vpmaddubsw); other activation Q/DQ pairs -> the same arithmetic in float "
       "(Div, Round, Clip(-128, 127), Mul), run in f32; weights untouched")


@dataclass
class QdqAdaptation:
    """What :func:`adapt_qdq_for_openvino` did: Q/DQ pairs (one QuantizeLinear and its DequantizeLinears)."""

    spikes_uint8: int = 0  # spike pairs switched to uint8, zero point 0
    float_qdq: int = 0  # pairs replaced by float arithmetic
    kept: int = 0  # activation pairs left as they were (not the exported form: see ``kept_reasons``)
    kept_reasons: tuple[str, ...] = ()

    @property
    def adapted(self) -> int:
        return self.spikes_uint8 + self.float_qdq

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), kept_reasons=list(self.kept_reasons), adapted=self.adapted, how=HOW)


def has_qdq(model: onnx.ModelProto) -> bool:
    """Whether the graph quantises an activation (a QuantizeLinear whose input is not a constant)."""
    g = OnnxGraph(model.graph)
    return any(n.op_type == "QuantizeLinear" and g.value(n.input[0]) is None for n in model.graph.node)


class _Graph(OnnxGraph):
    """The shared index plus what the adaptation asks: graph outputs, boolean inputs, spike tensors."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__(model.graph)
        self.outputs = {o.name for o in self.graph.output}
        self.bool_inputs = {i.name for i in self.graph.input if i.type.tensor_type.elem_type == TensorProto.BOOL}
        self._spike: dict[str, bool] = {}

    def is_bool(self, name: str) -> bool:
        node = self.producer.get(name)
        if node is None:
            return name in self.bool_inputs
        if node.op_type in BOOL_OPS:
            return True
        return node.op_type == "Cast" and attr(node, "to") == TensorProto.BOOL

    def is_spike(self, name: str) -> bool:
        """Exactly 0/1 by construction: Cast(bool), Where(bool, 1, 0), through :data:`KEEPS_SPIKES` ops."""
        if name not in self._spike:
            self._spike[name] = False  # cycle guard
            node = self.producer.get(name)
            spike = False
            if node is not None:
                if node.op_type == "Cast":
                    spike = self.is_bool(node.input[0])
                elif node.op_type == "Where":
                    a, b = self.value(node.input[1]), self.value(node.input[2])
                    spike = (a is not None and b is not None and a.size == 1 and b.size == 1
                             and {float(a.reshape(-1)[0]), float(b.reshape(-1)[0])} <= {0.0, 1.0})
                elif node.op_type == "Concat":
                    spike = all(self.is_spike(i) for i in node.input)
                elif node.op_type in KEEPS_SPIKES:
                    spike = self.is_spike(node.input[0])
            self._spike[name] = spike
        return self._spike[name]


def _pair_problem(g: _Graph, q: onnx.NodeProto, dqs: list[onnx.NodeProto]) -> str | None:
    """Why a Q and its consumers are not the exported activation pair (None: they are)."""
    users = g.users(q.output[0])
    if not dqs or len(dqs) != len(users) or q.output[0] in g.outputs:
        return f"{q.name or q.output[0]}: its int8 output is used outside DequantizeLinear"
    zp = g.value(q.input[2]) if len(q.input) > 2 else None
    scale = g.value(q.input[1])
    if scale is None or zp is None or zp.dtype != np.int8 or np.any(zp):
        return f"{q.name or q.output[0]}: not int8 with a constant zero point 0 and a constant scale"
    for dq in dqs:
        if (len(dq.input) < 3 or dq.input[1] != q.input[1]
                and not np.array_equal(g.value(dq.input[1]), scale)):
            return f"{dq.name or dq.output[0]}: its scale or zero point differs from its QuantizeLinear's"
        dzp = g.value(dq.input[2])
        if dzp is None or dzp.dtype != np.int8 or np.any(dzp):
            return f"{dq.name or dq.output[0]}: not int8 with zero point 0"
    return None


def adapt_qdq_for_openvino(model: onnx.ModelProto) -> tuple[onnx.ModelProto, QdqAdaptation]:
    """Rewrite the activation Q/DQ pairs of ``model`` in place (module docstring); returns ``(model,
    counts)``. Under exact Q/DQ semantics (ONNX Runtime with its QDQ fusions off, TensorRT) the result
    computes the same numbers as the input graph."""
    opset = default_opset(model) or 0
    g = _Graph(model)
    counts = QdqAdaptation()
    kept: list[str] = []
    # one shared uint8 zero point per shape
    u8_zero: dict[tuple[int, ...], str] = {}
    float_consts: dict[str, str] = {}
    touched: set[str] = set()  # zero points the rewrite may leave unread

    def const(name: str, array: np.ndarray) -> str:
        if name not in float_consts:
            g.graph.initializer.append(numpy_helper.from_array(array, name))
            float_consts[name] = name
        return name

    for q in [n for n in g.graph.node if n.op_type == "QuantizeLinear" and g.value(n.input[0]) is None]:
        dqs = [c for c in g.users(q.output[0]) if c.op_type == "DequantizeLinear"]
        problem = _pair_problem(g, q, dqs)
        scale = g.value(q.input[1])
        if problem is None and g.is_spike(q.input[0]):
            levels = np.round(1.0 / scale.astype(np.float32))  # round half to even, as QuantizeLinear
            if np.all(levels <= SPIKE_MAX_LEVEL):
                shape = tuple(g.value(q.input[2]).shape)
                if shape not in u8_zero:
                    u8_zero[shape] = const(f"ov_qdq/u8_zero_point_{len(u8_zero)}", np.zeros(shape, np.uint8))
                for node in (q, *dqs):
                    touched.add(node.input[2])
                    node.input[2] = u8_zero[shape]
                for info in g.graph.value_info:  # the recorded type of the quantised tensor
                    if info.name == q.output[0]:
                        info.type.tensor_type.elem_type = TensorProto.UINT8
                counts.spikes_uint8 += 1
                continue
        if problem is None and scale.size != 1:
            problem = f"{q.name or q.output[0]}: per-channel activation quantiser"
        if problem is None and opset < 11:
            problem = f"opset {opset} < 11 has no Round/Clip with tensor bounds"
        if problem is not None:
            kept.append(problem)
            continue
        lo = const("ov_qdq/int8_min", np.array(-128, np.float32))
        hi = const("ov_qdq/int8_max", np.array(127, np.float32))
        p = f"ov_qdq/{q.output[0]}"
        new = [helper.make_node("Div", [q.input[0], q.input[1]], [p + "/div"], name=p + "/div"),
               helper.make_node("Round", [p + "/div"], [p + "/round"], name=p + "/round"),
               helper.make_node("Clip", [p + "/round", lo, hi], [p + "/clip"], name=p + "/clip")]
        new += [helper.make_node("Mul", [p + "/clip", q.input[1]], [dq.output[0]], name=f"{p}/mul{j}")
                for j, dq in enumerate(dqs)]
        at = list(g.graph.node).index(q)
        for node in (q, *dqs):
            touched.update(node.input[1:])
            g.graph.node.remove(node)
        for info in [i for i in g.graph.value_info if i.name == q.output[0]]:  # the int8 tensor is gone
            g.graph.value_info.remove(info)
        for j, node in enumerate(new):
            g.graph.node.insert(at + j, node)
        counts.float_qdq += 1
    _drop_unused(g.graph, touched)
    counts.kept = len(kept)
    counts.kept_reasons = tuple(kept)
    return model, counts


def _drop_unused(graph: onnx.GraphProto, names: set[str]) -> None:
    """Remove the initializers among ``names`` that no node reads any more (the old int8 zero points)."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name in names and i.name not in used]:
        graph.initializer.remove(init)


def adapt_file(src: str, dst: str) -> QdqAdaptation:
    """Write the adapted graph of the ONNX file ``src`` to ``dst`` (metadata kept); returns the counts."""
    model, counts = adapt_qdq_for_openvino(onnx.load(src))
    onnx.save(model, dst)
    return counts


def saturating_inputs(x: np.ndarray, gain: float = 100.0) -> np.ndarray:
    """``x``, ``gain * x`` and ``-gain * x``: real inputs and two scaled copies that drive the input
    quantisers past both int8 bounds, so a wrong clip bound cannot hide behind in-range values."""
    x = np.asarray(x, np.float32)
    return np.concatenate([x, gain * x, -gain * x])


def adaptation_exactness(model: onnx.ModelProto, x: np.ndarray, threads: int | None = 1) -> dict[str, Any]:
    """Does the adapted copy compute the file's numbers? ONNX Runtime with exact Q/DQ semantics on both.

    Returns the largest logit difference (0.0 when exact) and, for the pairs the adaptation runs in
    float, how many had an input rounded below -128 and above 127 (the clip bounds were exercised),
    read from the copy's own ``Round`` outputs.
    """
    import onnxruntime as ort

    from .onnxruntime import EXACT_QDQ

    adapted, counts = adapt_qdq_for_openvino(copy.deepcopy(model))
    rounds = [n.output[0] for n in adapted.graph.node if n.op_type == "Round" and n.name.startswith("ov_qdq/")]
    adapted.graph.output.extend(helper.make_tensor_value_info(r, TensorProto.FLOAT, None) for r in rounds)

    def session(m: onnx.ModelProto) -> Any:
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=list(EXACT_QDQ))

    src, dst = session(model), session(adapted)
    name = src.get_inputs()[0].name
    ref = src.run(None, {name: x})[0]
    outs = dst.run(None, {name: x})
    low = sum(bool((r < -128).any()) for r in outs[1:])
    high = sum(bool((r > 127).any()) for r in outs[1:])
    return {"images": int(len(x)), "max_abs_diff": float(np.abs(outs[0].astype(np.float64) - ref).max(initial=0.0)),
            "float_pairs": counts.float_qdq, "spike_pairs": counts.spikes_uint8,
            "pairs_below_min": low, "pairs_above_max": high}


__all__ = ["HOW", "QdqAdaptation", "adaptation_exactness", "adapt_file", "adapt_qdq_for_openvino", "has_qdq",
           "saturating_inputs"]
