"""What precision each runtime really executed, read from the runtime's own executed graph.

Why: a file called ``model_int8.onnx`` says nothing about the arithmetic. ONNX Runtime's CPU
provider runs this project's explicit Q/DQ graph as DequantizeLinear -> float Conv (fake-quant),
OpenVINO and TensorRT compile the same graph into integer convolutions. Each function here
counts the convolutions and matmuls/gemms of one runtime's compiled (or optimised) graph by the
kernel precision the runtime chose, and returns one dict (see :func:`summarize`)::

    {"int8_ops": k, "ops": n,                 # convs + matmuls/gemms on integer kernels / all of them
     "int8_convs": kc, "convs": nc,            # the convolutions alone
     "int8_mac_share": float | None,           # share of convolution MACs on integer kernels
     "conv_macs": float | None, "int8_conv_macs": float | None,   # per image and time step
     "kernels": {"<op>:<precision>[:<kernel>]": count}, "source": "how it was read",
     "float_reason": str | None}               # why an int8 graph's convs ran in float, where known

OpenVINO adds ``"qdq_adaptation"``: ``None`` for a graph without activation Q/DQ pairs, else what
the runner's adaptation did (``pipeline.runtime.openvino_qdq``: ``adapted``, ``spikes_uint8``,
``float_qdq``, ``how``), since the runtime model counted here is compiled from the adapted copy.

Self-contained like the rest of this package (it ships to the device bundle): every runtime is
imported where it is used, and only if present.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

# the keys every executed dict has (the report and its schema rely on them)
KEYS = ("int8_ops", "ops", "int8_mac_share", "kernels", "source")
INTEGER_TYPES = ("u8", "i8")


@dataclass
class Op:
    """One convolution or matmul as the runtime executes it."""

    kind: str  # "conv" or "matmul"
    integer: bool  # ran on an integer (u8/i8) kernel
    kernel: str  # label for the kernel histogram, e.g. "Convolution:u8:jit_avx2_I8"
    macs: float | None = None  # convolutions: MACs per image and time step (None: shape unknown)


def summarize(ops: Iterable[Op], source: str, float_reason: str | None = None, **extra: Any) -> dict[str, Any]:
    """The executed dict of a list of ops (module docstring); ``extra`` keys are added as they are."""
    ops = list(ops)
    convs = [o for o in ops if o.kind == "conv"]
    int8_convs = [o for o in convs if o.integer]
    known = all(o.macs is not None for o in convs)
    conv_macs = float(sum(o.macs for o in convs)) if convs and known else None  # type: ignore[misc]
    int8_macs = float(sum(o.macs for o in int8_convs)) if convs and known else None  # type: ignore[misc]
    if not convs:
        share = None
    elif not int8_convs:
        share = 0.0
    elif len(int8_convs) == len(convs):
        share = 1.0
    elif conv_macs:
        share = int8_macs / conv_macs  # type: ignore[operator]
    else:
        share = None  # mixed, and the shapes were not readable
    return {"int8_ops": sum(o.integer for o in ops), "ops": len(ops), "int8_convs": len(int8_convs),
            "convs": len(convs), "int8_mac_share": share, "conv_macs": conv_macs, "int8_conv_macs": int8_macs,
            "kernels": dict(sorted(Counter(o.kernel for o in ops).items())), "source": source,
            "float_reason": float_reason if convs and not int8_convs else None, **extra}


def _prod(dims: Iterable[int]) -> float:
    return float(np.prod([float(d) for d in dims])) if dims is not None else 0.0


def conv_macs(out_shape: Sequence[int] | None, weight_shape: Sequence[int] | None) -> float | None:
    """MACs of one convolution per batch element: output H*W (all spatial axes) times the weight size.

    ``prod(weight) = Cout * Cin / groups * kH * kW`` for ``[Cout, Cin/g, kH, kW]`` and for grouped
    ``[g, Cout/g, Cin/g, kH, kW]`` weights alike, so this is ``H*W*Cout*Cin/groups*kH*kW``.
    """
    if not out_shape or not weight_shape or len(out_shape) < 3 or any(d is None or d < 0 for d in out_shape[2:]):
        return None
    return _prod(out_shape[2:]) * _prod(weight_shape)


# ---------------------------------------------------------------- OpenVINO
OV_CONV = ("Convolution", "GroupConvolution", "Deconvolution", "ConvolutionBackpropData",
           "GroupConvolutionBackpropData")
OV_MATMUL = ("FullyConnected", "MatMul", "Gemm", "FullyConnectedCompressed")


def _rt(info: Any, key: str) -> str:
    if key not in info:
        return ""
    value = info[key]
    try:
        return str(value.astype(str))
    except AttributeError:
        return str(value)


def _ov_static(shape: Any) -> list[int] | None:
    """The dims of an OpenVINO partial shape, ``None`` for a dynamic rank; a dynamic axis gives -1."""
    if shape.rank.is_dynamic:
        return None
    return [d.get_length() if d.is_static else -1 for d in shape]


def openvino_executed(compiled: Any, qdq_adaptation: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Count ``compiled.get_runtime_model()``: every node's ``rt_info`` has ``layerType``,
    ``runtimePrecision`` and ``primitiveType`` (the kernel the CPU plugin chose).
    ``qdq_adaptation``: what the runner adapted before compiling (recorded as it is, and named in
    ``source``).

    A node is integer when its runtime precision is u8/i8 *and* its data input is u8/i8 (a
    weight-only compressed FC dequantises its weights and computes in float). Convolution MACs
    come from the node's output shape and its weight input's shape.
    """
    ops = []
    for node in compiled.get_runtime_model().get_ordered_ops():
        info = node.get_rt_info()
        layer = _rt(info, "layerType")
        kind = "conv" if layer in OV_CONV else "matmul" if layer in OV_MATMUL else None
        if kind is None:
            continue
        prec = _rt(info, "runtimePrecision").lower()
        data = node.input(0).get_element_type().get_type_name() if node.get_input_size() else ""
        integer = prec in INTEGER_TYPES and (data in INTEGER_TYPES or not data)
        macs = None
        if kind == "conv" and node.get_input_size() > 1:
            macs = conv_macs(_ov_static(node.output(0).get_partial_shape()),
                             _ov_static(node.input(1).get_partial_shape()))
        ops.append(Op(kind, integer, f"{layer}:{prec}:{_rt(info, 'primitiveType')}", macs))
    source = ("OpenVINO runtime model (get_runtime_model(): rt_info layerType, runtimePrecision, primitiveType of "
              "every node)")
    if qdq_adaptation and qdq_adaptation.get("adapted"):
        source += (f"; compiled from the Q/DQ-adapted copy ({qdq_adaptation.get('spikes_uint8', 0)} spike Q/DQ pairs "
                   f"in uint8 zero point 0, {qdq_adaptation.get('float_qdq', 0)} activation pairs as float arithmetic)")
    return summarize(ops, source,
                     float_reason="OpenVINO compiled the convolutions in float (runtimePrecision f32): its "
                                  "low-precision transformations did not apply to this graph",
                     qdq_adaptation=dict(qdq_adaptation) if qdq_adaptation is not None else None)


