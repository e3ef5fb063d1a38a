"""Image and event-frame transforms: the CIFAR recipe, Cutout, and event-frame augmentation.

Training views get augmentation, evaluation views only the deterministic part (resize,
normalise), so the same sample always gives the same evaluation tensor.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchvision import transforms as T

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Cutout:
    """Zero one ``size`` x ``size`` square at a random centre (DeVries & Taylor 2017), clipped at the border.

    Runs on the normalised tensor ``[C,H,W]``, after ``Normalize``, as in the original recipe.
    """

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.size <= 0:
            return img
        h, w = img.shape[-2:]
        cy = int(torch.randint(h, (1,)))
        cx = int(torch.randint(w, (1,)))
        y0, y1 = max(0, cy - self.size // 2), min(h, cy + (self.size + 1) // 2)
        x0, x1 = max(0, cx - self.size // 2), min(w, cx + (self.size + 1) // 2)
        img = img.clone()
        img[..., y0:y1, x0:x1] = 0
        return img

    def __repr__(self) -> str:
        return f"Cutout(size={self.size})"


def cifar_transforms(
    augment: Mapping[str, Any], mean: Sequence[float], std: Sequence[float], image_size: int | None
) -> tuple[T.Compose, T.Compose]:
    """(train, eval) transforms for 32x32 PIL images: crop+pad, flip, AutoAugment, Cutout, optional resize."""
    size = int(image_size or 32)
    resize = [T.Resize(size, antialias=True)] if size != 32 else []
    train: list = resize + [T.RandomCrop(size, padding=int(augment["crop_padding"] or 0))]
    if augment["flip"]:
        train.append(T.RandomHorizontalFlip())
    if augment["autoaugment"]:
        train.append(T.AutoAugment(T.AutoAugmentPolicy.CIFAR10))
    train += [T.ToTensor(), T.Normalize(mean, std)]
    if int(augment["cutout"] or 0) > 0:
        train.append(Cutout(int(augment["cutout"])))
    evaluation = resize + [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(train), T.Compose(evaluation)


def imagenet_transforms(augment: Mapping[str, Any], image_size: int | None) -> tuple[T.Compose, T.Compose]:
    """(train, eval): RandomResizedCrop + flip / Resize(size/0.875) + CenterCrop, ImageNet mean/std."""
    size = int(image_size or 224)
    train: list = [T.RandomResizedCrop(size)]
    if augment["flip"]:
        train.append(T.RandomHorizontalFlip())
    train += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    evaluation = [T.Resize(int(round(size / 0.875))), T.CenterCrop(size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(train), T.Compose(evaluation)


def tensor_image_transforms(
    padding: int, mean: Sequence[float], std: Sequence[float], size: int
) -> tuple[T.Compose, T.Compose]:
    """(train, eval) for float tensors ``[C,H,W]`` in [0,1] (digits): padded random crop only, no flip."""
    norm = T.Normalize(mean, std)
    train = [T.RandomCrop(size, padding=padding)] if padding > 0 else []
    return T.Compose(train + [norm]), T.Compose([norm])


class EventFrameAugment:
    """Training augmentation of event frames ``[T,C,H,W]``: horizontal flip and a small translation.

    The same flip and shift apply to every time step (a moving camera would shift all frames
    alike); shifted-in pixels are zero (no events). Flip is off for direction-dependent classes
    (DVS128 Gesture has left/right-hand and clockwise/counter-clockwise gestures).
    """

    def __init__(self, flip: bool, translate: bool, max_shift_fraction: float = 0.1):
        self.flip = bool(flip)
        self.translate = bool(translate)
        self.max_shift_fraction = float(max_shift_fraction)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        if self.flip and bool(torch.rand(()) < 0.5):
            frames = frames.flip(-1)
        if self.translate:
            h, w = frames.shape[-2:]
            my, mx = int(round(h * self.max_shift_fraction)), int(round(w * self.max_shift_fraction))
            dy = int(torch.randint(-my, my + 1, (1,))) if my else 0
            dx = int(torch.randint(-mx, mx + 1, (1,))) if mx else 0
            frames = shift_frames(frames, dy, dx)
        return frames

    def __repr__(self) -> str:
        return f"EventFrameAugment(flip={self.flip}, translate={self.translate})"


def shift_frames(frames: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate the last two axes by (dy, dx) pixels, filling with zeros (no wrap-around)."""
    if dy == 0 and dx == 0:
        return frames
    out = torch.zeros_like(frames)
    h, w = frames.shape[-2:]
    if abs(dy) >= h or abs(dx) >= w:
        return out
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., yd, xd] = frames[..., ys, xs]
    return out
