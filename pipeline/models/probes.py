"""Spike probes: record spike tensors, membranes or firing rates of every neuron during forward passes.

Hooks exist only inside the ``with`` block, so models pay nothing when no probe is active.
``record_spikes`` / ``record_firing_rates`` read each neuron's output (a forward hook: the fused training
node keeps running); :func:`recording` reads every step through the neurons' own step hook
(``BaseLIF.register_step_hook``), so it sees the membrane too and runs the per-step loop.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor, nn

from .neurons import BaseLIF, neuron_modules


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


@dataclass
class Recording:
    """Per neuron (qualified name, forward order), the steps of the last forward pass, stacked ``[T, B, ...]``:
    ``spikes`` and ``membranes`` (``h - v_th``: the charged membrane before reset, relative to the threshold,
    which is what a flip's margin is measured in). Detached."""

    steps: dict[str, list[tuple[Tensor, Tensor]]] = field(default_factory=dict)

    @property
    def spikes(self) -> dict[str, Tensor]:
        return {k: torch.stack([s for s, _ in v]) for k, v in self.steps.items()}

    @property
    def membranes(self) -> dict[str, Tensor]:
        return {k: torch.stack([h for _, h in v]) for k, v in self.steps.items()}


@contextmanager
def recording(model: nn.Module) -> Iterator[Recording]:
    """Yield a :class:`Recording` of every neuron's steps, restarted by each forward pass of that neuron."""
    rec = Recording()

    def on_step(name: str):
        def hook(m: BaseLIF, h: Tensor, s: Tensor, _u: Tensor) -> None:
            rec.steps[name].append((s.detach(), (h - m.v_th).detach()))

        return hook

    def on_forward(name: str):
        def pre(_m: nn.Module, _inp) -> None:
            rec.steps[name] = []

        return pre

    with ExitStack() as stack:
        for name, m in neuron_modules(model):
            rec.steps[name] = []
            stack.callback(m.register_step_hook(on_step(name)).remove)
            stack.callback(m.register_forward_pre_hook(on_forward(name)).remove)
        yield rec


@contextmanager
def record_membranes(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Yield ``{neuron name: h - v_th [T, B, ...]}`` of the last forward pass, filled when the block ends."""
    store: dict[str, Tensor] = {}
    with recording(model) as rec:
        try:
            yield store
        finally:
            store.update(rec.membranes)
