"""The latency harness against runners of known speed: percentiles and throughput reflect the
timed calls, warm-up is never timed, the thread setting is in force while timing."""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import pytest
import torch

from pipeline.report.measure import Settings, measure_speed, tile_batch
from pipeline.runtime.base import Runner, benchmark


class ScheduledRunner(Runner):
    """A plain Python runner whose n-th call sleeps ``schedule[n]`` seconds (then ``per_image_s``
    x batch + ``base_s``); records the batch of every call and every ``set_threads``."""

    name = "fake"

    def __init__(self, schedule: Sequence[float] = (), base_s: float = 0.001, per_image_s: float = 0.0) -> None:
        self.input_names, self.output_names, self.input_shape = ["x"], ["y"], (None, 3)
        self.schedule, self.base_s, self.per_image_s = list(schedule), base_s, per_image_s
        self.calls: list[int] = []
        self.threads: list[int | None] = []

    def run(self, feeds):
        x = feeds["x"]
        n = len(self.calls)
        self.calls.append(len(x))
        time.sleep(self.schedule[n] if n < len(self.schedule) else self.base_s + self.per_image_s * len(x))
        return {"y": np.zeros((len(x), 2), np.float32)}

    def set_threads(self, threads):
        self.threads.append(threads)


def test_benchmark_times_only_the_timed_calls():
    """3 warm-up calls of 300 ms, then 18 calls of 2 ms and 2 of 50 ms: p50 ~ 2, p95 ~ 50, mean 6.8."""
    runner = ScheduledRunner([0.3] * 3 + [0.002] * 18 + [0.05] * 2)
    res = benchmark(runner, batch=4, warmup=3, iters=20, threads=2)
    assert runner.calls == [4] * 23 and runner.threads == [2]
    assert res["iters"] == 20 and res["warmup"] == 3 and res["batch"] == 4
    assert 2 <= res["p50_ms"] < 10  # the fast calls
    assert 50 <= res["p95_ms"] < 150  # the two slow timed calls are the top 10%
    assert 6.8 <= res["mean_ms"] < 20  # a timed 300 ms warm-up call would add >= 15 ms to the mean
    assert res["throughput"] == pytest.approx(4 / (res["mean_ms"] / 1e3), rel=1e-9)  # images per second


def test_measure_speed_latency_at_smallest_throughput_at_largest():
    """A runner taking 2 ms + 1 ms per image: latency at batch 1 ~ 3 ms, throughput at batch 8 ~ 800/s."""
    runner = ScheduledRunner(base_s=0.002, per_image_s=0.001)
    settings = Settings(batch_sizes=(8, 1), warmup=2, iterations=5, threads=1, num_classes=10)
    prev = torch.get_num_threads()
    out = measure_speed(runner, np.ones((3, 3), np.float32), settings)
    assert torch.get_num_threads() == prev  # the timing thread count does not leak into later passes
    assert runner.calls == [1] * 7 + [8] * 7  # (warm-up 2 + 5 timed) per batch size, real inputs tiled
    assert out["latency"]["batch"] == 1 and out["throughput"]["batch"] == 8
    assert 3 <= out["latency"]["p50_ms"] < 12
    b8 = out["benchmarks"][-1]
    assert out["throughput"]["images_per_s"] == pytest.approx(8e3 / b8["mean_ms"], rel=1e-9)
    assert 8 / 0.030 < out["throughput"]["images_per_s"] <= 8 / 0.010  # 10 ms per call of 8 images
    capped = measure_speed(ScheduledRunner(), np.ones((3, 3), np.float32), settings, max_batch=4)
    assert capped["throughput"]["batch"] == 4  # an engine profile's maximum batch is respected


def test_tile_batch_repeats_real_inputs():
    sample = np.arange(6, dtype=np.float32).reshape(3, 2)
    out = tile_batch(sample, 7)
    assert out.shape == (7, 2) and out.dtype == np.float32
    np.testing.assert_array_equal(out[3:6], sample)


class ThreadProbe(torch.nn.Module):
    """A real torch model that records the batch and torch's thread count on every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(12, 3)
        self.seen: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((len(x), torch.get_num_threads()))
        return self.fc(x.flatten(1))


def test_torch_runner_threads_in_force_while_timed():
    from pipeline.runtime.backends.torch import TorchRunner

    probe = ThreadProbe()
    runner = TorchRunner(probe, input_shape=(None, 3, 2, 2))
    settings = Settings(batch_sizes=(1, 4), warmup=1, iterations=3, threads=1, num_classes=3)
    prev = torch.get_num_threads()
    torch.set_num_threads(2)  # what the accuracy pass ran with; timing must use settings.threads
    try:
        out = measure_speed(runner, np.random.default_rng(0).standard_normal((2, 3, 2, 2)).astype(np.float32),
                            settings)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(prev)
    assert probe.seen == [(1, 1)] * 4 + [(4, 1)] * 4  # warm-up + timed calls, each on 1 thread
    assert out["throughput"]["images_per_s"] == pytest.approx(4e3 / out["benchmarks"][-1]["mean_ms"], rel=1e-9)
    with pytest.raises(ValueError, match="iters"):
        benchmark(runner, iters=0)
