"""Datasets for the pipeline: static images, event cameras (tonic / npz), and the embedded default.

Public API: :func:`build_datasets` -> :class:`DataBundle`, :func:`make_loader`, :class:`DataError`;
from a run config: :func:`data_bundle`, :func:`train_loader`, :func:`eval_loader`, :func:`model_config`,
:func:`data_meta` (the glue every stage shares).
"""
from __future__ import annotations

from .build import DATASETS, build_datasets
from .bundle import DataBundle
from .errors import DataError
from .frames import events_to_frames, frames_to_input
from .from_config import data_bundle, data_meta, eval_loader, model_config, train_loader
from .loader import make_loader

__all__ = ["DATASETS", "DataBundle", "DataError", "build_datasets", "data_bundle", "data_meta", "eval_loader",
           "events_to_frames", "frames_to_input", "make_loader", "model_config", "train_loader"]
