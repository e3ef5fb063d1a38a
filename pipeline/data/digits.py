"""The embedded default dataset: scikit-learn's digits (1,797 real 8x8 scans, no download).

Upscaled bilinearly to ``data.image_size`` (16 by default), one channel. The train/test split
is fixed (stratified 80/20, seed 0, independent of the run seed) so every run reports on the
same 360 test images; the normalisation constants come from the training split only.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .bundle import DataBundle, LabelledSubset, prefix, train_val_test
from .transforms import tensor_image_transforms

SPLIT_SEED = 0
TEST_FRACTION = 0.2
DEFAULT_SIZE = 16


class TensorImages(Dataset):
    """Float images ``[N,C,H,W]`` in [0,1] with integer labels and a tensor transform."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, transform=None):
        self.images = images
        self.targets = [int(v) for v in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i]
        return (self.transform(x) if self.transform else x), self.targets[i]


def load_digits_split(size: int) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray]:
    """(train images, train labels, test images, test labels), images ``[N,1,size,size]`` in [0,1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    labels = bunch.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return images[idx_train], labels[idx_train], images[idx_test], labels[idx_test]


def build_digits(cfg: Mapping[str, Any], seed: int) -> DataBundle:
    """The digits bundle: light augmentation (padded crop of at most 2 pixels, no flip)."""
    size = int(cfg.get("image_size") or DEFAULT_SIZE)
    x_train, y_train, x_test, y_test = load_digits_split(size)
    mean, std = (float(x_train.mean()),), (float(x_train.std()),)
    padding = min(int(cfg["augment"]["crop_padding"] or 0), 2)
    t_train, t_eval = tensor_image_transforms(padding, mean, std, size)
    test_idx = prefix(len(y_test), cfg.get("limit_test"))
    test = LabelledSubset(TensorImages(x_test, y_test, t_eval), test_idx, y_test)
    train, val, test = train_val_test(
        lambda is_train: TensorImages(x_train, y_train, t_train if is_train else t_eval),
        y_train, test, cfg.get("limit_train"), float(cfg["val_fraction"]), seed,
    )
    return DataBundle(
        train=train, val=val, test=test, num_classes=10, in_channels=1, image_size=(size, size),
        mean=mean, std=std, is_event=False, class_names=[str(i) for i in range(10)], name="digits",
        input_encoding="normalize",
    )
