"""The OpenVINO backend: a runner over OpenVINO, the exported ONNX graph compiled for an Intel CPU (or iGPU/NPU).

Why OpenVINO next to ONNX Runtime: both read the same explicit Q/DQ graph, but ONNX Runtime's
CPU provider runs it as DequantizeLinear -> float Conv (fake-quant, see ``backends.onnxruntime.EXACT_QDQ``)
while OpenVINO's low-precision transformations compile the Q/DQ convolutions into u8/i8
kernels, the way TensorRT does on a GPU. So this runner measures real INT8 speed on a CPU, and
:meth:`OpenVinoRunner.executed_precision` proves it from OpenVINO's runtime model.

``inference_precision="f32"`` (``INFERENCE_PRECISION_HINT``) keeps every float part in true
FP32: on CPUs with AVX512-BF16 or AMX OpenVINO would otherwise default to bf16, and a spike
threshold is discontinuous. ``threads`` maps to ``INFERENCE_NUM_THREADS`` (one stream), and the
model is recompiled when :meth:`set_threads` changes it. openvino is imported when a runner is
created, so importing this module never fails where it is absent.

``adapt_qdq=True`` (default): an INT8 Q/DQ graph is compiled from an adapted in-memory copy
(:mod:`.openvino_qdq`: spike Q/DQ pairs in uint8, the other activation pairs as float arithmetic),
because on AVX2 CPUs without VNNI OpenVINO's u8 kernels saturate on this model's int8 activations
and change its predictions. The file is not touched. :meth:`describe` and
:meth:`executed_precision` say what was adapted (``qdq_adaptation``). The adaptation needs
``onnx``; it is imported only for graphs that quantise activations (the device bundle ships this
package without it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..base import Runner
from ..executed import INTEGER_TYPES, Op, conv_macs, summarize
from . import Backend

# Allocators that replace malloc through LD_PRELOAD and abort OpenVINO's CPU plugin: its TBB
# loads hwloc, which frees memory with glibc's free directly ("free(): invalid pointer" while
# compiling; seen here with tcmalloc 2.x and openvino 2026.4).
CONFLICTING_ALLOCATORS = ("libtcmalloc",)


def allocator_conflict(maps: Path = Path("/proc/self/maps")) -> str | None:
    """Why OpenVINO cannot run in this process (a preloaded allocator it crashes with), or None."""
    try:
        text = maps.read_text()
    except OSError:  # not Linux: nothing preloaded this way
        return None
    for lib in CONFLICTING_ALLOCATORS:
        if lib in text:
            return (f"{lib} is loaded in this process (LD_PRELOAD), and OpenVINO's CPU plugin aborts with it "
                    f"(free(): invalid pointer); run this command without LD_PRELOAD (make runs unroll, export, "
                    f"build and validate without it)")
    return None


class OpenVinoUnavailable(RuntimeError):
    """OpenVINO cannot run in this process (see :func:`allocator_conflict`)."""


class QdqAdaptationUnavailable(ImportError):
    """An INT8 Q/DQ graph, ``adapt_qdq=True`` and no ``onnx`` to adapt it with."""


def _has_fake_quantize(model: Any) -> bool:
    """Whether OpenVINO read activation Q/DQ pairs (it turns each into one FakeQuantize)."""
    return any(op.get_type_name() == "FakeQuantize" for op in model.get_ops())


def _precision_from_file(path: Path) -> str:
    """The ``precision`` metadata of the ONNX file (onnx, where installed), else a guess from its name."""
    try:
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        if props.get("precision"):
            return props["precision"]
    except Exception:  # onnx absent or the file unreadable by it: fall back to the name
        pass
    stem = path.stem.lower()
    return next((p for p in ("int8", "fp16", "fp32") if p in stem), "fp32")


class OpenVinoRunner(Runner):
    """``openvino.Core().compile_model(path, device, config)`` with one synchronous infer request."""

    name = "openvino"

    def __init__(self, path: Path | str, precision: str | None = None, threads: int | None = None,
                 inference_precision: str = "f32", device: str = "CPU",
                 config: Mapping[str, Any] | None = None, adapt_qdq: bool = True,
                 static_batch: int | None = None) -> None:
        conflict = allocator_conflict()
        if conflict:  # refuse before the plugin loads: it would abort the whole process
            raise OpenVinoUnavailable(conflict)
        import openvino as ov

        self._ov = ov
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX file not found: {self.path}")
        self.device = device
        self.inference_precision = inference_precision
        self.extra_config = dict(config or {})
        self.core = ov.Core()
        self.adapt_qdq = adapt_qdq
        self.qdq_adaptation: dict[str, Any] | None = None  # None: the graph quantises no activation
        self.model = self._read_model()
        # a static batch compiles other kernels than the dynamic one (measured: the default INT8 graph runs
        # 18 of 53 convs in u8 with a dynamic batch, 12 of 53 reshaped to batch 1): the report times both
        self.static_batch = static_batch
        if static_batch is not None:
            self.model.reshape({self.model.inputs[0].get_any_name():
                                [static_batch, *list(self.model.inputs[0].get_partial_shape())[1:]]})
        self.threads: int | None = None
        self._executed: dict[str, Any] | None = None
        self._compile(threads)
        self.precision = precision or _precision_from_file(self.path)

    def _read_model(self) -> Any:
        """``core.read_model`` of the file, or of its adapted copy for a Q/DQ graph (module docstring)."""
        model = self.core.read_model(str(self.path))
        if not _has_fake_quantize(model):
            return model
        if not self.adapt_qdq:
            self.qdq_adaptation = {"adapted": 0, "spikes_uint8": 0, "float_qdq": 0,
                                   "how": "off (adapt_qdq=False): the file's Q/DQ graph as it is"}
            return model
        try:
            import onnx

            from .openvino_qdq import adapt_qdq_for_openvino
        except ImportError as exc:
            raise QdqAdaptationUnavailable(
                f"{self.path.name} is an INT8 Q/DQ graph: OpenVINO runs it exactly only after adapting it, which "
                f"needs onnx ({exc}); pip install onnx, or pass adapt_qdq=False (its int8 predictions may then be "
                f"wrong on CPUs without VNNI)") from exc
        proto, counts = adapt_qdq_for_openvino(onnx.load(str(self.path)))
        self.qdq_adaptation = counts.to_dict()
        return self.core.read_model(proto.SerializeToString())

    def config(self, threads: int | None) -> dict[str, Any]:
        """The compile config: precision hint, one stream, the thread count where fixed, then ``config``."""
        cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": self.inference_precision, "NUM_STREAMS": 1}
        if threads:
            cfg["INFERENCE_NUM_THREADS"] = int(threads)
        cfg.update(self.extra_config)
        return cfg

    def _compile(self, threads: int | None) -> None:
        self.compiled = self.core.compile_model(self.model, self.device, self.config(threads))
        self.request = self.compiled.create_infer_request()
        self.threads = threads
        self._executed = None
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        first = self.compiled.inputs[0].get_partial_shape()
        self.input_shape = tuple(d.get_length() if d.is_static else None for d in first)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        res = self.request.infer({n: np.ascontiguousarray(v) for n, v in feeds.items()})
        return {n: np.asarray(res[o]) for n, o in zip(self.output_names, self.compiled.outputs)}

    def set_threads(self, threads: int | None) -> None:
        if threads and threads != self.threads:
            self._compile(threads)

    def executed_precision(self) -> dict[str, Any]:
        """Convolutions/matmuls by the precision OpenVINO compiled them in (its runtime model)."""
        if self._executed is None:
            self._executed = openvino_executed(self.compiled, self.qdq_adaptation)
        return self._executed

    def describe(self) -> dict[str, Any]:
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        return dict(super().describe(), runtime=f"openvino {self._ov.get_version()}", device=self.device,
                    execution_devices=list(self.compiled.get_property("EXECUTION_DEVICES")),
                    inference_precision=str(getattr(hint, "get_type_name", lambda: hint)()),
                    threads=int(self.compiled.get_property("INFERENCE_NUM_THREADS")),
                    streams=int(self.compiled.get_property("NUM_STREAMS")), qdq_adaptation=self.qdq_adaptation,
                    static_batch=self.static_batch)

    def close(self) -> None:
        self.request = None
        self.compiled = None


# ---------------------------------------------------------------- executed precision: OpenVINO
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



class Manager(Backend):
    """OpenVINO on an Intel CPU (iGPU/NPU through ``device=``): compiles the exported ONNX directly."""

    dists = ("openvino",)

    def is_available(self) -> tuple[bool, str]:
        conflict = allocator_conflict()
        if conflict:
            return False, conflict
        try:
            import openvino as ov
        except ImportError as exc:
            return False, f"openvino is not installed ({exc}); pip install openvino (x86-64 or ARM64 CPU)"
        try:
            devices = ov.Core().available_devices
        except Exception as exc:  # a broken plugin install is a state to report, not a crash
            return False, f"openvino {ov.get_version()} is installed but cannot list devices ({exc})"
        return True, f"openvino {ov.get_version()} ({', '.join(devices)})"

    def env_extra(self) -> dict[str, Any]:
        return {"openvino": self.version()}

    def build(self, onnx_path: Path) -> Path:
        return Path(onnx_path)  # compiled when the runner loads it

    def make_runner(self, model: Any, **options: Any) -> OpenVinoRunner:
        return OpenVinoRunner(model, **options)
