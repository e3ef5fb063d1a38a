"""Multi-step leaky integrate-and-fire neurons.

Dynamics (docs/architecture.md §4), per step t with input current ``I_t``::

    H_t = M * U_{t-1} + N * I_t        (U_0 = 0, so H_1 = N * I_1)
    S_t = Heaviside(H_t - v_th)
    U_t = H_t * (1 - S_t)              (hard reset to 0)

``forward`` takes ``[T, B, C, ...]`` and loops over T with the membrane created inside the
call, so there is no state to reset between batches and a traced graph is stateless.
``step`` exposes one step with explicit membrane in/out (for a streaming export).

Training runs the whole T loop as one autograd node (``MultiStepLIF``): the forward loop runs
without autograd (4 small ops per step, in place) and the backward is written out by hand (2 ops
per step), instead of ~6 autograd nodes per step. Spikes are bit-identical to the per-step loop
(same products and sums, in the same rounding); gradients equal autograd's through that loop,
reset path included, up to float rounding (tests/test_fused_step.py). Inference mode keeps the
plain per-step loop, which is what tracing and ONNX export see.

All neuron arithmetic stays inside these modules and every class name contains ``LIF``, so a
quantiser's ignored scope can exclude neuron internals by class name (``(Adaptive)?LIF``) or
by module name (the backbones name every neuron attribute ``lif``).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor, nn

from .kernels import fused_multistep
from .spec import NeuronSpec
from .surrogate import SURROGATES, float_mask, spike, surrogate_grad


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


def _per_channel(value: Tensor | float, step_dim: int) -> Tensor | float:
    """Broadcast a per-channel coefficient ``[C]`` over ``[..., C, *spatial]`` (``step_dim`` = dims of one step)."""
    if isinstance(value, Tensor):
        return value.view(-1, *([1] * (step_dim - 2)))
    return value


def tracing() -> bool:
    """Whether a graph is being traced or exported (TorchScript, ONNX, torch.export): custom autograd nodes
    stay out of such graphs (the TorchScript ONNX exporter cannot inline them), plain ops go in."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


class MultiStepLIF(torch.autograd.Function):
    """The whole ``[T, B, C, ...]`` neuron loop as one autograd node (fp32 in, spikes in ``x.dtype``).

    Backward, with ``a_t = dL/dS_t * sg(h_t)``, ``b_t = dU_t/dH_t = (1 - S_t) - h_t * sg(h_t)``
    (the reset path ``U = H (1 - S)`` differentiated through the surrogate, as autograd does):
    ``dL/dH_t = a_t + M * dL/dH_{t+1} * b_t``; then ``dL/dI = N * dL/dH``,
    ``dL/dM = sum dL/dH_t * U_{t-1}``, ``dL/dN = sum dL/dH_t * I_t`` (over all but the channel axis).
    """

    @staticmethod
    def forward(ctx, x: Tensor, decay: Tensor | float, gain: Tensor | float, v_th: float,  # type: ignore[override]
                surrogate: str, param: float) -> Tensor:
        m, n = _per_channel(decay, x.dim() - 1), _per_channel(gain, x.dim() - 1)
        h = x * n  # h_t starts as N I_t; the loop adds M U_{t-1} in place
        for t in range(1, x.shape[0]):
            prev = h[t - 1]
            h[t] += prev * float_mask(torch.lt, prev, v_th) * m  # M * U_{t-1}, U = H (1 - S): the same products
        ctx.save_for_backward(h, x if ctx.needs_input_grad[2] else None,
                              decay if isinstance(decay, Tensor) else None, gain if isinstance(gain, Tensor) else None)
        ctx.coeffs = (None if isinstance(decay, Tensor) else decay, None if isinstance(gain, Tensor) else gain)
        ctx.v_th, ctx.surrogate, ctx.param = v_th, surrogate, param
        return float_mask(torch.ge, h, v_th).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_s: Tensor):  # type: ignore[override]
        h, x, decay, gain = ctx.saved_tensors
        m_float, n_float = ctx.coeffs
        m = _per_channel(decay, h.dim() - 1) if decay is not None else m_float
        n = _per_channel(gain, h.dim() - 1) if gain is not None else n_float
        sg = SURROGATES[ctx.surrogate]((h - ctx.v_th).to(grad_s.dtype), ctx.param)
        rest = float_mask(torch.lt, h, ctx.v_th)  # 1 - S
        gh = grad_s * sg  # a_t, turned into dL/dH_t in place below
        b = torch.addcmul(rest.to(sg.dtype), h, sg, value=-1.0)  # (1 - S) - h sg in one pass
        for t in range(h.shape[0] - 2, -1, -1):
            gh[t].addcmul_(gh[t + 1] * m, b[t])
        reduce = [d for d in range(h.dim()) if d != 2]
        g_decay = g_gain = None
        if ctx.needs_input_grad[1] and h.shape[0] > 1:  # T = 1 never uses M: no gradient, as autograd
            u = h * rest
            g_decay = (gh[1:] * u[:-1]).sum(reduce)
        if ctx.needs_input_grad[2]:
            g_gain = (gh * x).sum(reduce)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = gh if isinstance(n, float) and n == 1.0 else gh * n  # N = 1 (the plain LIF): no pass
        return gx, g_decay, g_gain, None, None, None


