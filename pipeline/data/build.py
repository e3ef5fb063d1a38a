"""``build_datasets``: one entry point from the ``data`` config section to a :class:`DataBundle`."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .bundle import DataBundle
from .errors import DataError
from .settings import data_settings

DATASETS = ("digits", "cifar10", "cifar100", "imagenet", "cifar10dvs", "dvsgesture", "nmnist")


def build_datasets(data_cfg: Mapping[str, Any] | None, T: int, seed: int = 0) -> DataBundle:
    """Build train/val/test for ``data_cfg['dataset']``; ``T`` is the number of frames per event sample.

    Missing keys fall back to the schema defaults. ``seed`` drives the validation split only:
    test splits are fixed so every run reports on the same samples.
    """
    cfg = data_settings(data_cfg)
    name = str(cfg["dataset"]).lower()
    if name == "digits":
        from .digits import build_digits
        return build_digits(cfg, seed)
    if name in ("cifar10", "cifar100"):
        from .static import build_cifar
        return build_cifar(name, cfg, seed)
    if name == "imagenet":
        from .static import build_imagenet
        return build_imagenet(cfg, seed)
    if name in ("cifar10dvs", "dvsgesture", "nmnist"):
        if int(T) < 1:
            raise DataError(f"model.T must be >= 1 for event dataset {name} (got {T})")
        from .events import build_events
        return build_events(name, cfg, int(T), seed)
    raise DataError(f"data.dataset: unknown dataset '{cfg['dataset']}'; choose one of {', '.join(DATASETS)}")
