"""Synaptic operations and the energy estimate of a spiking model (DESIGN.md §6).

Why measured, not declared: whether a layer is "spike-driven" is a fact of the forward pass,
not of its type. A forward hook on every ``Conv2d`` / ``Linear`` (and on the global-context
weighted sum, the one attention matmul) looks at the tensor the layer actually receives:

- input binary ({0, c}, c within 5% of 1: spikes, possibly through a quantiser) -> spike-driven:
  each non-zero input triggers accumulates only. ``SOPs = MACs x input firing rate`` where
  MACs cover all T steps, i.e. ``MACs per step x firing rate x T``; energy ``0.9 pJ`` per SOP.
- anything else -> real-valued: every multiply-accumulate is paid, ``4.6 pJ`` per MAC. In the
  STAA-SNN this is the stem conv (it sees the analogue image, T times under direct encoding,
  as the model computes it), the attention parts that see the input current (GC's attention
  conv, weighted sum and transform, SA's two Linear layers on the pooled current) and the
  classifier FC, which sees spikes averaged over H x W (fractions, not spikes; counted as MACs,
  the conservative choice: reordering pool and FC would make it accumulate-only).

MACs per layer = output elements x (in_channels / groups) x kh x kw (conv) or output elements
x in_features (linear), summed over T*B and divided by the batch, so every number is per image.
Not counted: neuron updates, BN (folded for deployment), residual adds, pooling, softmax,
sigmoid gating; these are element-wise and small next to the convolutions.

The 45 nm figures (Horowitz, ISSCC 2014: 32-bit float MAC 4.6 pJ, add 0.9 pJ) are the
convention of the SNN literature; the result is an estimate, not a measurement, and it does
not model INT8 arithmetic or memory access.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor, nn

E_MAC_PJ = 4.6  # pJ per 32-bit float multiply-accumulate, 45 nm
E_AC_PJ = 0.9  # pJ per 32-bit float accumulate (synaptic operation), 45 nm
CONVENTION = ("estimate: 45 nm CMOS, 32-bit float ops (Horowitz 2014): 4.6 pJ per MAC for real-valued "
              "layers, 0.9 pJ per accumulate for spike-driven ones; SOPs = MACs x input firing rate "
              "(over all T steps); neuron updates, BN, pooling and memory access not counted")


@dataclass
class LayerOps:
    """One layer's operations per image (all T steps together)."""

    name: str
    kind: str  # "conv", "linear" or "matmul"
    spike_driven: bool  # its input was binary in every probe pass
    macs: float  # dense multiply-accumulates per image over all T steps
    input_rate: float  # share of non-zero inputs (the firing rate of its input spikes)
    sops: float  # synaptic operations per image (spike-driven layers; 0 otherwise)
    energy_pj: float  # per image

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


SPIKE_TOL = 0.05  # a quantiser maps a spike's 1.0 to round(1/s)*s, within half a step (s ~ 1/127) of 1


def _is_binary(x: Tensor, nonzero: Tensor) -> bool:
    """True when every value is 0 or one shared constant within ``SPIKE_TOL`` of 1 (spikes,
    maybe through a quantiser); an all-zero input counts as (silent) spikes. Averages of spikes
    (e.g. the classifier's pooled input: multiples of 1/(H*W)) are real values, not spikes."""
    top = x.amax()
    if top <= 0:
        return bool(x.amin() == 0)
    if abs(float(top) - 1.0) > SPIKE_TOL:
        return False
    return bool(x.amin() >= 0) and bool(((x == top) | ~nonzero).all())