# ---------------------------------------------------------------- ONNX Runtime
ORT_INT_CONV = ("QLinearConv", "ConvInteger", "NhwcQLinearConv")
ORT_INT_MATMUL = ("MatMulInteger", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul")
ORT_FLOAT_CONV = ("Conv", "FusedConv", "NhwcConv", "NhwcFusedConv", "ConvTranspose")
ORT_FLOAT_MATMUL = ("MatMul", "Gemm", "FusedMatMul", "FusedGemm")
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
               "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}

ORT_FLOAT_REASON = ("ONNX Runtime's CPU provider runs DequantizeLinear -> float Conv: the runner disables its Q/DQ "
                    "integer fusion (QDQSelectorActionTransformer), whose u8s8 kernels saturate on CPUs without VNNI "
                    "and change the logits; even with it on, ORT fuses a Q/DQ conv only when its output is "
                    "quantised too")


def _ort_kind(op_type: str) -> tuple[str, bool] | None:
    if op_type in ORT_INT_CONV:
        return "conv", True
    if op_type in ORT_INT_MATMUL:
        return "matmul", True
    if op_type in ORT_FLOAT_CONV:
        return "conv", False
    if op_type in ORT_FLOAT_MATMUL:
        return "matmul", False
    return None


def _profile_shapes(profile: Path) -> dict[str, tuple[list[list[int]], list[list[int]]]]:
    """``{node name: (input shapes, output shapes)}`` from an ONNX Runtime profile (one run)."""
    out: dict[str, tuple[list[list[int]], list[list[int]]]] = {}
    for ev in json.loads(profile.read_text()):
        name, args = ev.get("name", ""), ev.get("args") or {}
        if ev.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        shapes = [[list(v) for d in args.get(k, []) for v in d.values()] for k in ("input_type_shape",
                                                                                    "output_type_shape")]
        out[name[:-len("_kernel_time")]] = (shapes[0], shapes[1])
    return out


def _ort_feeds(session: Any) -> dict[str, np.ndarray]:
    """Zeros for every input at batch 1 (dynamic axes 1): enough for one profiled run."""
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        feeds[i.name] = np.zeros(shape, _ORT_DTYPES.get(i.type, np.float32))
    return feeds


def onnxruntime_executed(path: Path | str, options: Callable[[], Any], providers: Sequence[str],
                         disabled_optimizers: Sequence[str] = (), float_reason: str | None = ORT_FLOAT_REASON,
                         ) -> dict[str, Any]:
    """Count the graph ONNX Runtime really runs: a session built with the runner's own options
    (``options()`` returns a fresh ``SessionOptions``) and disabled optimisers writes its optimised
    graph (``optimized_model_filepath``) into a temp dir, which is loaded with onnx and counted by
    op type (contrib ops such as ``com.microsoft`` QLinearConv or the NCHWc Conv included).

    Convolution MACs come from one profiled run at batch 1 (zeros in): the profile records each
    executed node's input and output shapes. NCHWc convs store channel-padded weights, so their
    MACs may be slightly overstated.
    """
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="staa_ort_") as tmp:
        opts = options()
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "profile")
        session = ort.InferenceSession(str(path), sess_options=opts, providers=list(providers),
                                       disabled_optimizers=list(disabled_optimizers))
        shapes: dict[str, Any] = {}
        try:
            session.run(None, _ort_feeds(session))
            shapes = _profile_shapes(Path(session.end_profiling()))
        except Exception:  # MACs are a bonus: the counts below stand without them
            shapes = {}
        graph = onnx.load(opts.optimized_model_filepath, load_external_data=False).graph
        ops = []
        for node in graph.node:
            kind = _ort_kind(node.op_type)
            if kind is None:
                continue
            macs = None
            if kind[0] == "conv" and node.name in shapes:
                ins, outs = shapes[node.name]
                w = 3 if node.op_type in ("QLinearConv", "NhwcQLinearConv") else 1
                macs = conv_macs(outs[0] if outs else None, ins[w] if len(ins) > w else None)
            domain = f"{node.domain}." if node.domain not in ("", "ai.onnx") else ""
            ops.append(Op(kind[0], kind[1], f"{domain}{node.op_type}", macs))
    disabled = f", disabled: {', '.join(disabled_optimizers)}" if disabled_optimizers else ""
    return summarize(ops, f"ONNX Runtime optimised graph (SessionOptions.optimized_model_filepath, the runner's "
                          f"options{disabled}; providers {', '.join(providers)}); MACs from one profiled run",
                     float_reason=float_reason)


