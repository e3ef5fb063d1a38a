"""Multi-step leaky integrate-and-fire neurons.

Dynamics (docs/architecture.md §4), per step t with input current ``I_t``::

    H_t = M * U_{t-1} + N * I_t        (U_0 = 0, so H_1 = N * I_1)
    S_t = Heaviside(H_t - v_th)
    U_t = H_t * (1 - S_t)              (hard reset to 0)

``forward`` takes ``[T, B, C, ...]`` and loops over T with the membrane created inside the
call, so there is no state to reset between batches and a traced graph is stateless.
``step`` exposes one step with explicit membrane in/out (for a streaming export).

All neuron arithmetic stays inside these modules and every class name contains ``LIF``, so a
quantiser's ignored scope can exclude neuron internals by class name (``(Adaptive)?LIF``) or
by module name (the backbones name every neuron attribute ``lif``).
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from .spec import NeuronSpec
from .surrogate import SURROGATES, spike


def _fp32_region(x: Tensor) -> contextlib.AbstractContextManager:
    """Autocast switched off for ``x``'s device type when it is on; otherwise no context at all
    (tracing and export see no autocast ops)."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


def _fp32(x: Tensor) -> Tensor:
    """``x`` as fp32; no op at all (none traced) when it already is."""
    return x if x.dtype == torch.float32 else x.float()


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x if x.dtype == dtype else x.to(dtype)


class BaseLIF(nn.Module):
    """Shared multi-step loop; subclasses provide ``decay`` (M) and ``gain`` (N)."""

    decay: Tensor | float
    gain: Tensor | float

    def __init__(self, v_th: float = 0.5, surrogate: str = "rect", surrogate_param: float = 1.0) -> None:
        super().__init__()
        if surrogate not in SURROGATES:
            raise ValueError(f"unknown surrogate {surrogate!r}; valid: {', '.join(SURROGATES)}")
        self.v_th = float(v_th)
        self.surrogate = surrogate
        self.surrogate_param = float(surrogate_param)
        # inference: plain comparison (no autograd.Function) so tracing/export sees plain ops.
        self.inference = False

    def _coeff(self, value: Tensor | float, step_dim: int) -> Tensor | float:
        """Broadcast a per-channel coefficient over a per-step tensor ``[B, C, ...]``."""
        if isinstance(value, Tensor):
            return value.view(-1, *([1] * (step_dim - 2)))
        return value

    def fire(self, h: Tensor) -> Tensor:
        """Spike where ``h >= v_th``: surrogate-gradient path, or a plain comparison in inference mode."""
        if self.inference:
            return (h >= self.v_th).to(h.dtype)
        return spike(h, self.v_th, self.surrogate, self.surrogate_param)

    def _step(self, x_t: Tensor, u: Tensor | None) -> tuple[Tensor, Tensor]:
        """The dynamics in ``x_t``'s dtype (fp32 by the callers): (spikes, membrane after reset)."""
        m = self._coeff(self.decay, x_t.dim())
        n = self._coeff(self.gain, x_t.dim())
        h = n * x_t if u is None else m * u + n * x_t
        s = self.fire(h)
        return s, h * (1 - s)

    def step(self, x_t: Tensor, u: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One time step: input current ``[B, C, ...]`` and membrane (``None`` = 0) -> (spikes in
        ``x_t.dtype``, fp32 membrane)."""
        with _fp32_region(x_t):
            s, u = self._step(_fp32(x_t), None if u is None else _fp32(u))
        return _cast(s, x_t.dtype), u

    def forward(self, x: Tensor) -> Tensor:
        """``[T, B, C, ...]`` input current -> ``[T, B, C, ...]`` spikes (0/1 in ``x.dtype``).

        The membrane is computed in fp32 with autocast off, whatever the input dtype: under bf16/fp16
        autocast a threshold compare in half precision moves spikes (bf16 keeps 8 bits of mantissa,
        so ``h`` near ``v_th`` = 0.5 is rounded by up to 2e-3). Spikes go back in the input dtype
        (0 and 1 are exact in every float type). For fp32 input without autocast every cast is a no-op
        and no autocast region is entered, so exported graphs are unchanged.
        """
        u: Tensor | None = None
        out = []
        with _fp32_region(x):
            for x_t in _fp32(x).unbind(0):
                s, u = self._step(x_t, u)
                out.append(s)
        return _cast(torch.stack(out), x.dtype)

    def extra_repr(self) -> str:
        return f"v_th={self.v_th}, surrogate={self.surrogate}({self.surrogate_param}), inference={self.inference}"


class LIF(BaseLIF):
    """LIF with fixed scalar decay M and gain N (the "flag" variant; no learnable parameters)."""

    def __init__(self, decay: float = 0.25, gain: float = 1.0, **kw) -> None:
        super().__init__(**kw)
        self.decay = float(decay)
        self.gain = float(gain)

    def extra_repr(self) -> str:
        return f"decay={self.decay}, gain={self.gain}, " + super().extra_repr()


class AdaptiveLIF(BaseLIF):
    """LIF with learnable per-channel decay M (init 0.25) and input gain N (init 1.0)."""

    def __init__(self, channels: int, decay: float = 0.25, gain: float = 1.0, **kw) -> None:
        super().__init__(**kw)
        self.decay = nn.Parameter(torch.full((channels,), float(decay)))
        self.gain = nn.Parameter(torch.full((channels,), float(gain)))

    def extra_repr(self) -> str:
        return f"channels={self.decay.numel()}, " + super().extra_repr()


def make_neuron(spec: NeuronSpec, channels: int) -> BaseLIF:
    """The neuron ``spec`` asks for, sized for ``channels``."""
    param = spec.surrogate_width if spec.surrogate == "rect" else spec.surrogate_k
    kw = dict(v_th=spec.v_th, surrogate=spec.surrogate, surrogate_param=param)
    if spec.kind == "alif":
        return AdaptiveLIF(channels, decay=spec.decay, gain=spec.gain, **kw)
    if spec.kind == "lif":
        return LIF(decay=spec.decay, gain=spec.gain, **kw)
    raise ValueError(f"unknown neuron kind {spec.kind!r}; valid: alif, lif")


def neuron_modules(model: nn.Module) -> list[tuple[str, BaseLIF]]:
    """``(qualified name, module)`` of every neuron in ``model``, in forward order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BaseLIF)]


def set_inference_mode(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every neuron to the plain ``(h >= v_th)`` comparison (export) or back (training).

    Spikes are identical either way; only the autograd.Function disappears, so that
    ``torch.onnx`` tracing yields plain ops. Returns ``model`` for chaining.
    """
    for _, m in neuron_modules(model):
        m.inference = bool(enabled)
    return model
