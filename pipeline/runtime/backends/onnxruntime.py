"""The ONNX Runtime backend: a runner over an ONNX Runtime session (CPU by default; CUDA/TensorRT providers where present).

Exact Q/DQ semantics by default: ONNX Runtime's ``WeightBiasQuantization`` graph transformer
(ORT >= 1.20, on at the basic optimisation level) rewrites the float bias of a Q/DQ conv into
int32 on the grid ``scale_x * scale_w``. That is not in the ONNX graph, and on a spiking net it
is not harmless: the shifted currents flip spikes near the threshold (measured on a digits
model: logits off by 0.16, 6% of top-1 predictions changed, layer spike agreement down to 0.89).
TensorRT adds conv biases in float, so the exact graph is the better proxy for the engines.
Pass ``disabled_optimizers=()`` to measure ONNX Runtime with all its defaults.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from ..base import Runner
from ..executed import Op, conv_macs, summarize
from . import Backend

if TYPE_CHECKING:
    import onnxruntime as ort


def _precision_from_metadata(session: object) -> str:
    props = session.get_modelmeta().custom_metadata_map  # type: ignore[attr-defined]
    return props.get("precision", "fp32")


# ONNX Runtime's graph transformers that change Q/DQ arithmetic; unknown names are ignored by older
# versions. WeightBiasQuantization re-quantises conv biases to int32. QDQSelectorActionTransformer
# fuses Q/DQ groups into integer kernels (QLinearMatMul, MatMulIntegerToFloat, QLinearConv): on CPUs
# without VNNI (AVX2 only, e.g. the AMD EPYC CI machine) its u8s8 kernels saturate int16 pair sums,
# and a NNCF-quantised ResNet-19 moved its logits by 0.86 with every spike identical (0.0 with the
# fusion off). Disabled, the CPU provider runs DequantizeLinear -> float op: exactly the arithmetic
# of the Q/DQ graph (what TensorRT and the QAT model compute), measured as fake-quant, not as int8 speed.
EXACT_QDQ = ("WeightBiasQuantization", "QDQSelectorActionTransformer")


class OrtRunner(Runner):
    """One ``InferenceSession``; ``threads`` fixes intra-op threads (the session is rebuilt to change it)."""

    name = "onnxruntime"

    def __init__(self, path: Path | str, threads: int | None = None, providers: Sequence[str] | None = None,
                 precision: str | None = None, optimization: str = "all",
                 disabled_optimizers: Sequence[str] = EXACT_QDQ) -> None:
        self.path = Path(path)
        self.disabled_optimizers = list(disabled_optimizers)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX file not found: {self.path}")
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        self.optimization = optimization
        self.threads: int | None = None
        self._open(threads)
        self.precision = precision or _precision_from_metadata(self.session)

    def session_options(self, threads: int | None = None) -> "ort.SessionOptions":
        """The options every session of this runner is built with (the executed-precision count reuses them)."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
        opts.graph_optimization_level = levels[self.optimization]
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        return opts

    def _open(self, threads: int | None) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(self.path), sess_options=self.session_options(threads),
                                            providers=self.providers, disabled_optimizers=self.disabled_optimizers)
        self.threads = threads
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        first = self.session.get_inputs()[0].shape
        self.input_shape = tuple(d if isinstance(d, int) else None for d in first)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, dict(feeds))
        return dict(zip(self.output_names, outs))

    def set_threads(self, threads: int | None) -> None:
        if threads and threads != self.threads:
            self._open(threads)

    def executed_precision(self, compare_defaults: bool | None = None) -> dict[str, Any]:
        """Convolutions and matmuls by kernel precision in the graph this runner's session runs.

        ``compare_defaults`` (default: for int8 rows with disabled optimisers) also counts the graph
        ONNX Runtime would run with all its defaults, so the report can say what the disabled
        fusion would have changed (``ort_defaults``).
        """
        disabled = tuple(self.disabled_optimizers)
        got = onnxruntime_executed(self.path, lambda: self.session_options(self.threads), self.providers, disabled)
        if compare_defaults is None:
            compare_defaults = bool(disabled) and self.precision == "int8"
        if compare_defaults and disabled:
            alt = onnxruntime_executed(self.path, lambda: self.session_options(self.threads), self.providers, ())
            got["ort_defaults"] = {k: alt[k] for k in ("int8_ops", "ops", "int8_convs", "convs", "int8_mac_share")}
            if got["float_reason"] is not None:
                got["float_reason"] += (f"; with ONNX Runtime's defaults {alt['int8_convs']}/{alt['convs']} convs "
                                        f"would run on integer kernels")
        return got

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        return dict(super().describe(), runtime=f"onnxruntime {ort.__version__}", providers=list(self.providers),
                    threads=self.threads, optimization=self.optimization,
                    disabled_optimizers=list(self.disabled_optimizers))

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


# ---------------------------------------------------------------- executed precision: ONNX Runtime
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



class Manager(Backend):
    dists = ("onnxruntime", "onnxruntime-gpu")

    def is_available(self) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            return False, f"onnxruntime is not installed ({exc})"
        return True, f"onnxruntime {ort.__version__} ({', '.join(ort.get_available_providers())})"

    def build(self, onnx_path: Path) -> Path:
        return Path(onnx_path)

    def make_runner(self, model: Any, **options: Any) -> OrtRunner:
        return OrtRunner(model, **options)
