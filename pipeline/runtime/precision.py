"""Strict FP32 for torch measurements: no TF32, no bf16 emulation, for the length of a block.

Here (not in ``pipeline.precision``, which re-exports it) because the runtime package ships to
the device bundle and imports nothing else of the pipeline; torch is imported only when used.

Why: with recent torch, cuDNN convolutions default to TF32 on Ampere and newer GPUs (~5e-4
relative error), so a torch row gated at 0 points against ONNX Runtime's FP32 row, or a parity
check with a 1e-4 flip margin, would pass or fail by chance. Only torch's ``fp32_precision`` API
is used (mixing it with the legacy ``allow_tf32`` flags makes torch raise); torch builds without
it (before 2.9) fall back to the legacy flags. Every setting is restored on exit.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

# (backend, op) pairs of torch's fp32_precision settings that decide matmul/conv arithmetic
PRECISION_KNOBS: tuple[tuple[str, str], ...] = (
    ("cuda", "matmul"), ("cudnn", "conv"), ("cudnn", "rnn"),
    ("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn"),
)


def _knob(backend: str, op: str) -> Any:
    import torch

    return getattr(getattr(torch.backends, backend, None), op, None)


def _knobs() -> list[tuple[str, str]]:
    """The knobs this torch has (the API arrived in torch 2.9; older builds have none of them)."""
    return [(b, o) for b, o in PRECISION_KNOBS if hasattr(_knob(b, o), "fp32_precision")]


def fp32_settings() -> dict[str, str]:
    """The current ``fp32_precision`` of every matmul/conv backend, e.g. ``{"cudnn.conv": "tf32", ...}``.

    On a torch without that API: the legacy TF32 flags, as ``"tf32"`` / ``"ieee"``.
    """
    import torch

    knobs = _knobs()
    if knobs:
        return {f"{b}.{o}": _knob(b, o).fp32_precision for b, o in knobs}
    return {"cuda.matmul": "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee",
            "cudnn.conv": "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"}


def apply_fp32_settings(settings: dict[str, str]) -> None:
    """Set the named knobs (``{"cudnn.conv": "tf32", ...}``, as :func:`fp32_settings` returns them)."""
    import torch

    if not _knobs():  # legacy flags only
        torch.backends.cuda.matmul.allow_tf32 = settings.get("cuda.matmul") == "tf32"
        torch.backends.cudnn.allow_tf32 = settings.get("cudnn.conv") == "tf32"
        return
    for name, value in settings.items():
        backend, op = name.split(".")
        _knob(backend, op).fp32_precision = value


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """IEEE FP32 for every matmul and convolution inside the block (no TF32, no bf16 emulation)."""
    saved = fp32_settings()
    apply_fp32_settings({name: "ieee" for name in saved})
    try:
        yield
    finally:
        apply_fp32_settings(saved)


def is_strict_fp32() -> bool:
    """True when every matmul/conv backend computes FP32 as IEEE FP32 (what the parity tests assert)."""
    return all(v == "ieee" for v in fp32_settings().values())


__all__ = ["strict_fp32", "is_strict_fp32", "fp32_settings", "apply_fp32_settings", "PRECISION_KNOBS"]
