"""A minimal Q/DQ model: symmetric INT8 fake quantisation of every conv (weights + input).

Why it exists: it is the exact Q/DQ form TensorRT's explicit quantisation wants (int8, zero
point 0, per-channel weight scales on axis 0, per-tensor activation scales), produced by plain
torch ops that the ONNX exporter turns into QuantizeLinear/DequantizeLinear pairs. The INT8
export, its ONNX Runtime parity and the static TensorRT check are tested on it without NNCF,
and it is a reference to compare the QAT stage's export against. The pipeline never produces
it, so it lives with the tests and registers its rebuild recipe with ``pipeline.deploy.graphs.unroll``
on import (an unrolled file of it then saves and loads like the QAT one).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.deploy.graphs.unroll import register_int8_kind
from pipeline.models import SeqConvBN

QMIN, QMAX = -128, 127


def weight_scales(w: Tensor) -> Tensor:
    """Per-output-channel symmetric scales ``max|w| / 127`` (never 0)."""
    return (w.detach().abs().flatten(1).amax(1) / QMAX).clamp_min(1e-8)


class QDQConv2d(nn.Module):
    """A conv with per-tensor input fake-quant and per-channel weight fake-quant (symmetric)."""

    def __init__(self, conv: nn.Conv2d, input_scale: float) -> None:
        super().__init__()
        self.conv = conv
        self.register_buffer("w_scale", weight_scales(conv.weight))
        self.register_buffer("w_zero", torch.zeros_like(self.w_scale, dtype=torch.int32))
        self.input_scale = float(input_scale)

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv
        xq = torch.fake_quantize_per_tensor_affine(x, self.input_scale, 0, QMIN, QMAX)
        wq = torch.fake_quantize_per_channel_affine(c.weight, self.w_scale, self.w_zero, 0, QMIN, QMAX)
        return F.conv2d(xq, wq, c.bias, c.stride, c.padding, c.dilation, c.groups)


@torch.no_grad()
def quantize_convs(model: nn.Module, calibration: Iterable[Tensor]) -> nn.Module:
    """Replace every ``nn.Conv2d`` inside a ``SeqConvBN`` with :class:`QDQConv2d`, in place.

    Input scales are ``max|x| / 127`` over the calibration batches (a spike input gives 1/127,
    so 0/1 spikes stay exact). Returns ``model``.
    """
    convs = [m for m in model.modules() if isinstance(m, SeqConvBN)]
    peaks = {id(m): 0.0 for m in convs}
    hooks = [m.conv.register_forward_pre_hook(
        lambda mod, inp, key=id(m): peaks.__setitem__(key, max(peaks[key], float(inp[0].abs().max()))))
        for m in convs]
    model.eval()
    for x in calibration:
        model(x)
    for h in hooks:
        h.remove()
    for m in convs:
        m.conv = QDQConv2d(m.conv, max(peaks[id(m)], 1e-6) / QMAX)
    return model


def _record(module: nn.Module) -> dict[str, Any] | None:
    """What rebuilds ``module`` in ``pipeline.deploy.graphs.unroll``: the input scale of every wrapped conv."""
    scales = {name: m.input_scale for name, m in module.named_modules() if isinstance(m, QDQConv2d)}
    return {"input_scales": scales} if scales else None


def _rebuild(model: nn.Module, record: dict[str, Any]) -> nn.Module:
    """The reference Q/DQ structure: every recorded conv wrapped in a ``QDQConv2d`` with its input scale."""
    for name, scale in record["input_scales"].items():
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, attr, QDQConv2d(getattr(owner, attr), float(scale)))
    return model


register_int8_kind("qdq_reference", _record, _rebuild)
