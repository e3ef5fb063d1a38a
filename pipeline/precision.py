"""Float precision policy: strict FP32 for every measurement, TF32 and bf16/fp16 only inside training.

Why: with this torch, cuDNN convolutions default to TF32 on Ampere and newer GPUs (about 5e-4
relative error). A parity check that calls a spike flip "real" when the membrane sits more than
1e-4 from the threshold, or a 0-point accuracy gate between a CUDA torch row and a CPU ONNX
Runtime row, then passes or fails by chance. So:

- :func:`strict_fp32` forces IEEE FP32 matmuls and convolutions (CUDA, cuDNN and oneDNN) for
  the duration of a block; parity code and validate's torch rows run inside it;
- :func:`training_precision` allows TF32 (and turns on ``cudnn.benchmark``) for the duration
  of a training loop on CUDA, and restores the previous settings afterwards;
- :func:`amp_dtype` is the autocast policy: bf16 without a GradScaler where the GPU supports
  it, fp16 with a GradScaler otherwise, bf16 on the CPU only on request.

The strict-FP32 primitives live in :mod:`pipeline.runtime.precision` (the runtime package ships
without the rest of the pipeline) and are re-exported here. Every setting is restored on exit.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from pipeline.runtime.precision import apply_fp32_settings, fp32_settings, is_strict_fp32, strict_fp32

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@contextlib.contextmanager
def training_precision(device: str) -> Iterator[None]:
    """On CUDA: TF32 matmuls/convolutions and ``cudnn.benchmark`` inside the block; CPU: unchanged.

    TF32 keeps FP32's range with a 10-bit mantissa: harmless for SGD, wrong for parity checks,
    hence only here. ``cudnn.benchmark`` picks the fastest kernels per shape (not deterministic).
    """
    if not str(device).startswith("cuda"):
        yield
        return
    saved, bench = fp32_settings(), torch.backends.cudnn.benchmark
    apply_fp32_settings({"cuda.matmul": "tf32", "cudnn.conv": "tf32", "cudnn.rnn": "tf32"})
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        apply_fp32_settings(saved)
        torch.backends.cudnn.benchmark = bench


def device_type(device: str) -> str:
    """``"cuda:1"`` -> ``"cuda"`` (what ``torch.autocast`` and ``GradScaler`` take)."""
    return torch.device(device).type


def amp_dtype(device: str, precision: str = "auto", amp: bool = True, cpu_bf16: bool = False) -> torch.dtype | None:
    """The autocast dtype of a training run, or None for plain FP32.

    ``precision`` "auto": on CUDA (with ``amp``) bf16 where the GPU supports it, else fp16; on
    the CPU bf16 when ``cpu_bf16``, else FP32. "fp32", "bf16", "fp16" force that choice.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    kind = device_type(device)
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if kind == "cuda":
        if not amp:
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_bf16 else None


def needs_grad_scaler(device: str, dtype: torch.dtype | None) -> bool:
    """fp16 on CUDA needs loss scaling (its range underflows small gradients); bf16 and FP32 do not."""
    return dtype == torch.float16 and device_type(device) == "cuda"


def autocast(device: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``'s type, or a no-op for FP32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type(device), dtype=dtype)


__all__ = ["strict_fp32", "is_strict_fp32", "fp32_settings", "training_precision", "amp_dtype",
           "needs_grad_scaler", "autocast", "device_type", "PRECISIONS"]
