"""Surrogate-gradient spike functions.

Forward is always the exact Heaviside step ``(h >= v_th)`` (so the training path and the
inference path fire identically); only the backward pass differs. With ``x = h - v_th``:

- ``rect``: ``dS/dh = 1/width`` for ``|x| < width/2``, else 0 (a box of unit area).
- ``tanh``: straight-through sigmoid-tanh, ``S ~ (1 + tanh(k x)) / 2``, so
  ``dS/dh = k/2 * (1 - tanh(k x)^2)`` (peak ``k/2`` at the threshold, unit area).
- ``atan``: ``S ~ atan(pi/2 * k x) / pi + 1/2``, so ``dS/dh = (k/2) / (1 + (pi/2 * k x)^2)``
  (peak ``k/2``, unit area; SpikingJelly's ATan with ``alpha = k``).

``param`` is ``width`` for rect and ``k`` for tanh/atan. One autograd class (``SpikeFn``) serves
every surrogate: the name picks the derivative from ``SURROGATES`` (name -> ``dS/dh(x, param)``),
so adding a surrogate is one function and one row. The multi-step neuron
(``neurons.MultiStepLIF``) calls the same derivatives in its hand-written backward.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

SurrogateGrad = Callable[[Tensor, float], Tensor]


def float_mask(compare: Callable[..., Tensor], a: Tensor, b: float) -> Tensor:
    """``compare(a, b)`` as 0/1 in ``a``'s dtype, written straight into a float tensor.

    Why: on the CPU a comparison into a bool tensor plus the bool -> float copy costs about 10x the
    comparison written into a float output (measured on torch 2.14, one thread); the values are equal.
    """
    return compare(a, b, out=torch.empty_like(a))


def rect_grad(x: Tensor, width: float) -> Tensor:
    """``1/width`` inside ``|x| < width/2``, else 0."""
    return float_mask(torch.lt, x.abs(), width / 2).mul_(1.0 / width)


def tanh_grad(x: Tensor, k: float) -> Tensor:
    """``k/2 * (1 - tanh(k x)^2)``."""
    return k / 2 * (1 - torch.tanh(k * x) ** 2)


def atan_grad(x: Tensor, k: float) -> Tensor:
    """``(k/2) / (1 + (pi/2 * k x)^2)``."""
    # 1 + c x^2 in one pass, then one division into the same buffer (3 passes instead of 5 allocating ones)
    d = torch.addcmul(torch.ones((), dtype=x.dtype, device=x.device), x, x, value=(math.pi / 2 * k) ** 2)
    return d.reciprocal_().mul_(k / 2)


SURROGATES: dict[str, SurrogateGrad] = {"rect": rect_grad, "tanh": tanh_grad, "atan": atan_grad}


def surrogate_grad(surrogate: str) -> SurrogateGrad:
    """The derivative ``dS/dh(h - v_th, param)`` of the named surrogate; an unknown name says the valid ones."""
    try:
        return SURROGATES[surrogate]
    except KeyError:
        raise ValueError(f"unknown surrogate {surrogate!r}; valid: {', '.join(SURROGATES)}") from None


class SpikeFn(torch.autograd.Function):
    """Heaviside forward; backward ``grad * dS/dh(h - v_th, param)`` of the named surrogate."""

    @staticmethod
    def forward(ctx, h: Tensor, v_th: float, surrogate: str, param: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(h)
        ctx.v_th, ctx.surrogate, ctx.param = v_th, surrogate, param
        return float_mask(torch.ge, h, v_th)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (h,) = ctx.saved_tensors
        x = (h - ctx.v_th).to(grad_out.dtype)
        return grad_out * SURROGATES[ctx.surrogate](x, ctx.param), None, None, None


def spike(h: Tensor, v_th: float, surrogate: str = "rect", param: float = 1.0) -> Tensor:
    """Fire ``(h >= v_th)`` with the named surrogate gradient."""
    surrogate_grad(surrogate)  # validate the name before autograd sees it
    return SpikeFn.apply(h, v_th, surrogate, param)
