"""Make exported graphs compact: INT8 weights stored as int8, then simplified with onnxslim.

Why: the quantiser's export keeps every weight as float behind ``QuantizeLinear ->
DequantizeLinear`` (the INT8 file was larger than the FP32 one), and the tracer leaves hundreds of
shape computations (``Constant``, ``Shape``, ``Slice``, ``Mod``) around the convolutions.

- :func:`fold_weight_qdq` quantises each constant weight once, exactly as ONNX ``QuantizeLinear``
  does (``saturate(round_half_to_even(x / scale) + zero_point)``, per-tensor or per-channel), and
  stores the result as an int8 initializer that feeds the ``DequantizeLinear`` directly: the graph
  computes the same values, TensorRT and OpenVINO see the same explicit-quantisation pattern.
- :func:`simplify` runs onnxslim (constant folding, dead-code and common-subexpression removal).
  onnxslim never folds Q/DQ nodes (its constant folder skips them; identical pairs on one tensor
  are merged), keeps ``metadata_props``, the opset and the symbolic batch axis; :func:`simplify`
  checks all of that after the fact (every quantised conv still reads a dequantised weight and
  input) and raises :class:`CompactError` rather than ship a graph that lost them.
- :func:`compact_onnx` does both on a file, in place; :func:`graph_stats` gives the node counts
  and bytes the export stage records in ``metrics.json``.
"""
from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from pipeline.runtime.onnx_graph import OnnxGraph, attr

# data-movement ops a DequantizeLinear may sit behind on its way into a Conv (TensorRT propagates
# Q/DQ through them); used to count quantised conv inputs
_MOVES = frozenset({"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Concat", "Split",
                    "Slice", "Gather", "Expand", "Tile"})
_INT_RANGE = {TensorProto.INT8: (-128, 127, np.int8), TensorProto.UINT8: (0, 255, np.uint8)}
TOP_OPS = 8


class CompactError(RuntimeError):
    """Folding or simplification would change what the graph means; the message says what and where."""


