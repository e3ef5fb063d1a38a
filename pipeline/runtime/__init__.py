"""One runner interface over torch, ONNX Runtime, OpenVINO and TensorRT: load, predict, time.

Public API::

    Runner                      # name, precision, input_names, output_names, input_shape,
                                # run(feeds) -> dict, predict(x) -> logits, benchmark(...)
    benchmark(runner, batch, warmup, iters, threads) -> {p50_ms, p95_ms, mean_ms, throughput, ...}
    TorchRunner(module), OrtRunner(path, threads=...), TrtRunner(engine_path)   # TrtRunner: lazy
    OpenVinoRunner(path, threads=..., inference_precision="f32")               # imports openvino on creation
    runner.executed_precision() -> {int8_ops, ops, int8_mac_share, kernels, source, ...}  # see .executed and backends/<name>.py
    specs.SPECS                 # the backend table: one row per backend (stdlib only)
    BACKENDS / get_backend(name) -> Backend with is_available(), check_env(), version(), build(), runner()
    load_runner(path, backend=None)   # by suffix from the table: .onnx -> ONNX Runtime (or "openvino"), .engine -> TensorRT
    StepRunner                  # drives the streaming one-step graph with explicit membranes
    EngineSpec, build_engine    # TensorRT 10 engine builds

Each backend lives in ``backends/<name>.py``. Names are imported on first use, so that
``pipeline.runtime.specs`` (stdlib only) imports without numpy: the stage registry reads it.

Self-contained on purpose (no imports from the rest of ``pipeline``): the build stage copies
this package into the device bundle as ``staa_runtime``.
"""
from __future__ import annotations

import importlib
from typing import Any

# public name -> the submodule that defines it
_HOMES = {
    "BACKENDS": "backends", "GRAPH_BACKENDS": "backends", "Backend": "backends", "get_backend": "backends",
    "load_runner": "backends", "Runner": "base", "benchmark": "base", "example_input": "base",
    "TorchRunner": "backends.torch", "OrtRunner": "backends.onnxruntime", "OpenVinoRunner": "backends.openvino",
    "TrtRunner": "backends.tensorrt", "EngineSpec": "backends.tensorrt_build",
    "build_engine": "backends.tensorrt_build", "StepRunner": "stream",
}

__all__ = sorted(set(_HOMES) - {"TrtRunner"})


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value
