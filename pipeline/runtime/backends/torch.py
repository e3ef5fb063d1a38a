"""The torch backend: a runner over a torch module (float, QAT or unrolled), for parity and the latency baseline."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..base import Runner
from ..executed import torch_executed
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