def quantize_like_onnx(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int,
                       qtype: int = TensorProto.INT8) -> np.ndarray:
    """ONNX ``QuantizeLinear`` (opset 13+): ``saturate(round_half_to_even(x / scale) + zero_point)``.

    Division in float32 like the runtimes (not a multiplication by ``1 / scale``, which rounds
    differently at exact halves); per-channel when ``scale`` has more than one element.
    """
    lo, hi, np_type = _INT_RANGE[qtype]
    x = np.asarray(x, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    zp = np.zeros_like(scale, dtype=np.int32) if zero_point is None else np.asarray(zero_point).astype(np.int32)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * x.ndim
        shape[axis % x.ndim] = scale.size
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    q = np.rint(np.divide(x, scale, dtype=np.float32)).astype(np.int64) + zp
    return np.clip(q, lo, hi).astype(np_type)


def fold_weight_qdq(model: onnx.ModelProto) -> int:
    """Replace every ``QuantizeLinear`` of a constant float tensor by its int8 result, in place.

    The int8 initializer takes the ``QuantizeLinear``'s output name, so the ``DequantizeLinear``
    nodes reading it are untouched; the float weight (and any ``Identity``/``Constant`` that only
    fed it) is dropped. Returns the number of folded ``QuantizeLinear`` nodes.
    """
    g = model.graph
    consts = OnnxGraph(g)
    new_inits: list[onnx.TensorProto] = []
    folded: set[int] = set()
    for idx, node in enumerate(g.node):
        if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        x = consts.value(node.input[0])
        scale = consts.value(node.input[1])
        zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        zp = consts.value(zp_name) if zp_name else None
        if x is None or scale is None or (zp_name and zp is None) or x.dtype != np.float32:
            continue  # an activation quantiser (or a non-float32 constant): left as it is
        if attr(node, "block_size", 0):
            raise CompactError(f"{node.name}: blocked QuantizeLinear is not supported by the weight fold")
        qtype = consts.dtype(zp_name) if zp_name else TensorProto.UINT8
        if qtype not in _INT_RANGE:
            raise CompactError(f"{node.name}: QuantizeLinear to {TensorProto.DataType.Name(qtype)} is not folded; "
                               f"export int8 or uint8 quantisers")
        q = quantize_like_onnx(x, scale, zp, int(attr(node, "axis", 1)), qtype)
        new_inits.append(numpy_helper.from_array(q, node.output[0]))
        folded.add(idx)
    if not folded:
        return 0
    kept = [n for i, n in enumerate(g.node) if i not in folded]
    del g.node[:]
    g.node.extend(kept)
    g.initializer.extend(new_inits)
    prune_unused(model)
    return len(folded)


def prune_unused(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody reads (not graph outputs) and unread initializers, in place."""
    g = model.graph
    needed = {o.name for o in g.output}
    live = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output) or not node.output:
            live.append(node)
            needed.update(i for i in node.input if i)
            for a in node.attribute:
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    needed.update(i for n in sub.node for i in n.input)
    live.reverse()
    del g.node[:]
    g.node.extend(live)
    inits = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    vis = [v for v in g.value_info if v.name in needed]
    del g.value_info[:]
    g.value_info.extend(vis)


def qdq_coverage(model: onnx.ModelProto) -> dict[str, int]:
    """Q/DQ counts and how many ``Conv`` nodes read a dequantised weight and a dequantised input.

    The input may reach its ``DequantizeLinear`` through data-movement ops (the merge of T and B
    is a ``Reshape``); TensorRT's explicit quantisation propagates Q/DQ through those.
    """
    g = model.graph
    producer = OnnxGraph(g).producer

    def reaches_dq(name: str, moves: bool) -> bool:
        seen = 0
        node = producer.get(name)
        while node is not None and seen < 16:
            if node.op_type == "DequantizeLinear":
                return True
            if node.op_type == "Identity" or (moves and node.op_type in _MOVES):
                node = producer.get(node.input[0])
                seen += 1
                continue
            return False
        return False

    convs = [n for n in g.node if n.op_type == "Conv"]
    ops = Counter(n.op_type for n in g.node)
    return {"QuantizeLinear": ops.get("QuantizeLinear", 0), "DequantizeLinear": ops.get("DequantizeLinear", 0),
            "Conv": len(convs), "conv_weight_dq": sum(reaches_dq(c.input[1], False) for c in convs),
            "conv_input_dq": sum(reaches_dq(c.input[0], True) for c in convs)}


def batch_dims(model: onnx.ModelProto) -> dict[str, str | int | None]:
    """Axis 0 of every graph input and output (a symbol name, a size, or None when unknown)."""
    inits = {i.name for i in model.graph.initializer}
    out: dict[str, str | int | None] = {}
    for v in [v for v in model.graph.input if v.name not in inits] + list(model.graph.output):
        dims = v.type.tensor_type.shape.dim
        d = dims[0] if len(dims) else None
        out[v.name] = None if d is None else (d.dim_param or (d.dim_value if d.HasField("dim_value") else None))
    return out


def _quiet_onnxslim() -> None:
    """onnxslim installs its own stderr handler unless its logger has one: give it a null one, so its
    records reach the stage log through the root logger like everyone's."""
    lg = logging.getLogger("onnxslim")
    if not lg.handlers:
        lg.addHandler(logging.NullHandler())


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim's simplification, checked: same opset, IR, metadata, inputs/outputs, batch axis, Q/DQ.

    Raises :class:`CompactError` naming what changed.
    """
    import onnxslim

    _quiet_onnxslim()
    before_batch, before_cov = batch_dims(model), qdq_coverage(model)
    meta = [(p.key, p.value) for p in model.metadata_props]
    opsets = {(o.domain, o.version) for o in model.opset_import}
    with contextlib.redirect_stdout(io.StringIO()):
        slim = onnxslim.slim(model)
    if slim is None:
        raise CompactError("onnxslim returned no model (its own check failed)")
    problems = []
    if batch_dims(slim) != before_batch:
        problems.append(f"batch axis changed: {before_batch} -> {batch_dims(slim)}")
    try:
        check_qdq_kept(before_cov, qdq_coverage(slim), "onnxslim")
    except CompactError as exc:
        problems.append(str(exc))
    if {(o.domain, o.version) for o in slim.opset_import} != opsets:
        problems.append(f"opset changed: {sorted(opsets)} -> {sorted((o.domain, o.version) for o in slim.opset_import)}")
    if slim.ir_version != model.ir_version:
        problems.append(f"IR version changed: {model.ir_version} -> {slim.ir_version}")
    if problems:
        raise CompactError("onnxslim changed the graph's contract: " + "; ".join(problems))
    if [(p.key, p.value) for p in slim.metadata_props] != meta:
        del slim.metadata_props[:]
        for key, value in meta:
            slim.metadata_props.add(key=key, value=value)
    return slim


def graph_stats(model: onnx.ModelProto, path: Path | None = None) -> dict[str, Any]:
    """Node counts (total, top ops), initializer and ``Constant``-node bytes, file bytes when ``path`` is given."""
    ops = Counter(n.op_type for n in model.graph.node)
    init_bytes = sum(numpy_helper.to_array(i).nbytes for i in model.graph.initializer)
    const_bytes = sum(numpy_helper.to_array(a.t).nbytes for n in model.graph.node if n.op_type == "Constant"
                      for a in n.attribute if a.name == "value" and a.HasField("t"))
    out: dict[str, Any] = {"nodes": len(model.graph.node), "top_ops": dict(ops.most_common(TOP_OPS)),
                           "initializer_bytes": int(init_bytes), "constant_node_bytes": int(const_bytes)}
    if path is not None:
        out["file_bytes"] = Path(path).stat().st_size
    return out


def file_stats(path: Path) -> dict[str, Any]:
    """:func:`graph_stats` of an ONNX file."""
    return graph_stats(onnx.load(str(path)), path)


def check_qdq_kept(before: dict[str, int], after: dict[str, int], what: str) -> None:
    """Raise :class:`CompactError` unless every conv that read a dequantised weight and input still does.

    The Q/DQ totals may fall: onnxslim's common-subexpression pass merges identical pairs (same
    tensor, same scale) that feed two convs, e.g. a block's first conv and its downsample conv;
    one pair feeding both is the same quantisation, and TensorRT duplicates a shared
    DequantizeLinear per consumer when it fuses.
    """
    keys = ("Conv", "conv_weight_dq", "conv_input_dq")
    if any(before[k] != after[k] for k in keys):
        raise CompactError(f"{what}: compaction changed the quantised convs: "
                           f"{ {k: before[k] for k in keys} } -> { {k: after[k] for k in keys} }")


def compact_onnx(path: Path, *, fold_weights: bool = True, slim: bool = True) -> dict[str, Any]:
    """Fold the weight Q/DQ and simplify the graph at ``path``, in place.

    Returns ``{"folded_weight_quantizers": n, "simplified": slim, "qdq_before": coverage, "qdq": coverage
    after}`` (:func:`qdq_coverage`); raises
    :class:`CompactError` if a conv lost its quantised weight or input on the way.
    """
    path = Path(path)
    model = onnx.load(str(path))
    before = qdq_coverage(model)
    folded = fold_weight_qdq(model) if fold_weights else 0
    if slim:
        model = simplify(model)
    after = qdq_coverage(model)
    check_qdq_kept(before, after, path.name)
    onnx.save(model, str(path))
    return {"folded_weight_quantizers": folded, "simplified": slim, "qdq_before": before, "qdq": after}
