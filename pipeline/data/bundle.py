"""The dataset bundle every stage receives, and the index arithmetic shared by all datasets.

Validation is held out of the training set by index, over a second view of the same samples
that uses the evaluation transforms, so a validation score never sees training augmentation.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import Dataset, Subset


@dataclass
class DataBundle:
    """Train/val/test datasets plus what export and the report need to know about the input."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    is_event: bool
    class_names: list[str]
    name: str
    # How a raw sample becomes the network input (recorded next to mean/std in ONNX metadata):
    # static: "normalize(mean,std)"; events: per-pixel event counts in T equal time bins, log1p.
    input_encoding: str = "normalize"
    frames: int | None = None  # T for event datasets (first axis of x), None for static images
    extras: dict = field(default_factory=dict)


def prefix(n_total: int, limit: int | None) -> np.ndarray:
    """The first ``limit`` indices (all when ``limit`` is None)."""
    n = n_total if limit is None else max(0, min(int(limit), n_total))
    return np.arange(n, dtype=np.int64)


def balanced_prefix(labels: Sequence[int], limit: int | None) -> np.ndarray:
    """The first ``limit`` indices in class-interleaved order (sample 0 of every class, then 1, ...).

    For sources stored class by class (folders) a plain prefix would hold one class only.
    """
    labels = np.asarray(labels)
    if limit is None or limit >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    rank = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rank[idx] = np.arange(len(idx))
    order = np.lexsort((labels, rank))
    return np.sort(order[: max(0, int(limit))])


def limit_indices(labels: Sequence[int], limit: int | None, balanced: bool) -> np.ndarray:
    """The first ``limit`` samples: class-interleaved for class-ordered sources, else a plain prefix."""
    return balanced_prefix(labels, limit) if balanced else prefix(len(labels), limit)


def stratified_holdout(labels: Sequence[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (keep, held_out) with ``fraction`` held out, proportionally per class.

    Deterministic for a seed: a seeded permutation ranks samples inside their class, and the
    samples with the smallest relative rank are held out, so every class gives its share.
    """
    labels = np.asarray(labels)
    n = len(labels)
    n_out = int(round(float(fraction) * n))
    if fraction > 0 and n > 1:
        n_out = min(max(n_out, 1), n - 1)
    else:
        n_out = 0
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    rel = np.empty(n, dtype=np.float64)
    perm_labels = labels[perm]
    for c in np.unique(labels):
        pos = np.flatnonzero(perm_labels == c)
        rel[perm[pos]] = (np.arange(len(pos)) + 0.5) / len(pos)
    order = perm[np.argsort(rel[perm], kind="stable")]
    held = np.sort(order[:n_out])
    keep = np.setdiff1d(np.arange(n), held)
    return keep.astype(np.int64), held.astype(np.int64)


class LabelledSubset(Subset):
    """A :class:`Subset` that still exposes ``targets`` (samplers and reports need labels)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], labels: Sequence[int]):
        super().__init__(dataset, [int(i) for i in indices])
        all_labels = np.asarray(labels)
        self.targets = [int(all_labels[i]) for i in self.indices]


def train_val_test(
    make_view: Callable[[bool], Dataset],
    train_labels: Sequence[int],
    test: Dataset,
    limit_train: int | None,
    val_fraction: float,
    seed: int,
    balanced: bool = False,
) -> tuple[Dataset, Dataset, Dataset]:
    """Limit the training pool, hold a seeded validation split out of it, and pair both with views.

    ``make_view(train)`` returns the training-pool dataset with training (True) or evaluation
    (False) transforms; both views must index the same samples.
    """
    labels = np.asarray(train_labels)
    pool = limit_indices(labels, limit_train, balanced)
    keep, held = stratified_holdout(labels[pool], val_fraction, seed)
    train = LabelledSubset(make_view(True), pool[keep], labels)
    val = LabelledSubset(make_view(False), pool[held], labels)
    return train, val, test
