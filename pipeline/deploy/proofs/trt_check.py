"""Static TensorRT-compatibility check of an ONNX graph: pure ``onnx``, no TensorRT or GPU needed.

Most TensorRT build failures are visible in the ONNX file itself (docs/architecture.md §5). Each rule
below names a TensorRT 10 requirement; every violation is reported with the node that breaks
it, so the fix (an export option, a quantiser setting) is obvious from the report.

Rules:
- ``op_supported``: the op is in the TensorRT 10 ONNX parser's support matrix
  (:data:`TRT10_SUPPORTED_OPS`) and in the default ONNX domain.
- ``opset``: the default-domain opset is inside TensorRT 10.0's range (9..20).
- ``control_flow``: no ``Loop``, ``If`` or ``Scan``: an unrolled SNN must be a static graph
  (TensorRT parses them, but their presence means the unrolling did not happen).
- ``qdq_type``: Q/DQ are INT8 (QuantizeLinear with an int8 zero point: without one the output
  is uint8; DequantizeLinear reading int8).
- ``qdq_zero_point``: every Q/DQ zero point is a constant 0 (symmetric quantisation).
- ``qdq_scale``: Q/DQ scales are constants and positive.
- ``weight_per_channel``: a DequantizeLinear (and the QuantizeLinear before it, if any) feeding
  a Conv weight has a per-channel scale of length out_channels on axis 0.
- ``dynamic_dims``: graph inputs and outputs have static dims except the batch (axis 0).
  (Intermediate shapes are resolved by TensorRT at build time and are not checked.)
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from pipeline.runtime.onnx_graph import OnnxGraph, attr, default_opset

# The ONNX ops marked supported ("Y") in onnx-tensorrt's docs/operators.md (the support matrix
# shipped with the TensorRT 10 ONNX parser; read for TensorRT 10.15 GA, github.com/onnx/onnx-tensorrt,
# docs/operators.md), minus the ops that matrix gained after 10.0 (Attention, RotaryEmbedding,
# RMSNormalization, TensorScatter), so that a graph passing here parses on TensorRT 10.0 and later
# (e.g. JetPack 6's TensorRT 10.3). Loop, If and Scan are supported by the parser but forbidden
# here by the ``control_flow`` rule.
TRT10_SUPPORTED_OPS: frozenset[str] = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization BlackmanWindow
Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten
Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax
Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual
Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization
Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu
QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1
ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round STFT ScaledTanh Scan Scatter
ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign
SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze
Upsample Where Xor
""".split())
TRT10_OPSET_RANGE = (9, 20)
CONTROL_FLOW = ("Loop", "If", "Scan")
QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class Violation:
    rule: str
    node: str  # the node that breaks the rule (for a graph input: its first consumer)
    op_type: str
    message: str


@dataclass
class TrtCheckReport:
    graph: str
    violations: list[Violation] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)
    opset: int | None = None
    quantized: bool = False

    @property
    def ok(self) -> bool:
        return not self.violations

    def add(self, rule: str, node: Any, message: str) -> None:
        name = getattr(node, "name", None) or (str(node) if isinstance(node, str) else "")
        op = getattr(node, "op_type", "") if not isinstance(node, str) else ""
        self.violations.append(Violation(rule, name or f"<unnamed {op}>", op, message))

    def by_rule(self) -> dict[str, int]:
        return dict(Counter(v.rule for v in self.violations))

    def to_dict(self) -> dict[str, Any]:
        return {"graph": self.graph, "ok": self.ok, "opset": self.opset, "quantized": self.quantized,
                "violations": [asdict(v) for v in self.violations], "violations_by_rule": self.by_rule(),
                "op_counts": self.op_counts}

    def summary(self, limit: int = 5) -> str:
        if self.ok:
            return f"{self.graph}: passes the TensorRT static check"
        shown = "; ".join(f"[{v.rule}] {v.node}: {v.message}" for v in self.violations[:limit])
        more = f" (+{len(self.violations) - limit} more)" if len(self.violations) > limit else ""
        return f"{self.graph}: {len(self.violations)} TensorRT violations: {shown}{more}"


