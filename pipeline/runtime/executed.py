"""What precision each runtime really executed, read from the runtime's own executed graph.

Why: a file called ``model_int8.onnx`` says nothing about the arithmetic. ONNX Runtime's CPU
provider runs this project's explicit Q/DQ graph as DequantizeLinear -> float Conv (fake-quant),
OpenVINO and TensorRT compile the same graph into integer convolutions. Each backend's reader
(``*_executed`` in ``backends/<name>.py``) counts the convolutions and matmuls/gemms of its runtime's
compiled (or optimised) graph by the kernel precision the runtime chose; this module holds what they
share, and each returns one dict (see :func:`summarize`)::

    {"int8_ops": k, "ops": n,                 # convs + matmuls/gemms on integer kernels / all of them
     "int8_convs": kc, "convs": nc,            # the convolutions alone
     "int8_mac_share": float | None,           # share of convolution MACs on integer kernels
     "conv_macs": float | None, "int8_conv_macs": float | None,   # per image and time step
     "kernels": {"<op>:<precision>[:<kernel>]": count}, "source": "how it was read",
     "float_reason": str | None}               # why an int8 graph's convs ran in float, where known

OpenVINO adds ``"qdq_adaptation"``: ``None`` for a graph without activation Q/DQ pairs, else what
the runner's adaptation did (``pipeline.runtime.backends.openvino_qdq``: ``adapted``, ``spikes_uint8``,
``float_qdq``, ``how``), since the runtime model counted here is compiled from the adapted copy.

Self-contained like the rest of this package (it ships to the device bundle): every runtime is
imported where it is used, and only if present.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

# the keys every executed dict has (the report and its schema rely on them)
KEYS = ("int8_ops", "ops", "int8_mac_share", "kernels", "source")
INTEGER_TYPES = ("u8", "i8")


@dataclass
class Op:
    """One convolution or matmul as the runtime executes it."""

    kind: str  # "conv" or "matmul"
    integer: bool  # ran on an integer (u8/i8) kernel
    kernel: str  # label for the kernel histogram, e.g. "Convolution:u8:jit_avx2_I8"
    macs: float | None = None  # convolutions: MACs per image and time step (None: shape unknown)


def summarize(ops: Iterable[Op], source: str, float_reason: str | None = None, **extra: Any) -> dict[str, Any]:
    """The executed dict of a list of ops (module docstring); ``extra`` keys are added as they are."""
    ops = list(ops)
    convs = [o for o in ops if o.kind == "conv"]
    int8_convs = [o for o in convs if o.integer]
    known = all(o.macs is not None for o in convs)
    conv_macs = float(sum(o.macs for o in convs)) if convs and known else None  # type: ignore[misc]
    int8_macs = float(sum(o.macs for o in int8_convs)) if convs and known else None  # type: ignore[misc]
    if not convs:
        share = None
    elif not int8_convs:
        share = 0.0
    elif len(int8_convs) == len(convs):
        share = 1.0
    elif conv_macs:
        share = int8_macs / conv_macs  # type: ignore[operator]
    else:
        share = None  # mixed, and the shapes were not readable
    return {"int8_ops": sum(o.integer for o in ops), "ops": len(ops), "int8_convs": len(int8_convs),
            "convs": len(convs), "int8_mac_share": share, "conv_macs": conv_macs, "int8_conv_macs": int8_macs,
            "kernels": dict(sorted(Counter(o.kernel for o in ops).items())), "source": source,
            "float_reason": float_reason if convs and not int8_convs else None, **extra}


def dims_product(dims: Iterable[int]) -> float:
    return float(np.prod([float(d) for d in dims])) if dims is not None else 0.0


def conv_macs(out_shape: Sequence[int] | None, weight_shape: Sequence[int] | None) -> float | None:
    """MACs of one convolution per batch element: output H*W (all spatial axes) times the weight size.

    ``prod(weight) = Cout * Cin / groups * kH * kW`` for ``[Cout, Cin/g, kH, kW]`` and for grouped
    ``[g, Cout/g, Cin/g, kH, kW]`` weights alike, so this is ``H*W*Cout*Cin/groups*kH*kW``.
    """
    if not out_shape or not weight_shape or len(out_shape) < 3 or any(d is None or d < 0 for d in out_shape[2:]):
        return None
    return dims_product(out_shape[2:]) * dims_product(weight_shape)


__all__ = ["INTEGER_TYPES", "KEYS", "Op", "conv_macs", "dims_product", "summarize"]
