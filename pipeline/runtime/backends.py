"""Backend managers (in the style of mmdeploy's): availability, environment, build, runner.

A missing backend is a reported state, never an import-time crash: ``is_available()`` returns
``(False, reason)`` and the caller records the reason (the build stage's "skipped" record).
"""
from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from .base import Runner
from .trt_build import BuildRequest, build_all


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


class Backend:
    """Base: subclasses set ``name`` and override what applies."""

    name = "backend"

    def is_available(self) -> tuple[bool, str]:
        raise NotImplementedError

    def check_env(self) -> dict[str, Any]:
        ok, reason = self.is_available()
        return {"backend": self.name, "available": ok, "reason": reason, "python": platform.python_version(),
                "machine": platform.machine()}

    def build(self, *args: Any, **kwargs: Any) -> Any:
        """Turn an exported model into what :meth:`runner` loads (identity where nothing is built)."""
        raise NotImplementedError(f"{self.name} has no build step")

    def runner(self, model: Any, **kwargs: Any) -> Runner:
        raise NotImplementedError


class TorchBackend(Backend):
    name = "torch"

    def is_available(self) -> tuple[bool, str]:
        try:
            import torch
        except ImportError as exc:
            return False, f"torch is not installed ({exc})"
        return True, f"torch {torch.__version__}"

    def build(self, module: Any) -> Any:
        return module

    def runner(self, model: Any, **kwargs: Any) -> Runner:
        from .torch_runner import TorchRunner

        return TorchRunner(model, **kwargs)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def is_available(self) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            return False, f"onnxruntime is not installed ({exc})"
        return True, f"onnxruntime {ort.__version__} ({', '.join(ort.get_available_providers())})"

    def build(self, onnx_path: Path) -> Path:
        return Path(onnx_path)

    def runner(self, model: Any, **kwargs: Any) -> Runner:
        from .ort_runner import OrtRunner

        return OrtRunner(model, **kwargs)


class OpenVinoBackend(Backend):
    """OpenVINO on an Intel CPU (iGPU/NPU through ``device=``): compiles the exported ONNX directly."""

    name = "openvino"

    def is_available(self) -> tuple[bool, str]:
        from .openvino_runner import allocator_conflict

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

    def check_env(self) -> dict[str, Any]:
        env = super().check_env()
        env["openvino"] = _version("openvino")
        return env

    def build(self, onnx_path: Path) -> Path:
        return Path(onnx_path)  # compiled when the runner loads it

    def runner(self, model: Any, **kwargs: Any) -> Runner:
        from .openvino_runner import OpenVinoRunner

        return OpenVinoRunner(model, **kwargs)


class TensorRTBackend(Backend):
    """TensorRT 10 through its Python API; needs the ``tensorrt`` package and a CUDA GPU."""

    name = "tensorrt"

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

    def check_env(self) -> dict[str, Any]:
        env = super().check_env()
        env.update({"tensorrt": _version("tensorrt") or _version("tensorrt-cu12") or _version("tensorrt_cu13"),
                    "torch": _version("torch")})
        return env

    def build(self, request: BuildRequest) -> dict[str, Any]:
        """Build ``request``'s engines in its folder: ``{engine name: result or {"error": ...}}``."""
        return build_all(request)

    def runner(self, model: Any, **kwargs: Any) -> Runner:
        from .trt_runner import TrtRunner

        return TrtRunner(model, **kwargs)


def _cuda_device() -> tuple[bool, str]:
    """(True, GPU name) or (False, why not); asks torch, which the engine runner uses for buffers."""
    try:
        import torch
    except ImportError:
        return False, "torch (used for CUDA buffers by the engine runner) is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible (torch.cuda.is_available() is False)"
    return True, torch.cuda.get_device_name(0)


BACKENDS: dict[str, Backend] = {b.name: b for b in (TorchBackend(), OnnxRuntimeBackend(), OpenVinoBackend(),
                                                     TensorRTBackend())}
GRAPH_BACKENDS = ("onnxruntime", "openvino")  # what can run an .onnx file


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise KeyError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}") from None


def load_runner(path: Path | str, backend: str | None = None, **kwargs: Any) -> Runner:
    """A runner for a file, chosen by suffix: ``.onnx`` -> ONNX Runtime (``backend="openvino"``: OpenVINO),
    ``.engine``/``.plan`` -> TensorRT. An unavailable backend raises RuntimeError with the reason."""
    path = Path(path)
    if path.suffix == ".onnx":
        name = backend or "onnxruntime"
        if name not in GRAPH_BACKENDS:
            raise ValueError(f"{path.name} is an ONNX graph: backend must be one of {', '.join(GRAPH_BACKENDS)}, "
                             f"got {name!r}")
    elif path.suffix in (".engine", ".plan", ".trt"):
        name = backend or "tensorrt"
        if name != "tensorrt":
            raise ValueError(f"{path.name} is a TensorRT engine: only backend 'tensorrt' runs it, got {name!r}")
    else:
        raise ValueError(f"no runner for {path.name}: expected .onnx or .engine")
    ok, reason = get_backend(name).is_available()
    if not ok:
        raise RuntimeError(f"cannot run {path.name}: {reason}")
    return get_backend(name).runner(path, **kwargs)
