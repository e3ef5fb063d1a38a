"""Synaptic operations and the energy estimate of a spiking model (docs/architecture.md §6).

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

Element-wise real arithmetic (rows of kind ``"elementwise"``), counted from tensor shapes by
hooks on the modules that do it, so the count does not depend on how a gate is written:

- multiplies at ``E_MUL_PJ`` = 3.7 pJ (45 nm 32-bit float multiply; a MAC is multiply + add,
  3.7 + 0.9 = 4.6): GC's gate (``"mul"`` fusion: one per element of its output), SA's gate (one
  per element of its input, whether that is the current or, with ``sa_position: after``, the
  spikes: conservative), and in every neuron ``N * I`` (T steps) and ``M * U`` (steps 2..T;
  the membrane is zero at step 1). A Python-float coefficient of exactly 1 (``N``) or 0 (``M``)
  costs nothing; a learnable per-channel one (the adaptive LIF) is always paid.
- adds at ``E_AC_PJ`` = 0.9 pJ (45 nm 32-bit float add) where a spiking unit adds two real
  tensors element-wise: the position encoding ``X + PE``, GC's ``"add"`` fusion and the
  membrane's ``M * U + N * I`` (steps 2..T). Adds inside reductions, bias adds and the residual
  add between blocks are not counted (``EXCLUDED`` lists them).

What is still not counted is listed, with the reason, in ``EXCLUDED`` (and in every energy
summary as ``excluded``). The 45 nm figures (Horowitz, ISSCC 2014: 32-bit float multiply
3.7 pJ, add 0.9 pJ, MAC 4.6 pJ) are the convention of the SNN literature; the result is an
estimate, not a measurement, and it does not model INT8 arithmetic or memory access.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor, nn

from pipeline.models import BaseLIF, GlobalContext, PositionEncoding, StepAttention

E_MAC_PJ = 4.6  # pJ per 32-bit float multiply-accumulate, 45 nm
E_AC_PJ = 0.9  # pJ per 32-bit float accumulate / add (synaptic operation, element-wise add), 45 nm
E_MUL_PJ = 3.7  # pJ per 32-bit float multiply (element-wise), 45 nm
CONVENTION = ("estimate: 45 nm CMOS, 32-bit float ops (Horowitz 2014): 4.6 pJ per MAC for real-valued "
              "layers, 0.9 pJ per accumulate for spike-driven ones; SOPs = MACs x input firing rate "
              "(over all T steps); element-wise real multiplies (GC and SA gates, N·I and M·U in the neurons) "
              "3.7 pJ each, element-wise adds (X + PE, GC add fusion, M·U + N·I) 0.9 pJ each")
EXCLUDED = (
    "memory access (weights, activations, membrane state): not modelled; often the largest cost on hardware",
    "BatchNorm: folded into the conv for deployment (unroll), so counted as free in every row",
    "conv/linear bias adds (one per output element)",
    "residual adds between blocks (one add per block output element)",
    "membrane reset U = H·(1 − S) and the threshold comparison (a select and a compare per neuron step)",
    "softmax over H·W in GC (exp, sum, divide) and the GC and SA gate nonlinearities (sigmoid, x2; per channel and step)",
    "LayerNorm and ReLU in GC's transform, ReLU in SA",
    "pooling adds: SA's mean over H·W, the global average pool before the FC, the stem's average pool (resnet34)",
    "the mean of the logits over T",
    "INT8 arithmetic: INT8 rows are counted as 32-bit float (their quantize/dequantize ops too are not counted)",
)


@dataclass
class LayerOps:
    """One layer's operations per image (all T steps together)."""

    name: str
    kind: str  # "conv", "linear", "matmul" or "elementwise"
    spike_driven: bool  # its input was binary in every probe pass (always False for element-wise rows)
    macs: float  # dense multiply-accumulates per image over all T steps
    input_rate: float  # share of non-zero inputs (the firing rate of its input spikes)
    sops: float  # synaptic operations per image (spike-driven layers; 0 otherwise)
    energy_pj: float  # per image
    mults: float = 0.0  # element-wise real multiplies per image (at E_MUL_PJ)
    adds: float = 0.0  # element-wise real adds per image (at E_AC_PJ)

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
    """Accumulates MACs, element-wise ops, non-zero inputs and binary-ness per layer, and the images seen.

    Filled by the hooks that :func:`count_ops` installs; read with :meth:`layers`.
    """

    def __init__(self) -> None:
        self.images = 0
        self.kind: dict[str, str] = {}
        self.macs: dict[str, float] = {}
        self.mults: dict[str, float] = {}
        self.adds: dict[str, float] = {}
        self.nonzero: dict[str, float] = {}
        self.inputs: dict[str, float] = {}
        self.binary: dict[str, bool] = {}

    def _seen(self, name: str, kind: str, x: Tensor) -> Tensor:
        x = x.detach()
        nonzero = x != 0
        self.kind[name] = kind
        self.nonzero[name] = self.nonzero.get(name, 0.0) + float(nonzero.sum())
        self.inputs[name] = self.inputs.get(name, 0.0) + float(x.numel())
        return nonzero

    def add(self, name: str, kind: str, macs: float, x: Tensor) -> None:
        """A weight layer (conv, linear, matmul) that did ``macs`` dense MACs on input ``x``."""
        nonzero = self._seen(name, kind, x)
        self.macs[name] = self.macs.get(name, 0.0) + macs
        # once real-valued, always real-valued: skip the check on later batches
        self.binary[name] = self.binary.get(name, True) and _is_binary(x.detach(), nonzero)

    def add_elementwise(self, name: str, x: Tensor, mults: float = 0.0, adds: float = 0.0) -> None:
        """Element-wise real ``mults`` and ``adds`` done on input ``x`` (always paid in full)."""
        self._seen(name, "elementwise", x)
        self.macs[name] = self.macs.get(name, 0.0)
        self.mults[name] = self.mults.get(name, 0.0) + mults
        self.adds[name] = self.adds.get(name, 0.0) + adds
        self.binary[name] = False

    def layers(self, e_mac_pj: float = E_MAC_PJ, e_ac_pj: float = E_AC_PJ, e_mul_pj: float = E_MUL_PJ) -> list[LayerOps]:
        """Per-image ``LayerOps`` for every layer seen, in first-call order."""
        if self.images == 0:
            raise ValueError("no forward pass was counted: run the model inside count_ops(...)")
        rows = []
        for name, macs_total in self.macs.items():
            macs = macs_total / self.images
            mults = self.mults.get(name, 0.0) / self.images
            adds = self.adds.get(name, 0.0) / self.images
            rate = self.nonzero[name] / max(self.inputs[name], 1.0)
            spiking = self.binary[name]
            sops = macs * rate if spiking else 0.0
            energy = (sops * e_ac_pj if spiking else macs * e_mac_pj) + mults * e_mul_pj + adds * e_ac_pj
            rows.append(LayerOps(name, self.kind[name], spiking, macs, rate, sops, energy, mults, adds))
        return rows


