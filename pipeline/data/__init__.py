"""Datasets for the pipeline: static images, event cameras (tonic / npz), and the embedded default.

Public API: :func:`build_datasets` -> :class:`DataBundle`, :func:`make_loader`, :class:`DataError`.
"""
from __future__ import annotations

from .build import DATASETS, build_datasets
from .bundle import DataBundle
from .errors import DataError
from .frames import events_to_frames, frames_to_input
from .loader import make_loader

__all__ = ["DATASETS", "DataBundle", "DataError", "build_datasets", "events_to_frames",
           "frames_to_input", "make_loader"]
