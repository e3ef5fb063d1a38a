"""Spike probes: record spike tensors or firing rates of every neuron during forward passes.

Hooks exist only inside the ``with`` block, so models pay nothing when no probe is active.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from .neurons import neuron_modules


@contextmanager
def _hooked(model: nn.Module, make_hook) -> Iterator[None]:
    """Register ``make_hook(name)`` on every neuron; always remove them on exit."""
    handles = [m.register_forward_hook(make_hook(name)) for name, m in neuron_modules(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def record_spikes(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Yield ``{neuron name: spikes [T, B, ...]}`` (detached), overwritten by each forward pass."""
    store: dict[str, Tensor] = {}

    def make_hook(name: str):
        def hook(_m: nn.Module, _inp, out: Tensor) -> None:
            store[name] = out.detach()

        return hook

    with _hooked(model, make_hook):
        yield store


@contextmanager
def record_firing_rates(model: nn.Module) -> Iterator[dict[str, float]]:
    """Yield ``{neuron name: mean firing rate}``, accumulated over every forward pass in the block."""
    rates: dict[str, float] = {}
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}

    def make_hook(name: str):
        def hook(_m: nn.Module, _inp, out: Tensor) -> None:
            sums[name] = sums.get(name, 0.0) + float(out.detach().sum(dtype=torch.float64))
            counts[name] = counts.get(name, 0) + out.numel()
            rates[name] = sums[name] / counts[name]

        return hook

    with _hooked(model, make_hook):
        yield rates
