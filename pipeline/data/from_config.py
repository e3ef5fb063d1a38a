"""Datasets, loaders and model facts built from one run config: the data glue every stage shares.

Why here: the stages (train, reduce_t, qat, unroll, export, validate) all read ``cfg["data"]``
the same way; one module keeps their batch sizes, workers, seeds and limits identical.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .build import build_datasets
from .bundle import DataBundle
from .loader import make_loader

FRAMES_CACHE = "frames_cache"  # under artifacts_dir: derived data lives with the artifacts, not the data


def data_bundle(cfg: Mapping[str, Any], T: int | None = None) -> DataBundle:
    """The run's datasets; ``T`` (frames per event sample) defaults to model.T. Derived data (event
    frames) is cached under ``<artifacts_dir>/frames_cache`` unless ``data.cache_dir`` says otherwise."""
    data = dict(cfg["data"])
    if not data.get("cache_dir"):
        data["cache_dir"] = str(Path(cfg.get("artifacts_dir") or "artifacts").absolute() / FRAMES_CACHE)
    return build_datasets(data, T or cfg["model"]["T"], seed=cfg["seed"])


def model_config(cfg: Mapping[str, Any], bundle: DataBundle) -> dict[str, Any]:
    """The model section plus what only the dataset knows (classes, input channels)."""
    return dict(cfg["model"], num_classes=bundle.num_classes, in_channels=bundle.in_channels)


def data_meta(bundle: DataBundle) -> dict[str, Any]:
    """Facts a deployed model needs to be fed correctly; stored in checkpoints and ONNX metadata."""
    return {
        "dataset": bundle.name, "num_classes": bundle.num_classes, "in_channels": bundle.in_channels,
        "image_size": list(bundle.image_size), "mean": list(bundle.mean), "std": list(bundle.std),
        "is_event": bundle.is_event, "class_names": list(bundle.class_names),
    }


def train_loader(cfg: Mapping[str, Any], bundle: DataBundle, rank: int = 0, world_size: int = 1) -> DataLoader:
    """The shuffled training loader; under several processes each rank reads its own shard."""
    d = cfg["data"]
    if world_size > 1:
        sampler = DistributedSampler(bundle.train, num_replicas=world_size, rank=rank, shuffle=True,
                                     seed=cfg["seed"], drop_last=True)
        return make_loader(bundle.train, d["batch_size"], train=True, workers=d["workers"], seed=cfg["seed"],
                           sampler=sampler, prefetch=d.get("prefetch"))
    return make_loader(bundle.train, d["batch_size"], train=True, workers=d["workers"], seed=cfg["seed"],
                       prefetch=d.get("prefetch"))


def eval_loader(cfg: Mapping[str, Any], dataset: Dataset, limit: int | None = None) -> DataLoader:
    """An ordered evaluation loader over ``dataset`` (its first ``limit`` samples when given)."""
    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, range(limit))
    d = cfg["data"]
    return make_loader(dataset, d["eval_batch_size"], train=False, workers=d["workers"], seed=cfg["seed"],
                       prefetch=d.get("prefetch"))
