"""The latency harness: percentiles ordered, throughput positive, warm-up never timed, threads fixed."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from pipeline.report.measure import Settings, measure_speed, tile_batch
from pipeline.runtime.base import Runner, benchmark


class CountingRunner(Runner):
    """Counts calls; the first ``slow_calls`` take ``slow_s`` (a warm-up that must not be timed)."""

    name = "fake"

    def __init__(self, slow_calls: int, slow_s: float = 0.05, fast_s: float = 0.001) -> None:
        self.input_names, self.output_names, self.input_shape = ["x"], ["y"], (None, 3)
        self.calls: list[int] = []
        self.threads: list[int | None] = []
        self.slow_calls, self.slow_s, self.fast_s = slow_calls, slow_s, fast_s

    def run(self, feeds):
        x = feeds["x"]
        self.calls.append(len(x))
        time.sleep(self.slow_s if len(self.calls) <= self.slow_calls else self.fast_s)
        return {"y": np.zeros((len(x), 2), np.float32)}

    def set_threads(self, threads):
        self.threads.append(threads)


def test_benchmark_excludes_warmup_and_orders_percentiles():
    runner = CountingRunner(slow_calls=3)
    res = benchmark(runner, batch=4, warmup=3, iters=10, threads=2)
    assert len(runner.calls) == 3 + 10  # warm-up calls happened ...
    assert res["p95_ms"] < 25  # ... but none of the 50 ms ones was timed
    assert 0 < res["p50_ms"] <= res["p95_ms"]
    assert res["throughput"] > 0 and res["iters"] == 10 and res["warmup"] == 3
    assert runner.threads == [2]
    assert set(runner.calls) == {4}


def test_measure_speed_latency_at_smallest_throughput_at_largest():
    runner = CountingRunner(slow_calls=0)
    settings = Settings(batch_sizes=(8, 1), warmup=2, iterations=5, threads=1, num_classes=10)
    prev = torch.get_num_threads()
    out = measure_speed(runner, np.ones((3, 3), np.float32), settings)
    assert torch.get_num_threads() == prev  # the timing thread count does not leak into later passes
    assert out["latency"]["batch"] == 1 and out["throughput"]["batch"] == 8
    assert out["latency"]["p50_ms"] <= out["latency"]["p95_ms"]
    assert out["throughput"]["images_per_s"] > 0
    assert runner.calls == [1] * 7 + [8] * 7  # (warm-up 2 + 5 timed) per batch size, real inputs tiled
    capped = measure_speed(CountingRunner(0), np.ones((3, 3), np.float32), settings, max_batch=4)
    assert capped["throughput"]["batch"] == 4  # an engine profile's maximum batch is respected


def test_tile_batch_repeats_real_inputs():
    sample = np.arange(6, dtype=np.float32).reshape(3, 2)
    out = tile_batch(sample, 7)
    assert out.shape == (7, 2) and out.dtype == np.float32
    np.testing.assert_array_equal(out[3:6], sample)


def test_torch_runner_through_the_harness():
    from pipeline.runtime.torch_runner import TorchRunner

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    runner = TorchRunner(model, input_shape=(None, 3, 2, 2))
    out = measure_speed(runner, np.random.default_rng(0).standard_normal((2, 3, 2, 2)).astype(np.float32),
                        Settings(batch_sizes=(1, 4), warmup=1, iterations=3, threads=1, num_classes=3))
    assert out["latency"]["p50_ms"] <= out["latency"]["p95_ms"]
    assert out["throughput"]["images_per_s"] > 0
    with pytest.raises(ValueError):
        benchmark(runner, iters=0)