def _neuron_ops(m: nn.Module, x: Tensor) -> tuple[float, float]:
    """(multiplies, adds) of ``H_t = M * U_{t-1} + N * I_t`` over input current ``x`` ``[T, B, ...]``.

    ``N * I`` on every step, ``M * U`` and the sum on steps 2..T (U_0 = 0). A plain-float
    coefficient that cannot change a value (N == 1, M == 0) is free; a tensor one is paid.
    """
    steps = int(x.shape[0])
    per_step = float(x.numel()) / steps if steps else 0.0
    gain, decay = getattr(m, "gain", None), getattr(m, "decay", None)
    gain_free = isinstance(gain, (int, float)) and float(gain) == 1.0
    decay_free = isinstance(decay, (int, float)) and float(decay) == 0.0
    later = max(steps - 1, 0) * per_step
    mults = (0.0 if gain_free else steps * per_step) + (0.0 if decay_free else later)
    adds = 0.0 if decay_free else later
    return mults, adds


def _install(model: nn.Module, counter: OpCounter) -> list[Any]:
    """Hooks on every Conv2d / Linear, GC and SA gate, position encoding, neuron, and the root (images)."""
    def root_hook(_mod: nn.Module, inp: tuple) -> None:
        counter.images += int(inp[0].shape[0])  # inputs are batch first

    def hook(m: nn.Module, fn: Any) -> None:
        handles.append(m.register_forward_hook(fn))

    handles = [model.register_forward_pre_hook(root_hook)]
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            def conv_hook(mod: nn.Module, inp: tuple, out: Tensor, name: str = name) -> None:
                counter.add(name, "conv", _conv_macs(mod, out), inp[0])
            hook(m, conv_hook)
        elif isinstance(m, nn.Linear):
            def lin_hook(mod: nn.Module, inp: tuple, out: Tensor, name: str = name) -> None:
                counter.add(name, "linear", _linear_macs(mod, out), inp[0])
            hook(m, lin_hook)
        elif isinstance(m, GlobalContext):
            # context = sum over H*W of attention x X: one MAC per input element ([T, B, C, H, W]);
            # gate: one multiply ("mul" fusion) or add ("add") per output element.
            def gc_hook(mod: nn.Module, inp: tuple, out: Tensor, name: str = name) -> None:
                counter.add(f"{name}.context", "matmul", float(inp[0].numel()), inp[0])
                n = float(out.numel())
                if getattr(mod, "fusion", "mul") == "add":
                    counter.add_elementwise(f"{name}.gate", inp[0], adds=n)
                else:
                    counter.add_elementwise(f"{name}.gate", inp[0], mults=n)
            hook(m, gc_hook)
        elif isinstance(m, StepAttention):
            def sa_hook(_mod: nn.Module, inp: tuple, out: Tensor, name: str = f"{name}.gate") -> None:
                counter.add_elementwise(name, inp[0], mults=float(out.numel()))
            hook(m, sa_hook)
        elif isinstance(m, PositionEncoding):
            def pe_hook(_mod: nn.Module, inp: tuple, out: Tensor, name: str = name) -> None:
                counter.add_elementwise(name, inp[0], adds=float(out.numel()))
            hook(m, pe_hook)
        elif isinstance(m, BaseLIF):
            def lif_hook(mod: nn.Module, inp: tuple, _out: Tensor, name: str = name) -> None:
                mults, adds = _neuron_ops(mod, inp[0])
                counter.add_elementwise(name, inp[0], mults=mults, adds=adds)
            hook(m, lif_hook)
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


def summarize(layers: list[LayerOps]) -> dict[str, Any]:
    """Totals per image: MACs (real-valued layers), SOPs, dense MACs of all layers, element-wise
    multiplies and adds, energy in µJ (everything counted), and ``excluded``: what is not counted."""
    mac = sum(l.macs for l in layers if not l.spike_driven)
    sops = sum(l.sops for l in layers)
    energy_pj = sum(l.energy_pj for l in layers)
    mults, adds = sum(l.mults for l in layers), sum(l.adds for l in layers)
    return {"macs": mac, "sops": sops, "dense_macs": sum(l.macs for l in layers), "mults": mults, "adds": adds,
            "elementwise_pj": sum(l.energy_pj for l in layers if l.kind == "elementwise"),
            "energy_uj": energy_pj * 1e-6, "energy_pj": energy_pj, "excluded": list(EXCLUDED)}


__all__ = ["CONVENTION", "EXCLUDED", "E_AC_PJ", "E_MAC_PJ", "E_MUL_PJ", "LayerOps", "OpCounter", "count_ops",
           "profile_ops", "summarize"]
