"""Event-camera datasets as frame datasets: DVS128 Gesture, CIFAR10-DVS (tonic) and N-MNIST (npz).

All three go through the same path: an event source, frames counted once into the frame
cache, then per-item augmentation (training view only) and the log1p encoding.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .bundle import DataBundle, LabelledSubset, limit_indices, train_val_test
from .frames_cache import EventFrames, FrameCache, default_cache_root
from .nmnist import NpzEventSource, default_nmnist_file
from .settings import opt_path
from .tonic_sources import cifar10dvs_sources, class_names, gesture_sources
from .transforms import EventFrameAugment

Sources = tuple[Any, Any, list[str], Optional[Path]]  # train source, test source, class names, cache hint


def _gesture(cfg: Mapping[str, Any]) -> Sources:
    root = opt_path(cfg.get("root"))
    train, test = gesture_sources(root)
    return train, test, class_names("dvsgesture"), root


def _cifar10dvs(cfg: Mapping[str, Any]) -> Sources:
    root = opt_path(cfg.get("root"))
    train, test = cifar10dvs_sources(root)
    return train, test, class_names("cifar10dvs"), root


def _nmnist(cfg: Mapping[str, Any]) -> Sources:
    root = opt_path(cfg.get("root"))
    train_path = default_nmnist_file(root, opt_path(cfg.get("train_file")))
    test_path = opt_path(cfg.get("test_file"))
    test_path = train_path if test_path is None else default_nmnist_file(None, test_path)
    train, test = NpzEventSource(train_path, test=False), NpzEventSource(test_path, test=True)
    return train, test, train.class_names, root if root is not None else train_path.parent


@dataclass(frozen=True)
class EventDataset:
    """One event dataset: where its recordings come from and how its frames may be handled."""

    sources: Callable[[Mapping[str, Any]], Sources]
    native_size: int  # sensor side in pixels (frames keep it unless data.image_size is set)
    flip_ok: bool  # gestures and digits are chiral: never flipped
    balanced: bool  # folder-ordered sources take class-balanced prefixes; N-MNIST's npz rows are shuffled


EVENT_DATASETS: dict[str, EventDataset] = {
    "dvsgesture": EventDataset(_gesture, 128, flip_ok=False, balanced=True),
    "cifar10dvs": EventDataset(_cifar10dvs, 128, flip_ok=True, balanced=True),
    "nmnist": EventDataset(_nmnist, 34, flip_ok=False, balanced=False),
}


def build_events(name: str, cfg: Mapping[str, Any], n_frames: int, seed: int) -> DataBundle:
    """The bundle for an event dataset: ``x`` is ``[T, 2, H, W]`` float32 (log1p of event counts)."""
    ds = EVENT_DATASETS[name]
    src_train, src_test, names, _ = ds.sources(cfg)
    side = int(cfg.get("image_size") or ds.native_size)
    size = (side, side)
    cache_root = default_cache_root(cfg.get("cache_dir"))
    cache = FrameCache(cache_root, src_train, n_frames, size)  # keyed by the source's content:
    test_cache = cache if src_test.fingerprint == src_train.fingerprint else \
        FrameCache(cache_root, src_test, n_frames, size)  # a separate test file gets its own folder
    aug_cfg = cfg["augment"]
    augment = EventFrameAugment(flip=bool(aug_cfg["flip"]) and ds.flip_ok,
                                translate=bool(aug_cfg["event_affine"]))
    test_full = EventFrames(src_test, test_cache, n_frames, size)
    test_idx = limit_indices(test_full.targets, cfg.get("limit_test"), ds.balanced)
    test = LabelledSubset(test_full, test_idx, test_full.targets)
    train, val, test = train_val_test(
        lambda is_train: EventFrames(src_train, cache, n_frames, size, augment if is_train else None),
        src_train.targets, test, cfg.get("limit_train"), float(cfg["val_fraction"]), seed, balanced=ds.balanced,
    )
    return DataBundle(
        train=train, val=val, test=test, num_classes=len(names), in_channels=int(src_train.sensor_size[2]),
        image_size=size, mean=(0.0,) * int(src_train.sensor_size[2]), std=(1.0,) * int(src_train.sensor_size[2]),
        is_event=True, class_names=names, name=name, frames=int(n_frames),
        input_encoding=f"event counts in {n_frames} equal time bins, rebinned by area to {side}x{side}, log1p",
        extras={"cache_dir": str(cache.dir), "augment": repr(augment)},
    )
