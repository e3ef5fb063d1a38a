"""The torch backend: a runner over a torch module (float, QAT or unrolled), for parity and the latency baseline."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..base import Runner
from ..executed import Op, summarize
from ..precision import strict_fp32
from . import Backend


class TorchRunner(Runner):
    """``module(x) -> logits`` under ``torch.no_grad`` on ``device``, in strict FP32.

    Strict FP32 (no TF32 convolutions, see :mod:`pipeline.runtime.precision`): validate's torch rows are
    gated at 0 points against ONNX Runtime's FP32 rows, so they must compute the same arithmetic.
    """

    name = "torch"

    def __init__(self, module: Any, precision: str = "fp32", device: str = "cpu",
                 input_shape: tuple[int | None, ...] | None = None) -> None:
        import torch

        self._torch = torch
        self.module = module.eval().to(device)
        self.device = device
        self.precision = precision
        self.input_names, self.output_names = ["input"], ["logits"]
        self.input_shape = tuple(input_shape) if input_shape is not None else (None,)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in self.input_names]
        with torch.no_grad(), strict_fp32():
            out = self.module(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.detach().float().cpu().numpy() for n, o in zip(self.output_names, outs)}

    def set_threads(self, threads: int | None) -> None:
        if threads:
            self._torch.set_num_threads(int(threads))

    def executed_precision(self) -> dict[str, Any]:
        """Float kernels by construction: QAT and unrolled INT8 modules are fake-quant in eager torch."""
        return torch_executed(self.module, self.precision)


# ---------------------------------------------------------------- executed precision: torch
TORCH_REASON = ("torch eager runs fake-quant: the quantisers quantise and dequantise around float "
                "convolutions (QAT and the unrolled INT8 module), no integer kernel runs")


def torch_executed(module: Any, precision: str) -> dict[str, Any]:
    """Torch rows: every conv/linear module runs float kernels by construction (fake-quant for int8)."""
    from torch import nn

    ops = []
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            ops.append(Op("conv", False, f"{type(m).__name__}:fp32"))
        elif isinstance(m, nn.Linear):
            ops.append(Op("matmul", False, f"{type(m).__name__}:fp32"))
    source = ("torch eager: conv/linear modules counted; all run float kernels"
              + ("; INT8 here is fake-quant by construction (quantise -> dequantise -> float op)"
                 if precision == "int8" else ""))
    return summarize(ops, source, float_reason=TORCH_REASON)



class Manager(Backend):
    dists = ("torch",)

    def is_available(self) -> tuple[bool, str]:
        try:
            import torch
        except ImportError as exc:
            return False, f"torch is not installed ({exc})"
        return True, f"torch {torch.__version__}"

    def build(self, module: Any) -> Any:
        return module

    def make_runner(self, model: Any, **options: Any) -> TorchRunner:
        return TorchRunner(model, **options)