# ---------------------------------------------------------------- TensorRT
TRT_CONV = ("convolution", "deconvolution")
TRT_MATMUL = ("gemm", "matrixmultiply", "fullyconnected", "matmul")


def _trt_is_int8(binding: Mapping[str, Any]) -> bool:
    return "int8" in str(binding.get("Format/Datatype", "")).lower()


def tensorrt_executed(info: str | Mapping[str, Any]) -> dict[str, Any]:
    """Count an engine's layer information (``IEngineInspector.get_engine_information(JSON)``,
    which needs ``ProfilingVerbosity.DETAILED`` at build time, as :mod:`.backends.tensorrt_build` sets).

    A layer is a convolution when its ``LayerType`` names one (``CaskConvolution``,
    ``CaskGemmConvolution``...), a matmul for gemm/matrix-multiply types; it is integer when its
    first input's ``Format/Datatype`` is Int8 and its weights are Int8 (or its tactic is an
    ``i8i8`` kernel). MACs: output H*W times the weight count. Fused opaque layers (Myelin) are
    listed in ``kernels`` but not counted: their inner precision is not reported.
    """
    doc = json.loads(info) if isinstance(info, str) else dict(info)
    layers = doc.get("Layers", [])
    if layers and not all(isinstance(l, Mapping) for l in layers):
        raise ValueError("the engine was built without ProfilingVerbosity.DETAILED: its layer information "
                         "has names only; rebuild it with the pipeline's build (tensorrt_build sets DETAILED)")
    ops, opaque = [], Counter()
    for layer in layers:
        ltype = str(layer.get("LayerType", ""))
        low = ltype.lower()
        kind = "conv" if any(k in low for k in TRT_CONV) else "matmul" if any(k in low for k in TRT_MATMUL) else None
        if kind is None:
            if "myelin" in low:
                opaque[ltype] += 1
            continue
        inputs, outputs = layer.get("Inputs") or [], layer.get("Outputs") or []
        weights = layer.get("Weights") or {}
        tactic = str(layer.get("TacticName", "")).lower()
        int8_in = bool(inputs) and _trt_is_int8(inputs[0])
        int8_w = str(weights.get("Type", "")).lower() == "int8" or "i8i8" in tactic
        integer = int8_in and (int8_w or not weights)
        macs = None
        if kind == "conv" and outputs and weights.get("Count"):
            dims = outputs[0].get("Dimensions")
            if dims and len(dims) >= 3 and all(isinstance(d, int) and d > 0 for d in dims[2:]):
                macs = _prod(dims[2:]) * float(weights["Count"])
        fmt = "int8" if integer else str((inputs[0] if inputs else {}).get("Format/Datatype", "?")).split(" ")[-1]
        ops.append(Op(kind, integer, f"{ltype}:{fmt}", macs))
    return summarize(ops, "TensorRT engine layer information (IEngineInspector JSON: LayerType, Format/Datatype of "
                          "inputs, Weights.Type, TacticName)",
                     float_reason="TensorRT chose float kernels for the convolutions (no Int8 input format)",
                     opaque_layers=dict(opaque))


# ---------------------------------------------------------------- torch
TORCH_REASON = ("torch eager runs fake-quant: the quantisers quantise and dequantise around float "
                "convolutions (QAT and the unrolled INT8 module), no integer kernel runs")


def torch_executed(module: Any, precision: str) -> dict[str, Any]:
    """Torch rows: every conv/linear module runs float kernels by construction (fake-quant for int8)."""
    from torch import nn

    ops = []
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            ops.append(Op("conv", False, f"{type(m).__name__}:fp32"))
        elif isinstance(m, nn.Linear):
            ops.append(Op("matmul", False, f"{type(m).__name__}:fp32"))
    source = ("torch eager: conv/linear modules counted; all run float kernels"
              + ("; INT8 here is fake-quant by construction (quantise -> dequantise -> float op)"
                 if precision == "int8" else ""))
    return summarize(ops, source, float_reason=TORCH_REASON)


__all__ = ["KEYS", "Op", "conv_macs", "onnxruntime_executed", "openvino_executed", "summarize", "tensorrt_executed",
           "torch_executed"]