class _Graph(OnnxGraph):
    """The shared index plus what the rules read from shape inference: tensor shapes and element types."""

    def __init__(self, model: Any) -> None:
        import onnx

        super().__init__(model.graph)
        self.model = model
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # a broken graph: check what can be checked without inferred shapes
            inferred = model
        self.types: dict[str, int] = {}
        self.shapes: dict[str, list[int | None]] = {}
        for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            tt = v.type.tensor_type
            self.types[v.name] = tt.elem_type
            if tt.HasField("shape"):
                self.shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        for name in [*self.initializers, *self.constant_nodes]:  # a constant's own type over the inferred one
            if self.dtype(name) is not None:
                self.types[name] = self.dtype(name)

    def const_type(self, name: str) -> int | None:
        """The element type of constant ``name``; for any other tensor, the inferred one (None if unknown)."""
        dtype = self.dtype(name)
        return dtype if dtype is not None else self.types.get(self.resolve(name))

    def shape(self, name: str) -> list[int | None] | None:
        value = self.value(name)
        if value is not None:
            return list(value.shape)
        return self.shapes.get(name)


def _check_ops(g: _Graph, rep: TrtCheckReport) -> None:
    for node in g.model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            rep.add("op_supported", node, f"custom-domain op {node.domain}::{node.op_type} has no TensorRT parser "
                                          f"support (it would need a plugin)")
        elif node.op_type in CONTROL_FLOW:
            rep.add("control_flow", node, f"{node.op_type} found: the unrolled graph must be static (fixed T, "
                                          f"plain-comparison spikes, state created inside forward)")
        elif node.op_type not in TRT10_SUPPORTED_OPS:
            rep.add("op_supported", node, f"{node.op_type} is not in the TensorRT 10 ONNX parser's supported ops")


def _check_opset(g: _Graph, rep: TrtCheckReport) -> None:
    lo, hi = TRT10_OPSET_RANGE
    if rep.opset is not None and not lo <= rep.opset <= hi:
        rep.add("opset", "<graph>", f"opset {rep.opset} is outside TensorRT 10.0's range {lo}..{hi}; "
                                    f"export with export.opset in that range")


def _zero_point_ok(g: _Graph, node: Any, rep: TrtCheckReport) -> None:
    import onnx

    zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if node.op_type == "QuantizeLinear" and zp is None:
        rep.add("qdq_type", node, "QuantizeLinear without a zero point outputs uint8; TensorRT needs int8 "
                                  "(give an int8 zero point of 0)")
        return
    if zp is not None:
        ztype = g.const_type(zp)
        if ztype is not None and ztype != onnx.TensorProto.INT8:
            rep.add("qdq_type", node, f"zero point {zp} is {onnx.TensorProto.DataType.Name(ztype)}; TensorRT needs int8")
        value = g.value(zp)
        if value is None:
            rep.add("qdq_zero_point", node, f"zero point {zp} is not a constant")
        elif np.any(value != 0):
            rep.add("qdq_zero_point", node, f"zero point {zp} is non-zero ({np.unique(value)[:4].tolist()}); "
                                            f"TensorRT needs symmetric quantisation (zero point 0)")
    if node.op_type == "DequantizeLinear" and zp is None:
        xtype = g.types.get(node.input[0])
        if xtype is not None and xtype != onnx.TensorProto.INT8:
            rep.add("qdq_type", node, f"DequantizeLinear reads {onnx.TensorProto.DataType.Name(xtype)}; "
                                      f"TensorRT needs int8")


def _scale_ok(g: _Graph, node: Any, rep: TrtCheckReport) -> None:
    scale = node.input[1]
    value = g.value(scale)
    if value is None:
        rep.add("qdq_scale", node, f"scale {scale} is not a constant (TensorRT needs build-time scales)")
    elif np.any(value <= 0):
        rep.add("qdq_scale", node, f"scale {scale} has non-positive entries")


def _check_qdq(g: _Graph, rep: TrtCheckReport) -> None:
    for node in g.model.graph.node:
        if node.op_type in QDQ:
            rep.quantized = True
            _zero_point_ok(g, node, rep)
            _scale_ok(g, node, rep)


