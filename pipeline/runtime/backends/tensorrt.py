"""The TensorRT backend: a runner over a serialized TensorRT 10 engine (``execute_async_v3`` with tensor addresses).

Device buffers and the CUDA stream come from torch (present on Jetson with NVIDIA's wheels),
which keeps this free of pycuda. TensorRT and torch are imported when a runner is created, so
importing this module never fails where they are absent.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..base import Runner
from ..executed import Op, dims_product, summarize
from . import Backend, dist_version
from .tensorrt_build import BuildRequest, build_all


class TrtRunner(Runner):
    """Deserialize ``engine_path`` and run it on CUDA device ``device``."""

    name = "tensorrt"

    def __init__(self, engine_path: Path | str, precision: str | None = None, device: int = 0) -> None:
        import tensorrt as trt
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("TrtRunner needs a CUDA device (torch.cuda.is_available() is False)")
        self._trt, self._torch = trt, torch
        self.path = Path(engine_path)
        self.device = torch.device("cuda", device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{self.path} could not be deserialized: engines are tied to the GPU model and "
                               f"TensorRT version they were built with; rebuild it on this device")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(device=self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        first = tuple(self.engine.get_tensor_shape(self.input_names[0]))
        self.input_shape = tuple(None if d < 0 else int(d) for d in first)
        self.precision = precision or self._guess_precision()

    def _guess_precision(self) -> str:
        stem = self.path.stem.lower()
        return next((p for p in ("int8", "fp16", "fp32") if p in stem), "unknown")

    def _np_dtype(self, name: str) -> np.dtype:
        return np.dtype(self._trt.nptype(self.engine.get_tensor_dtype(name)))

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        keep: list[Any] = []  # device tensors must outlive the launch
        with torch.cuda.stream(self.stream):
            for name in self.input_names:
                host = np.ascontiguousarray(feeds[name], dtype=self._np_dtype(name))
                dev = torch.from_numpy(host).to(self.device, non_blocking=False)
                self.context.set_input_shape(name, tuple(host.shape))
                self.context.set_tensor_address(name, dev.data_ptr())
                keep.append(dev)
            outs: dict[str, Any] = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                dtype = torch.from_numpy(np.empty(0, self._np_dtype(name))).dtype
                outs[name] = torch.empty(shape, dtype=dtype, device=self.device)
                self.context.set_tensor_address(name, outs[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT execution failed for {self.path.name}")
        self.stream.synchronize()
        return {n: t.cpu().numpy() for n, t in outs.items()}

    def executed_precision(self) -> dict[str, Any]:
        """The engine's layers by precision, from TensorRT's engine inspector (JSON).

        With the execution context attached the inspector reports the formats of this context's
        shapes; the engine must have been built with ``ProfilingVerbosity.DETAILED`` (tensorrt_build does).
        """
        inspector = self.engine.create_engine_inspector()
        try:
            inspector.execution_context = self.context
        except (AttributeError, TypeError):  # older bindings name it differently: engine-wide info still works
            pass
        return tensorrt_executed(inspector.get_engine_information(self._trt.LayerInformationFormat.JSON))

    def describe(self) -> dict[str, Any]:
        return dict(super().describe(), runtime=f"tensorrt {self._trt.__version__}", device=str(self.device),
                    engine=str(self.path))

    def close(self) -> None:
        self.context = None
        self.engine = None


# ---------------------------------------------------------------- executed precision: TensorRT
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
                macs = dims_product(dims[2:]) * float(weights["Count"])
        fmt = "int8" if integer else str((inputs[0] if inputs else {}).get("Format/Datatype", "?")).split(" ")[-1]
        ops.append(Op(kind, integer, f"{ltype}:{fmt}", macs))
    return summarize(ops, "TensorRT engine layer information (IEngineInspector JSON: LayerType, Format/Datatype of "
                          "inputs, Weights.Type, TacticName)",
                     float_reason="TensorRT chose float kernels for the convolutions (no Int8 input format)",
                     opaque_layers=dict(opaque))



class Manager(Backend):
    """TensorRT 10 through its Python API; needs the ``tensorrt`` package and a CUDA GPU."""

    dists = ("tensorrt", "tensorrt-cu12", "tensorrt_cu13")

    def is_available(self) -> tuple[bool, str]:
        try:
            import tensorrt as trt
        except ImportError as exc:
            return False, (f"the tensorrt Python package is not installed ({exc}); TensorRT needs an NVIDIA GPU "
                           f"(pip install tensorrt on x86 with CUDA, or JetPack's python3-libnvinfer on a Jetson)")
        major = int(str(trt.__version__).split(".")[0])
        if major < 10:
            return False, f"TensorRT {trt.__version__} found; this pipeline targets the TensorRT 10 API"
        cuda, why = _cuda_device()
        if not cuda:
            return False, f"TensorRT {trt.__version__} is installed but {why}"
        return True, f"TensorRT {trt.__version__} on {why}"

    def env_extra(self) -> dict[str, Any]:
        return {"tensorrt": self.version(), "torch": dist_version("torch")}

    def build(self, request: BuildRequest) -> dict[str, Any]:
        """Build ``request``'s engines in its folder: ``{engine name: result or {"error": ...}}``."""
        return build_all(request)

    def make_runner(self, model: Any, **options: Any) -> TrtRunner:
        return TrtRunner(model, **options)


def _cuda_device() -> tuple[bool, str]:
    """(True, GPU name) or (False, why not); asks torch, which the engine runner uses for buffers."""
    try:
        import torch
    except ImportError:
        return False, "torch (used for CUDA buffers by the engine runner) is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible (torch.cuda.is_available() is False)"
    return True, torch.cuda.get_device_name(0)