class BaseLIF(nn.Module):
    """Shared multi-step loop; subclasses provide ``decay`` (M) and ``gain`` (N)."""

    decay: Tensor | float
    gain: Tensor | float
    kernels: str = "torch"  # the fused training loop's backend (kernels.BACKENDS); kernels.set_kernels sets it

    def __init__(self, v_th: float = 0.5, surrogate: str = "rect", surrogate_param: float = 1.0) -> None:
        super().__init__()
        surrogate_grad(surrogate)  # an unknown name raises here, naming the valid ones
        self.v_th = float(v_th)
        self.surrogate = surrogate
        self.surrogate_param = float(surrogate_param)
        # inference: plain comparison (no autograd.Function) so tracing/export sees plain ops.
        self.inference = False
        self.hand_backward = True  # MultiStepLIF in training; off under a quantiser (staa.set_hand_backward)

    def _coeff(self, value: Tensor | float, step_dim: int) -> Tensor | float:
        """Broadcast a per-channel coefficient over a per-step tensor ``[B, C, ...]``."""
        return _per_channel(value, step_dim)

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
        with _fp32_region(x):
            if self._fused():
                return self._multistep(x)
            u: Tensor | None = None
            out = []
            for x_t in _fp32(x).unbind(0):
                s, u = self._step(x_t, u)
                out.append(s)
        return _cast(torch.stack(out), x.dtype)

    def _multistep(self, x: Tensor) -> Tensor:
        """The fused T loop on the neuron's kernel backend (``kernels``: see ``pipeline.models.kernels``):
        a named backend where it takes ``x``, else ``MultiStepLIF``. Spikes in ``x.dtype`` either way."""
        fused = fused_multistep(self.kernels, x)
        if fused is not None:
            return fused(x, self.decay, self.gain, self.v_th, self.surrogate, self.surrogate_param)
        s = MultiStepLIF.apply(_fp32(x), self.decay, self.gain, self.v_th, self.surrogate, self.surrogate_param)
        return _cast(s, x.dtype)

    def _fused(self) -> bool:
        """Whether ``forward`` runs ``MultiStepLIF``: only when it pays, i.e. a gradient is wanted. Without
        one (evaluation, tracing, export, parity checks that wrap ``fire`` on an instance) the per-step loop
        runs, so every inspected or exported graph is the one it always was. ``hand_backward`` off (a model NNCF
        wraps for QAT) keeps training on that loop too: its spike quantiser hooks the loop's output op."""
        return (self.hand_backward and not self.inference and torch.is_grad_enabled() and "fire" not in self.__dict__
                and not tracing())

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


def _alif(spec: NeuronSpec, channels: int, **kw) -> BaseLIF:
    return AdaptiveLIF(channels, decay=spec.decay, gain=spec.gain, **kw)


def _lif(spec: NeuronSpec, channels: int, **kw) -> BaseLIF:
    return LIF(decay=spec.decay, gain=spec.gain, **kw)


NeuronFactory = Callable[..., BaseLIF]
# model.neuron.kind -> constructor (spec, channels, v_th=, surrogate=, surrogate_param=); its keys are
# the schema's choices (tests/test_models_neurons.py checks), so a new kind is one function and one row.
NEURONS: dict[str, NeuronFactory] = {"alif": _alif, "lif": _lif}


def make_neuron(spec: NeuronSpec, channels: int) -> BaseLIF:
    """The neuron ``spec`` asks for, sized for ``channels``."""
    try:
        factory = NEURONS[spec.kind]
    except KeyError:
        raise ValueError(f"unknown neuron kind {spec.kind!r}; valid: {', '.join(NEURONS)}") from None
    param = spec.surrogate_width if spec.surrogate == "rect" else spec.surrogate_k
    return factory(spec, channels, v_th=spec.v_th, surrogate=spec.surrogate, surrogate_param=param)


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
