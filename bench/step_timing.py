"""What the training-step benches share: the network and timing arguments, one SGD step, interleaved timing.

Why one place: ``bench/peer_spikingjelly.py`` (ours vs SpikingJelly) and ``bench/staa_parts.py`` (each STAA
part) must time steps the same way for their ratios to be comparable: warm-up first, then rounds that
alternate which model goes first (a slow drift of the machine then hits every model alike), median per model.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch import nn


def add_step_args(ap: argparse.ArgumentParser, *, rounds: int, steps: int, threads: int) -> None:
    """The network (ResNet-19 width, T, batch, image, classes) and timing (rounds, steps, warm-up, threads) options."""
    ap.add_argument("--width", type=float, default=0.125)
    ap.add_argument("--T", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--image", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=rounds, help="interleaved timing rounds (median taken)")
    ap.add_argument("--steps", type=int, default=steps, help="timed steps per model and round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=threads)


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
             reset: Callable[[nn.Module], None] | None = None) -> None:
    """One training step: forward, cross-entropy, backward, update (and a stateful library's reset)."""
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    if reset is not None:
        reset(model)


def interleaved_seconds(steps: dict[str, Callable[[], None]], rounds: int, per_round: int,
                        warmup: int) -> dict[str, float]:
    """Median seconds per step of every entry, timed in ``rounds`` rounds whose order alternates."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(rounds):
        for k in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            start = time.perf_counter()
            for _ in range(per_round):
                steps[k]()
            times[k].append((time.perf_counter() - start) / per_round)
    return {k: statistics.median(v) for k, v in times.items()}
