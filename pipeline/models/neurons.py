"""Multi-step leaky integrate-and-fire neurons: the dynamics written once, run by named backends.

Dynamics (docs/architecture.md §4), per step t with input current ``I_t``, three steps in SpikingJelly's
split (charge / fire / reset)::

    charge: H_t = M * U_{t-1} + N * I_t     (U_0 = 0, so H_1 = N * I_1)
    fire:   S_t = Heaviside(H_t - v_th)
    reset:  U_t = H_t * (1 - S_t)           hard (``reset: hard``, the default: to 0)
            U_t = H_t - S_t * v_th          soft (``reset: soft``: subtract the threshold)

The maths of each step is one function here (:func:`charge`, :func:`heaviside`, :data:`RESETS`); the
neuron's methods ``charge`` / ``fire`` / ``reset`` call them, and every path composes those same functions:

- ``forward`` takes ``[T, B, C, ...]`` and loops ``step`` over T with the membrane created inside the call,
  so there is no state to reset between batches and a traced graph is stateless;
- ``step(x, u)`` is one step with explicit membrane in/out (the streaming export calls it);
- training runs the whole T loop as one autograd node (``MultiStepLIF``): its forward runs the same
  ``charge`` / ``heaviside`` / reset functions without autograd and its backward is written out by hand from
  each step's derivative (``Reset.grad`` next to ``Reset.value``), instead of ~6 autograd nodes per step. The
  node is the ``torch`` backend; ``triton`` (``kernels/triton_lif.py``) runs the same definition in one
  launch per layer (GPU code cannot call Python: tests/models/test_triton_kernels.py holds it to these functions
  bit for bit, both resets). Spikes are bit-identical to the per-step loop; gradients equal autograd's
  through that loop up to float rounding (tests/models/test_fused_step.py, tests/models/test_neuron_dynamics.py).
  A subclass that overrides ``charge``, ``fire`` or ``reset`` has no fused backend: it trains on the
  per-step loop through autograd (``BaseLIF._fused``), so an override can never be silently skipped.

Observing a step: ``register_step_hook(fn)`` calls ``fn(neuron, h, s, u)`` after every step (membrane before
reset, spikes, membrane after reset); :func:`pipeline.models.probes.recording` builds on it. While a hook
is registered the per-step loop runs (the fused node has no steps to show).

All neuron arithmetic stays inside these modules and every class name contains ``LIF``, so a
quantiser's ignored scope can exclude neuron internals by class name (``(Adaptive)?LIF``) or
by module name (the backbones name every neuron attribute ``lif``).
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

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


# --- the dynamics, once ----------------------------------------------------------------------

def drive(x: Tensor, n: Tensor | float) -> Tensor:
    """The input term ``N I_t`` of the charge (of one step, or of every step at once)."""
    return n * x


def leak(u: Tensor, m: Tensor | float) -> Tensor:
    """The leak term ``M U_{t-1}`` of the charge."""
    return m * u


def charge(x_t: Tensor, u: Tensor | None, m: Tensor | float, n: Tensor | float) -> Tensor:
    """``H_t = M U_{t-1} + N I_t``; ``u`` None is ``U_0 = 0`` (no leak term at all, none traced)."""
    return drive(x_t, n) if u is None else leak(u, m) + drive(x_t, n)


def heaviside(h: Tensor, v_th: float) -> Tensor:
    """``S_t = (H_t >= v_th)`` as 0/1 in ``h``'s dtype: the forward of every fire (surrogate or plain)."""
    return float_mask(torch.ge, h, v_th)


def _hard(h: Tensor, s: Tensor, v_th: float) -> Tensor:
    return h * (1 - s)


def _hard_grad(h: Tensor, s: Tensor, sg: Tensor, v_th: float) -> Tensor:
    return torch.addcmul((1 - s).to(sg.dtype), h, sg, value=-1.0)  # (1 - S) - H sg in one pass


def _soft(h: Tensor, s: Tensor, v_th: float) -> Tensor:
    return h - s * v_th


def _soft_grad(h: Tensor, s: Tensor, sg: Tensor, v_th: float) -> Tensor:
    return 1 - sg * v_th


@dataclass(frozen=True)
class Reset:
    """A reset rule: ``value(h, s, v_th) -> U_t`` and ``grad(h, s, sg, v_th) -> dU_t/dH_t``, the derivative
    autograd takes of ``value`` through the surrogate (``dS/dH = sg``); the hand backward uses it."""

    value: Callable[[Tensor, Tensor, float], Tensor]
    grad: Callable[[Tensor, Tensor, Tensor, float], Tensor]


# model.neuron.reset -> rule; the keys are the schema's choices (tests/models/test_neuron_dynamics.py checks)
RESETS: dict[str, Reset] = {"hard": Reset(_hard, _hard_grad), "soft": Reset(_soft, _soft_grad)}


