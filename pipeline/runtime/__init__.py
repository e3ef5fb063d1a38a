"""One runner interface over torch, ONNX Runtime, OpenVINO and TensorRT: load, predict, time.

Public API::

    Runner                      # name, precision, input_names, output_names, input_shape,
                                # run(feeds) -> dict, predict(x) -> logits, benchmark(...)
    benchmark(runner, batch, warmup, iters, threads) -> {p50_ms, p95_ms, mean_ms, throughput, ...}
    TorchRunner(module), OrtRunner(path, threads=...), TrtRunner(engine_path)   # TrtRunner: lazy
    OpenVinoRunner(path, threads=..., inference_precision="f32")               # imports openvino on creation
    runner.executed_precision() -> {int8_ops, ops, int8_mac_share, kernels, source, ...}  # see .executed
    BACKENDS / get_backend(name) -> Backend with is_available(), check_env(), build(), runner()
    load_runner(path, backend=None)   # .onnx -> ONNX Runtime (or "openvino"), .engine -> TensorRT
    StepRunner                  # drives the streaming one-step graph with explicit membranes
    EngineSpec, build_engine    # TensorRT 10 engine builds (imported lazily)

Self-contained on purpose (no imports from the rest of ``pipeline``): the build stage copies
this package into the device bundle as ``staa_runtime``.
"""
from .backends import BACKENDS, GRAPH_BACKENDS, Backend, get_backend, load_runner
from .base import Runner, benchmark, example_input
from .openvino_runner import OpenVinoRunner
from .ort_runner import OrtRunner
from .stream import StepRunner
from .torch_runner import TorchRunner
from .trt_build import EngineSpec, build_engine

__all__ = ["BACKENDS", "GRAPH_BACKENDS", "Backend", "EngineSpec", "OpenVinoRunner", "OrtRunner", "Runner", "StepRunner",
           "TorchRunner", "benchmark", "build_engine", "example_input", "get_backend", "load_runner"]


def __getattr__(name: str):
    if name == "TrtRunner":
        from .trt_runner import TrtRunner

        return TrtRunner
    raise AttributeError(name)
