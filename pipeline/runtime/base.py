"""The one runner interface every backend implements, and the benchmark they all share.

A runner owns a loaded model (torch module, ONNX Runtime session, TensorRT engine) and answers
``predict(x) -> logits`` on numpy arrays, so accuracy, agreement and latency are measured the
same way for every artifact. ``run(feeds) -> outputs`` is the primitive (graphs with several
inputs, e.g. the streaming step graph); ``predict`` is its single-input, single-output case.

This package imports nothing from the rest of ``pipeline`` so that it can be copied next to
the ONNX files onto a device (the build stage bundles it as ``staa_runtime``).
"""
from __future__ import annotations

import abc
import time
from typing import Any, Mapping

import numpy as np


class NonFiniteInput(ValueError):
    """An input holds NaN or infinity. A spiking net turns them into ordinary-looking logits (a NaN
    membrane never crosses the threshold), so the prediction would look valid and be noise."""


def check_finite(x: np.ndarray, what: str = "input") -> None:
    """Raise :class:`NonFiniteInput` (how many samples, which values) unless every float of ``x`` is finite."""
    x = np.asarray(x)
    if x.dtype.kind not in "fc" or np.isfinite(x).all():
        return
    bad = ~np.isfinite(x)
    rows = int(bad.reshape(len(x), -1).any(axis=1).sum()) if x.ndim else 1
    kinds = [name for name, hit in (("NaN", np.isnan(x).any()), ("+inf", np.isposinf(x).any()),
                                    ("-inf", np.isneginf(x).any())) if hit]
    raise NonFiniteInput(f"{rows} of {len(x) if x.ndim else 1} {what} samples hold non-finite values "
                         f"({int(bad.sum())} values: {', '.join(kinds)})")


class Runner(abc.ABC):
    """A loaded model behind a numpy interface.

    Attributes: ``name`` (backend: "torch", "onnxruntime", "openvino", "tensorrt"), ``precision``
    ("fp32", "fp16", "int8"), ``input_names`` / ``output_names``, ``input_shape`` (of the first
    input; ``None`` marks the dynamic batch axis).
    """

    name: str = "runner"
    precision: str = "fp32"
    input_names: list[str]
    output_names: list[str]
    input_shape: tuple[int | None, ...]

    @abc.abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output for the given named inputs."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Float32 logits ``[B, num_classes]`` for one batch ``x`` (float32, batch first)."""
        out = self.run({self.input_names[0]: np.ascontiguousarray(x, dtype=np.float32)})
        return np.asarray(out[self.output_names[0]], dtype=np.float32)

    def predict_all(self, x: np.ndarray, batch_size: int = 64, allow_nonfinite: bool = False) -> np.ndarray:
        """``predict`` over a large array in chunks (keeps memory flat on small devices); refuses NaN or
        infinite inputs (:class:`NonFiniteInput`) unless ``allow_nonfinite``."""
        if not allow_nonfinite:
            check_finite(x)
        parts = [self.predict(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

    def set_threads(self, threads: int | None) -> None:
        """Fix the CPU thread count for timing (no-op where it does not apply)."""

    def benchmark(self, batch: int = 1, warmup: int = 5, iters: int = 30, threads: int | None = None,
                  min_seconds: float = 0.0) -> dict[str, Any]:
        return benchmark(self, batch=batch, warmup=warmup, iters=iters, threads=threads, min_seconds=min_seconds)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "precision": self.precision, "input_shape": list(self.input_shape),
                "inputs": list(self.input_names), "outputs": list(self.output_names)}

    def executed_precision(self) -> dict[str, Any] | None:
        """What the runtime really executed: convolutions and matmuls by kernel precision, read from
        its own executed graph (see :mod:`.executed` for the keys); ``None`` where a backend cannot say."""
        return None

    def close(self) -> None:
        """Release the model (sessions, CUDA contexts)."""

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def example_input(runner: Runner, batch: int, seed: int = 0) -> np.ndarray:
    """A deterministic float32 input of the runner's shape with the batch axis set to ``batch``."""
    shape = tuple(batch if d is None else d for d in runner.input_shape)
    shape = (batch,) + shape[1:]
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# what the validate stage times with by default (validate.warmup, .iterations, .threads, .min_seconds):
# the device CLI uses the same, so a number from `staa_runtime bench` compares with the report's
BENCH_DEFAULTS: dict[str, Any] = {"warmup": 5, "iters": 30, "threads": 1, "min_seconds": 0.5}


def benchmark(runner: Runner, batch: int = 1, warmup: int = 5, iters: int = 30, threads: int | None = None,
              x: np.ndarray | None = None, min_seconds: float = 0.0) -> dict[str, Any]:
    """Latency statistics and throughput of ``runner.predict`` at one batch size.

    Wall-clock per call (host to host: for TensorRT this includes the copies to and from the
    GPU, as an application sees it), after ``warmup`` untimed calls, with ``threads`` fixed
    where the backend uses CPU threads. Timing runs at least ``iters`` calls and at least
    ``min_seconds`` seconds (so fast graphs get enough samples for a stable p95/p99);
    ``iters`` in the result is the number of calls timed.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    runner.set_threads(threads)
    x = example_input(runner, batch) if x is None else x
    for _ in range(max(warmup, 0)):
        runner.predict(x)
    samples: list[float] = []
    begin = time.perf_counter()
    while len(samples) < iters or time.perf_counter() - begin < min_seconds:
        start = time.perf_counter()
        runner.predict(x)
        samples.append(time.perf_counter() - start)
    wall = time.perf_counter() - begin  # what min_seconds bounds (calls plus the loop's own overhead)
    times = np.asarray(samples)
    ms = times * 1e3
    return {
        "backend": runner.name, "precision": runner.precision, "batch": int(batch), "iters": int(len(times)),
        "warmup": int(warmup), "threads": threads, "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)), "mean_ms": float(ms.mean()),
        "throughput": float(batch * len(times) / times.sum()),  # samples per second
        "p99_ms": float(np.percentile(ms, 99)), "min_ms": float(ms.min()), "max_ms": float(ms.max()),
        "std_ms": float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
        "min_iters": int(iters), "min_seconds": float(min_seconds), "timed_s": float(wall),
    }
