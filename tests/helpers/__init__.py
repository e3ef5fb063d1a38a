"""Test-only helpers shared by several test modules ; never imported by the package or bench/.

- :func:`firing_model` (a fresh model whose every layer fires), :func:`real_images`: from
  :mod:`pipeline.testing` (bench/deploy_speed.py uses them too), re-exported for the tests.
- :mod:`.qdq_reference`: :class:`QDQConv2d`, :func:`quantize_convs`, a minimal symmetric Q/DQ model
  (TensorRT's explicit-quantisation form) that stands in for the QAT model without NNCF.
- plugin stages of the registry tests: :mod:`.dummy_stage`, :mod:`.chain_stage`, :mod:`.relabel_stage`.
"""
from __future__ import annotations

from pipeline.testing import firing_model, real_images
from .qdq_reference import QDQConv2d, quantize_convs

__all__ = ["QDQConv2d", "firing_model", "quantize_convs", "real_images"]