def _conv_macs(m: nn.Conv2d, out: Tensor) -> float:
    kh, kw = m.kernel_size
    return float(out.numel()) * (m.in_channels // m.groups) * kh * kw


def _linear_macs(m: nn.Linear, out: Tensor) -> float:
    return float(out.numel()) * m.in_features


class OpCounter:
    """Accumulates MACs, non-zero inputs and binary-ness per layer, and the images seen.

    Filled by the hooks that :func:`count_ops` installs; read with :meth:`layers`.
    """

    def __init__(self) -> None:
        self.images = 0
        self.kind: dict[str, str] = {}
        self.macs: dict[str, float] = {}
        self.nonzero: dict[str, float] = {}
        self.inputs: dict[str, float] = {}
        self.binary: dict[str, bool] = {}

    def add(self, name: str, kind: str, macs: float, x: Tensor) -> None:
        x = x.detach()
        nonzero = x != 0
        self.kind[name] = kind
        self.macs[name] = self.macs.get(name, 0.0) + macs
        self.nonzero[name] = self.nonzero.get(name, 0.0) + float(nonzero.sum())
        self.inputs[name] = self.inputs.get(name, 0.0) + float(x.numel())
        # once real-valued, always real-valued: skip the check on later batches
        self.binary[name] = self.binary.get(name, True) and _is_binary(x, nonzero)

    def layers(self, e_mac_pj: float = E_MAC_PJ, e_ac_pj: float = E_AC_PJ) -> list[LayerOps]:
        """Per-image ``LayerOps`` for every layer seen, in first-call order."""
        if self.images == 0:
            raise ValueError("no forward pass was counted: run the model inside count_ops(...)")
        rows = []
        for name, macs_total in self.macs.items():
            macs = macs_total / self.images
            rate = self.nonzero[name] / max(self.inputs[name], 1.0)
            spiking = self.binary[name]
            sops = macs * rate if spiking else 0.0
            energy = sops * e_ac_pj if spiking else macs * e_mac_pj
            rows.append(LayerOps(name, self.kind[name], spiking, macs, rate, sops, energy))
        return rows


def _install(model: nn.Module, counter: OpCounter) -> list[Any]:
    """Hooks on every Conv2d / Linear, each global-context weighted sum, and the root (images)."""
    from pipeline.models import GlobalContext

    def root_hook(_mod: nn.Module, inp: tuple) -> None:
        counter.images += int(inp[0].shape[0])  # inputs are batch first

    handles = [model.register_forward_pre_hook(root_hook)]
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            def conv_hook(mod: nn.Module, inp: tuple, out: Tensor, name: str = name) -> None:
                counter.add(name, "conv", _conv_macs(mod, out), inp[0])
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            def lin_hook(mod: nn.Module, inp: tuple, out: Tensor, name: str = name) -> None:
                counter.add(name, "linear", _linear_macs(mod, out), inp[0])
            handles.append(m.register_forward_hook(lin_hook))
        elif isinstance(m, GlobalContext):
            # context = sum over H*W of attention x X: one MAC per input element ([T, B, C, H, W]).
            def gc_hook(mod: nn.Module, inp: tuple, out: Tensor, name: str = f"{name}.context") -> None:
                counter.add(name, "matmul", float(inp[0].numel()), inp[0])
            handles.append(m.register_forward_hook(gc_hook))
    return handles


@contextmanager
def count_ops(model: nn.Module) -> Iterator[OpCounter]:
    """Count the ops of every forward pass of ``model`` inside the block (batch-first inputs).

    The model runs at its own T: what ``forward`` computes is what is counted. Use it around
    the accuracy pass so that firing rates cover the whole test split at no extra cost; the
    hooks are removed on exit (never time a model inside this block).
    """
    counter = OpCounter()
    handles = _install(model, counter)
    try:
        yield counter
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def profile_ops(model: nn.Module, batches: Iterable[Tensor], device: str = "cpu") -> list[LayerOps]:
    """Per-image ops per layer of ``model`` over ``batches`` (a convenience around count_ops)."""
    model.eval()
    with count_ops(model) as counter:
        for x in batches:
            model(x.to(device))
    return counter.layers()


def summarize(layers: list[LayerOps]) -> dict[str, float]:
    """Totals per image: MACs (real-valued layers), SOPs, dense MACs of all layers, energy in µJ."""
    mac = sum(l.macs for l in layers if not l.spike_driven)
    sops = sum(l.sops for l in layers)
    energy_pj = sum(l.energy_pj for l in layers)
    return {"macs": mac, "sops": sops, "dense_macs": sum(l.macs for l in layers),
            "energy_uj": energy_pj * 1e-6, "energy_pj": energy_pj}


__all__ = ["E_AC_PJ", "E_MAC_PJ", "CONVENTION", "LayerOps", "OpCounter", "count_ops", "profile_ops", "summarize"]