def reset_rule(mode: str) -> Reset:
    """The reset rule named ``mode``; an unknown name says the valid ones."""
    try:
        return RESETS[mode]
    except KeyError:
        raise ValueError(f"unknown neuron reset {mode!r}; valid: {', '.join(RESETS)}") from None


class MultiStepLIF(torch.autograd.Function):
    """The whole ``[T, B, C, ...]`` neuron loop as one autograd node (fp32 in, fp32 0/1 spikes out): the
    ``torch`` backend of the definition above.

    Forward: :func:`charge` (its two terms: :func:`drive` for all T in one op, then :func:`leak` step by step,
    in place), :func:`heaviside` and the reset rule's ``value``, without autograd.
    Backward, with ``a_t = dL/dS_t * sg(h_t)`` and ``b_t = dU_t/dH_t`` (the rule's ``grad``: hard
    ``(1 - S_t) - h_t sg(h_t)``, soft ``1 - v_th sg(h_t)``, as autograd differentiates the reset):
    ``dL/dH_t = a_t + M * dL/dH_{t+1} * b_t``; then ``dL/dI = N * dL/dH``,
    ``dL/dM = sum dL/dH_t * U_{t-1}``, ``dL/dN = sum dL/dH_t * I_t`` (over all but the channel axis).
    """

    @staticmethod
    def forward(ctx, x: Tensor, decay: Tensor | float, gain: Tensor | float, v_th: float,  # type: ignore[override]
                surrogate: str, param: float, reset: str = "hard") -> Tensor:
        rule = reset_rule(reset)
        m, n = _per_channel(decay, x.dim() - 1), _per_channel(gain, x.dim() - 1)
        h = drive(x, n)  # N I_t of every step in one op; each step then adds its leak in place: H_t = N I_t + M U_{t-1}
        for t in range(1, x.shape[0]):
            prev = h[t - 1]
            h[t] += leak(rule.value(prev, heaviside(prev, v_th), v_th), m)
        s = heaviside(h, v_th)
        ctx.save_for_backward(h, x if ctx.needs_input_grad[2] else None,
                              decay if isinstance(decay, Tensor) else None, gain if isinstance(gain, Tensor) else None)
        ctx.coeffs = (None if isinstance(decay, Tensor) else decay, None if isinstance(gain, Tensor) else gain)
        ctx.v_th, ctx.surrogate, ctx.param, ctx.rule = v_th, surrogate, param, rule
        return s

    @staticmethod
    def backward(ctx, grad_s: Tensor):  # type: ignore[override]
        h, x, decay, gain = ctx.saved_tensors  # S is recomputed from h: one saved tensor per step, not two
        s = heaviside(h, ctx.v_th)
        m_float, n_float = ctx.coeffs
        m = _per_channel(decay, h.dim() - 1) if decay is not None else m_float
        n = _per_channel(gain, h.dim() - 1) if gain is not None else n_float
        sg = SURROGATES[ctx.surrogate]((h - ctx.v_th).to(grad_s.dtype), ctx.param)
        gh = grad_s * sg  # a_t, turned into dL/dH_t in place below
        b = ctx.rule.grad(h, s, sg, ctx.v_th)
        for t in range(h.shape[0] - 2, -1, -1):
            gh[t].addcmul_(gh[t + 1] * m, b[t])
        reduce = [d for d in range(h.dim()) if d != 2]
        g_decay = g_gain = None
        if ctx.needs_input_grad[1] and h.shape[0] > 1:  # T = 1 never uses M: no gradient, as autograd
            u = ctx.rule.value(h[:-1], s[:-1], ctx.v_th)
            g_decay = (gh[1:] * u).sum(reduce)
        if ctx.needs_input_grad[2]:
            g_gain = (gh * x).sum(reduce)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = gh if isinstance(n, float) and n == 1.0 else gh * n  # N = 1 (the plain LIF): no pass
        return gx, g_decay, g_gain, None, None, None, None


StepHook = Callable[["BaseLIF", Tensor, Tensor, Tensor], None]


