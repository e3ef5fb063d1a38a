"""Test-only helpers shared by several test modules (and bench/deploy_speed.py); never imported by the package.

- :mod:`.firing`: :func:`firing_model` (a fresh model whose every layer fires), :func:`real_images`.
- :mod:`.qdq_reference`: :class:`QDQConv2d`, :func:`quantize_convs`, a minimal symmetric Q/DQ model
  (TensorRT's explicit-quantisation form) that stands in for the QAT model without NNCF.
- :mod:`.triton_compare`: a script (own process, Triton's interpreter on the CPU or compiled on CUDA) that
  compares the neurons' Triton kernels with the torch path; tests/test_triton_kernels.py and
  bench/gpu_check_parts.py read its JSON report.
"""
from __future__ import annotations

from .firing import firing_model, real_images
from .qdq_reference import QDQConv2d, quantize_convs

__all__ = ["QDQConv2d", "firing_model", "quantize_convs", "real_images"]
