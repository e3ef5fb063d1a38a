"""Named kernel backends of the multi-step neuron's fused T loop (SpikingJelly style).

A neuron's ``kernels`` attribute names the backend its training forward runs when a gradient is
wanted (``BaseLIF._fused``): ``torch`` is ``neurons.MultiStepLIF`` (plain torch ops, any device),
``triton`` is ``triton_lif.TritonMultiStepLIF`` (the whole T loop in one Triton launch per layer and
direction, CUDA, or the CPU under Triton's interpreter ``TRITON_INTERPRET=1``). Both are backends of the
one definition in ``neurons`` (charge, fire, hard or soft reset) and compute the same spikes bit for
bit. Evaluation, tracing, export and NNCF never reach a backend (they run the neuron's per-step ops),
so the setting only changes training speed.

``train.kernels`` (``auto | triton | torch``) picks the backend for the train stage through
:func:`resolve_kernels` and :func:`set_kernels`; ``auto`` is Triton on CUDA where the ``triton``
package imports, torch elsewhere. ``triton_lif`` is imported lazily: Triton reads ``TRITON_INTERPRET``
when its kernels are defined, and a CPU run never needs it.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable

from torch import Tensor, nn

BACKENDS: tuple[str, ...] = ("torch", "triton")
SETTINGS: tuple[str, ...] = ("auto",) + BACKENDS


def triton_missing() -> str | None:
    """Why the Triton backend cannot load here (``None``: it can)."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (the CUDA build of torch ships it)"
    return None


def interpreting() -> bool:
    """Whether Triton runs kernels in its numpy interpreter (``TRITON_INTERPRET=1``), which runs on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_kernels(setting: str, device: str) -> str:
    """The backend ``train.kernels = setting`` means on ``device``: ``auto`` -> ``triton`` on CUDA when it
    loads, else ``torch``. ``triton`` where it cannot run raises ValueError naming the fix."""
    if setting not in SETTINGS:
        raise ValueError(f"train.kernels: {setting!r} is not one of {', '.join(SETTINGS)}")
    cuda = str(device).startswith("cuda")
    if setting == "torch" or (setting == "auto" and (not cuda or triton_missing())):
        return "torch"
    missing = triton_missing()
    if missing:
        raise ValueError(f"train.kernels=triton: {missing}; set train.kernels to auto or torch")
    if not cuda and not interpreting():
        raise ValueError(f"train.kernels=triton needs a CUDA device (device is {device!r}; Triton's CPU "
                         f"interpreter, TRITON_INTERPRET=1, is for tests); set train.kernels to auto or torch")
    return "triton"


def set_kernels(model: nn.Module, backend: str) -> nn.Module:
    """Run every neuron of ``model``'s fused training loop on ``backend`` (one of :data:`BACKENDS`)."""
    from ..neurons import neuron_modules

    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; valid: {', '.join(BACKENDS)}")
    for _, m in neuron_modules(model):
        m.kernels = backend
    return model


# (x, decay, gain, v_th, surrogate, surrogate_param, reset) -> spikes
MultiStep = Callable[[Tensor, "Tensor | float", "Tensor | float", float, str, float, str], Tensor]


def fused_multistep(backend: str, x: Tensor, reset: str = "hard") -> MultiStep | None:
    """The fused T loop of ``backend`` for input ``x`` (``[T, B, C, ...]`` in, spikes in ``x.dtype`` out),
    or ``None`` where the neuron's own torch loop (``MultiStepLIF``) runs: the torch backend, or a tensor
    the backend cannot take (Triton: not on CUDA and no interpreter). Every backend runs both resets
    (``model.neuron.reset``); an unknown one is refused here, naming the valid ones."""
    from ..neurons import RESETS

    if reset not in RESETS:
        raise ValueError(f"unknown neuron reset {reset!r}; valid: {', '.join(RESETS)}")
    if backend == "torch":
        return None
    if backend == "triton":
        if not (x.is_cuda or interpreting()):
            return None
        from .triton_lif import triton_multistep

        return triton_multistep
    raise ValueError(f"unknown kernel backend {backend!r}; valid: {', '.join(BACKENDS)}")
