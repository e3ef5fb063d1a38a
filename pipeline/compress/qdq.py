"""A quantised model whose quantisers export as ONNX QuantizeLinear/DequantizeLinear pairs.

Why not export NNCF's quantisers directly: NNCF 3.4 exports them as OpenVINO's
``FakeQuantize`` op by default, which ONNX Runtime and TensorRT reject, and its Q/DQ export
mode only works under ``torch.jit`` tracing. So the quantisers are first stripped to torch
fake-quant (``nncf.strip``, native format: narrow-range weights are clamped and snapped to
their grid in place), then each is replaced by :class:`FixedFakeQuant`, whose scale and
zero point are fixed constants:

- eager and the legacy exporter (``dynamo=False``): ``torch.fake_quantize_per_*_affine``,
  which the TorchScript exporter writes as a QuantizeLinear/DequantizeLinear pair;
- the new exporter (``dynamo=True``): ``quantized_decomposed.quantize/dequantize_per_*``
  (the eager kernels have no fake-tensor implementation), which torchlib translates to
  QuantizeLinear/DequantizeLinear; per-channel weights get an extra full-range ``Clip``
  between the two (a no-op that TensorRT's Q/DQ fusion may not skip: prefer the legacy
  exporter for TensorRT).

Numerics match NNCF's own quantisers (same scale, same grid); see tests/compress/test_qat.py.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.models import set_inference_mode


class FixedFakeQuant(nn.Module):
    """INT8 fake quantisation with constant parameters (per-tensor, or per-channel on ``axis``)."""

    def __init__(self, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int, axis: int | None) -> None:
        super().__init__()
        self.quant_min, self.quant_max, self.axis = int(quant_min), int(quant_max), axis
        self.qdtype = torch.int8 if self.quant_min < 0 else torch.uint8
        if axis is None:
            # Python numbers: constants for both exporters (a buffer read would be data-dependent)
            self.scale_value = float(scale.reshape(-1)[0])
            self.zero_value = int(zero_point.reshape(-1)[0])
        self.register_buffer("scale", scale.detach().float().reshape(-1).clone())
        self.register_buffer("zero_point", zero_point.detach().to(torch.int32).reshape(-1).clone())

    @classmethod
    def from_fake_quantize(cls, fq: nn.Module) -> "FixedFakeQuant":
        """From a ``torch.ao.quantization.FakeQuantize`` (what ``nncf.strip`` produces)."""
        per_channel = fq.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)
        return cls(fq.scale, fq.zero_point, fq.quant_min, fq.quant_max, int(fq.ch_axis) if per_channel else None)

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_exporting():
            return self._decomposed(x)
        if self.axis is None:
            return torch.fake_quantize_per_tensor_affine(x, self.scale_value, self.zero_value, self.quant_min,
                                                         self.quant_max)
        return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.axis, self.quant_min,
                                                      self.quant_max)

    def _decomposed(self, x: Tensor) -> Tensor:
        from torch.ao.quantization.fx import _decomposed  # noqa: F401  (registers quantized_decomposed ops)

        qd = torch.ops.quantized_decomposed
        if self.axis is None:
            args = (self.scale_value, self.zero_value, self.quant_min, self.quant_max, self.qdtype)
            return qd.dequantize_per_tensor(qd.quantize_per_tensor(x, *args), *args)
        args = (self.scale, self.zero_point, self.axis, self.quant_min, self.quant_max, self.qdtype)
        return qd.dequantize_per_channel(qd.quantize_per_channel(x, *args), *args)

    def extra_repr(self) -> str:
        kind = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis})"
        return f"{kind}, [{self.quant_min}, {self.quant_max}]"


def to_qdq_module(qmodel: nn.Module, example_input: Any) -> nn.Module:
    """A copy of the NNCF-quantised ``qmodel`` with every quantiser as a :class:`FixedFakeQuant`.

    The result is still NNCF-wrapped (its forward runs the hooks), so call it as a whole:
    calling submodules directly would bypass the quantisers. Neurons are put in inference
    mode (plain ``h >= v_th`` spikes) and the module is returned in eval mode.
    """
    import nncf
    from nncf.parameters import StripFormat
    from nncf.torch.function_hook.wrapper import get_hook_storage
    from torch.ao.quantization import FakeQuantize

    model = copy.deepcopy(qmodel).eval()
    set_inference_mode(model, True)
    model = nncf.strip(model, do_copy=False, strip_format=StripFormat.NATIVE, example_input=example_input)
    storage = get_hook_storage(model)
    for name, hook in list(storage.named_hooks()):
        if isinstance(hook, FakeQuantize):
            storage.set_submodule(name, FixedFakeQuant.from_fake_quantize(hook))
    return model.eval()
