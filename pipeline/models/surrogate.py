"""Surrogate-gradient spike functions.

Forward is always the exact Heaviside step ``(h >= v_th)`` (so the training path and the
inference path fire identically); only the backward pass differs. With ``x = h - v_th``:

- ``rect``: ``dS/dh = 1/width`` for ``|x| < width/2``, else 0 (a box of unit area).
- ``tanh``: straight-through sigmoid-tanh, ``S ~ (1 + tanh(k x)) / 2``, so
  ``dS/dh = k/2 * (1 - tanh(k x)^2)`` (peak ``k/2`` at the threshold, unit area).
- ``atan``: ``S ~ atan(pi/2 * k x) / pi + 1/2``, so ``dS/dh = (k/2) / (1 + (pi/2 * k x)^2)``
  (peak ``k/2``, unit area; SpikingJelly's ATan with ``alpha = k``).

``param`` is ``width`` for rect and ``k`` for tanh/atan.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _heaviside(ctx, h: Tensor, v_th: float, param: float) -> Tensor:
    """Shared forward: remember ``h`` for the backward pass, fire where ``h >= v_th``."""
    ctx.save_for_backward(h)
    ctx.v_th, ctx.param = v_th, param
    return (h >= v_th).to(h.dtype)


def _x(ctx, grad_out: Tensor) -> Tensor:
    """Distance to threshold, in the gradient's dtype."""
    (h,) = ctx.saved_tensors
    return (h - ctx.v_th).to(grad_out.dtype)


def rect_grad(x: Tensor, width: float) -> Tensor:
    """``1/width`` inside ``|x| < width/2``, else 0."""
    return (x.abs() < width / 2).to(x.dtype) / width


def tanh_grad(x: Tensor, k: float) -> Tensor:
    """``k/2 * (1 - tanh(k x)^2)``."""
    return k / 2 * (1 - torch.tanh(k * x) ** 2)


def atan_grad(x: Tensor, k: float) -> Tensor:
    """``(k/2) / (1 + (pi/2 * k x)^2)``."""
    return (k / 2) / (1 + (math.pi / 2 * k * x) ** 2)


class RectSpike(torch.autograd.Function):
    """Heaviside forward, rectangular-window backward."""

    @staticmethod
    def forward(ctx, h: Tensor, v_th: float, param: float) -> Tensor:  # type: ignore[override]
        return _heaviside(ctx, h, v_th, param)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        return grad_out * rect_grad(_x(ctx, grad_out), ctx.param), None, None


class TanhSpike(torch.autograd.Function):
    """Heaviside forward, tanh straight-through backward."""

    @staticmethod
    def forward(ctx, h: Tensor, v_th: float, param: float) -> Tensor:  # type: ignore[override]
        return _heaviside(ctx, h, v_th, param)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        return grad_out * tanh_grad(_x(ctx, grad_out), ctx.param), None, None


class AtanSpike(torch.autograd.Function):
    """Heaviside forward, arctangent backward."""

    @staticmethod
    def forward(ctx, h: Tensor, v_th: float, param: float) -> Tensor:  # type: ignore[override]
        return _heaviside(ctx, h, v_th, param)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        return grad_out * atan_grad(_x(ctx, grad_out), ctx.param), None, None


SURROGATES: dict[str, type[torch.autograd.Function]] = {"rect": RectSpike, "tanh": TanhSpike, "atan": AtanSpike}


def spike(h: Tensor, v_th: float, surrogate: str = "rect", param: float = 1.0) -> Tensor:
    """Fire ``(h >= v_th)`` with the named surrogate gradient."""
    try:
        fn = SURROGATES[surrogate]
    except KeyError:
        raise ValueError(f"unknown surrogate {surrogate!r}; valid: {', '.join(SURROGATES)}") from None
    return fn.apply(h, v_th, param)