def _per_channel_ok(g: _Graph, q: Any, out_channels: int | None, conv: Any, rep: TrtCheckReport) -> None:
    scale = g.value(q.input[1])
    axis = attr(q, "axis", 1)
    if scale is None:
        return  # already reported by qdq_scale
    where = f"feeding the weight of {conv.name or conv.op_type}"
    if scale.size == 1 and (out_channels is None or out_channels > 1):
        rep.add("weight_per_channel", q, f"per-tensor weight scale {where}; TensorRT INT8 convs need a "
                                         f"per-channel scale (length out_channels={out_channels}) on axis 0")
        return
    if scale.ndim != 1 or (out_channels is not None and scale.size != out_channels):
        rep.add("weight_per_channel", q, f"weight scale of shape {list(scale.shape)} {where}; expected "
                                         f"[{out_channels}] (one per output channel)")
    if axis not in (0, -(len(g.shape(q.input[0]) or [0, 0, 0, 0]))):
        rep.add("weight_per_channel", q, f"weight scale on axis {axis} {where}; TensorRT needs axis 0 "
                                         f"(output channels)")


def _check_weights(g: _Graph, rep: TrtCheckReport) -> None:
    for conv in g.model.graph.node:
        if conv.op_type != "Conv" or len(conv.input) < 2:
            continue
        dq = g.source(conv.input[1])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        wshape = g.shape(conv.input[1]) or g.shape(dq.input[0])
        out_channels = wshape[0] if wshape else None
        _per_channel_ok(g, dq, out_channels, conv, rep)
        q = g.source(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            _per_channel_ok(g, q, out_channels, conv, rep)


def _check_dims(g: _Graph, rep: TrtCheckReport, batch_axis: int) -> None:
    graph = g.model.graph
    inits = {i.name for i in graph.initializer}
    tensors = [(v, "input") for v in graph.input if v.name not in inits] + [(v, "output") for v in graph.output]
    for v, kind in tensors:
        tt = v.type.tensor_type
        if kind == "input":
            users = g.users(v.name)
            node = users[0] if users else f"<input {v.name}>"
        else:
            node = g.producer.get(v.name) or f"<output {v.name}>"
        if not tt.HasField("shape"):
            rep.add("dynamic_dims", node, f"graph {kind} {v.name} has no shape (unknown rank)")
            continue
        for axis, d in enumerate(tt.shape.dim):
            if axis != batch_axis and not d.HasField("dim_value"):
                label = d.dim_param or "?"
                rep.add("dynamic_dims", node, f"graph {kind} {v.name} axis {axis} is dynamic ({label}); only the "
                                              f"batch axis may be dynamic")


def check_model(model: Any, name: str | None = None, batch_axis: int = 0) -> TrtCheckReport:
    """Run every rule on an ONNX ``ModelProto`` or a path; returns the report (never raises on findings)."""
    import onnx

    if isinstance(model, (str, Path)):
        name = name or Path(model).name
        model = onnx.load(str(model))
    rep = TrtCheckReport(graph=name or model.graph.name or "model")
    rep.op_counts = dict(sorted(Counter(n.op_type for n in model.graph.node).items()))
    rep.opset = default_opset(model)
    g = _Graph(model)
    _check_ops(g, rep)
    _check_opset(g, rep)
    _check_qdq(g, rep)
    _check_weights(g, rep)
    _check_dims(g, rep, batch_axis)
    return rep


def write_reports(reports: Iterable[TrtCheckReport], path: Path) -> dict[str, Any]:
    """Write ``trt_check.json`` ({graph: report}) and return it."""
    data = {r.graph: r.to_dict() for r in reports}
    data_all = {"ok": all(v["ok"] for v in data.values()), "graphs": data,
                "supported_ops_source": "onnx-tensorrt docs/operators.md (TensorRT 10)",
                "opset_range": list(TRT10_OPSET_RANGE)}
    Path(path).write_text(json.dumps(data_all, indent=2, sort_keys=True))
    return data_all
