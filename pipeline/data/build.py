"""``build_datasets``: one entry point from the ``data`` config section to a :class:`DataBundle`.

:data:`BUILDERS` is the table of datasets (``data.dataset`` -> builder); its keys are the
schema's ``data.dataset`` choices (tests/data/test_data_static.py checks both ways), so adding a
dataset is one builder plus one row here and one choice in ``pipeline/schema.py``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .bundle import DataBundle
from .digits import build_digits
from .errors import DataError
from .settings import data_settings
from .static import build_cifar, build_imagenet

# (data settings, dataset name, frames per event sample, validation-split seed) -> bundle
Builder = Callable[[Mapping[str, Any], str, int, int], DataBundle]


def _events(cfg: Mapping[str, Any], name: str, T: int, seed: int) -> DataBundle:
    # imported here, not at the top: it loads tonic (about a second), which image datasets never need
    from .events import build_events

    return build_events(name, cfg, T, seed)


BUILDERS: dict[str, Builder] = {
    "digits": lambda cfg, name, T, seed: build_digits(cfg, seed),
    "cifar10": lambda cfg, name, T, seed: build_cifar(name, cfg, seed),
    "cifar100": lambda cfg, name, T, seed: build_cifar(name, cfg, seed),
    "imagenet": lambda cfg, name, T, seed: build_imagenet(cfg, seed),
    "cifar10dvs": _events,
    "dvsgesture": _events,
    "nmnist": _events,
}
DATASETS: tuple[str, ...] = tuple(BUILDERS)


def build_datasets(data_cfg: Mapping[str, Any] | None, T: int, seed: int = 0) -> DataBundle:
    """Build train/val/test for ``data_cfg['dataset']``; ``T`` is the number of frames per event sample.

    Missing keys fall back to the schema defaults. ``seed`` drives the validation split only:
    test splits are fixed so every run reports on the same samples.
    """
    cfg = data_settings(data_cfg)
    name = cfg["dataset"]
    if name not in BUILDERS:  # a schema choice without a row here
        raise DataError(f"data.dataset: no builder for '{name}' in pipeline/data/build.py BUILDERS "
                        f"(built here: {', '.join(DATASETS)})")
    return BUILDERS[name](cfg, name, int(T), seed)