class BaseLIF(nn.Module):
    """The neuron: ``charge`` / ``fire`` / ``reset`` (override to change a step), the per-step loop, ``step``
    and the fused training backends. Subclasses provide ``decay`` (M) and ``gain`` (N)."""

    decay: Tensor | float
    gain: Tensor | float
    kernels: str = "torch"  # the fused training loop's backend (kernels.BACKENDS); kernels.set_kernels sets it

    def __init__(self, v_th: float = 0.5, surrogate: str = "rect", surrogate_param: float = 1.0,
                 reset: str = "hard") -> None:
        super().__init__()
        surrogate_grad(surrogate)  # an unknown name raises here, naming the valid ones
        reset_rule(reset)
        self.v_th = float(v_th)
        self.surrogate = surrogate
        self.surrogate_param = float(surrogate_param)
        self.reset_mode = reset
        # inference: plain comparison (no autograd.Function) so tracing/export sees plain ops.
        self.inference = False
        self.hand_backward = True  # MultiStepLIF in training; off under a quantiser (staa.set_hand_backward)
        self._step_hooks: OrderedDict[int, StepHook] = OrderedDict()

    def _coeff(self, value: Tensor | float, step_dim: int) -> Tensor | float:
        """Broadcast a per-channel coefficient over a per-step tensor ``[B, C, ...]``."""
        return _per_channel(value, step_dim)

    def charge(self, x_t: Tensor, u: Tensor | None) -> Tensor:
        """``H_t`` from this step's input current and the last membrane (:func:`charge`)."""
        return charge(x_t, u, self._coeff(self.decay, x_t.dim()), self._coeff(self.gain, x_t.dim()))

    def fire(self, h: Tensor) -> Tensor:
        """Spike where ``h >= v_th``: surrogate-gradient path, or a plain comparison in inference mode."""
        if self.inference:
            return (h >= self.v_th).to(h.dtype)
        return spike(h, self.v_th, self.surrogate, self.surrogate_param)

    def reset(self, h: Tensor, s: Tensor) -> Tensor:
        """``U_t`` after the spikes: the ``reset_mode`` rule (:data:`RESETS`)."""
        return RESETS[self.reset_mode].value(h, s, self.v_th)

    def register_step_hook(self, hook: StepHook) -> RemovableHandle:
        """Call ``hook(neuron, h, s, u)`` after every step (membrane before reset, spikes, membrane after),
        until the returned handle's ``remove()``. While one is registered ``forward`` runs the per-step loop."""
        handle = RemovableHandle(self._step_hooks)
        self._step_hooks[handle.id] = hook
        return handle

    def _step(self, x_t: Tensor, u: Tensor | None) -> tuple[Tensor, Tensor]:
        """One step in ``x_t``'s dtype (fp32 by the callers): (spikes, membrane after reset)."""
        h = self.charge(x_t, u)
        s = self.fire(h)
        u = self.reset(h, s)
        for hook in self._step_hooks.values():
            hook(self, h, s, u)
        return s, u

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
        fused = fused_multistep(self.kernels, x, self.reset_mode)
        if fused is not None:
            return fused(x, self.decay, self.gain, self.v_th, self.surrogate, self.surrogate_param, self.reset_mode)
        s = MultiStepLIF.apply(_fp32(x), self.decay, self.gain, self.v_th, self.surrogate, self.surrogate_param,
                               self.reset_mode)
        return _cast(s, x.dtype)

    def _fused(self) -> bool:
        """Whether ``forward`` runs a fused backend: only when it pays, i.e. a gradient is wanted. Without one
        (evaluation, tracing, export) the per-step loop runs, so every inspected or exported graph is the one
        it always was; so it does with a step hook registered (recording) and for a subclass that overrides a
        step (no backend knows its maths). ``hand_backward`` off (a model NNCF wraps for QAT) keeps training
        on that loop too: its spike quantiser hooks the loop's output op."""
        return (self.hand_backward and not self.inference and torch.is_grad_enabled() and not self._step_hooks
                and _standard_steps(type(self)) and not tracing())

    def extra_repr(self) -> str:
        reset = "" if self.reset_mode == "hard" else f", reset={self.reset_mode}"
        return (f"v_th={self.v_th}, surrogate={self.surrogate}({self.surrogate_param}){reset}, "
                f"inference={self.inference}")


def _standard_steps(cls: type) -> bool:
    """Whether ``cls`` keeps ``BaseLIF``'s charge / fire / reset (the maths the fused backends run)."""
    return all(getattr(cls, name) is getattr(BaseLIF, name) for name in ("charge", "fire", "reset", "_step"))


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
# model.neuron.kind -> constructor (spec, channels, v_th=, surrogate=, surrogate_param=, reset=); its keys are
# the schema's choices (tests/models/test_models_neurons.py checks), so a new kind is one function and one row.
NEURONS: dict[str, NeuronFactory] = {"alif": _alif, "lif": _lif}


def make_neuron(spec: NeuronSpec, channels: int) -> BaseLIF:
    """The neuron ``spec`` asks for, sized for ``channels``."""
    try:
        factory = NEURONS[spec.kind]
    except KeyError:
        raise ValueError(f"unknown neuron kind {spec.kind!r}; valid: {', '.join(NEURONS)}") from None
    param = spec.surrogate_width if spec.surrogate == "rect" else spec.surrogate_k
    return factory(spec, channels, v_th=spec.v_th, surrogate=spec.surrogate, surrogate_param=param,
                   reset=spec.reset)


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
