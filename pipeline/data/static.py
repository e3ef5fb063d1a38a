"""Static image datasets: CIFAR-10/100 (torchvision layout or npz files) and ImageNet (ImageFolder).

Both CIFAR formats end as the same in-memory arrays (uint8 HWC images, int labels), so the
transforms, limits and validation split behave identically whatever the source on disk.
"""
from __future__ import annotations

import copy
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .bundle import DataBundle, LabelledSubset, balanced_prefix, prefix, train_val_test
from .errors import DATA_DOC, DataError, layout_error
from .settings import opt_path
from .transforms import (
    CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD,
    cifar_transforms, imagenet_transforms,
)

CIFAR = {
    "cifar10": dict(classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD, tv_folder="cifar-10-batches-py",
                    tv_files=["batches.meta", "data_batch_1", "data_batch_2", "data_batch_3",
                              "data_batch_4", "data_batch_5", "test_batch"]),
    "cifar100": dict(classes=100, mean=CIFAR100_MEAN, std=CIFAR100_STD, tv_folder="cifar-100-python",
                     tv_files=["meta", "train", "test"]),
}


class ArrayImages(Dataset):
    """uint8 images ``[N,H,W,3]`` and labels; each item goes through PIL and ``transform``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None):
        self.images = images
        self.targets = [int(v) for v in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), self.targets[i]


# ---------------------------------------------------------------- CIFAR npz
def _npz_layout(name: str) -> str:
    return (
        f"<data.root>/\n"
        f"  {name}_train.npz  (or {name}_train_subset.npz)\n"
        f"  {name}_test.npz\n"
        f"each with images (N,32,32,3) uint8 HWC RGB, labels (N,) int, optional classes (K,) str"
    )


def _npz_fix(name: str) -> str:
    return (
        f"set data.root to the folder holding the npz files, or data.train_file / data.test_file\n"
        f"to the files themselves (format: {DATA_DOC} in the repository), or use the torchvision\n"
        f"layout with data.format: torchvision (data.download: true fetches it where a network exists)"
    )


def find_cifar_npz(name: str, cfg: Mapping[str, Any]) -> tuple[Path, Path] | None:
    """(train, test) npz paths from data.train_file/test_file or data.root; None when none exist."""
    root = opt_path(cfg.get("root"))
    train, test = opt_path(cfg.get("train_file")), opt_path(cfg.get("test_file"))
    if root is not None and root.is_dir():
        if train is None:
            train = next((root / f for f in (f"{name}_train.npz", f"{name}_train_subset.npz")
                          if (root / f).is_file()), None)
        if test is None and (root / f"{name}_test.npz").is_file():
            test = root / f"{name}_test.npz"
    if train is None and test is None:
        return None
    for path, key in ((train, "data.train_file"), (test, "data.test_file")):
        if path is None or not path.is_file():
            raise layout_error(
                f"{name} npz", path if path is not None else root, _npz_layout(name),
                _npz_fix(name), problem=f"missing file ({key} or the default name under data.root)",
            )
    return train, test


def load_cifar_npz(path: Path, num_classes: int,
                   name: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Read and validate one CIFAR npz: (images uint8 NHWC, labels int64, class names or None).

    Every problem is a :class:`DataError` that shows the file, the layout and the fix.
    """
    name = name or ("cifar10" if num_classes == 10 else "cifar100")

    def bad(problem: str) -> DataError:
        return layout_error(f"{name} npz", path, _npz_layout(name), _npz_fix(name), problem=problem)

    if not zipfile.is_zipfile(path):  # np.load would try pickle next and blame allow_pickle
        raise bad("not an npz archive (not a zip of .npy arrays): a truncated or corrupt copy? replace the file")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            for key in ("images", "labels"):
                if key not in keys:
                    raise bad(f"missing key '{key}' (keys present: {sorted(keys)})")
            images, labels = z["images"], z["labels"]
            classes = [str(c) for c in z["classes"]] if "classes" in keys else None
    except DataError:
        raise
    except Exception as exc:  # damaged members, object arrays: name the file, not numpy's option
        raise bad(f"an array could not be read ({type(exc).__name__}): a truncated or corrupt copy? "
                  f"replace the file") from exc
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise bad(f"key 'images' has dtype {images.dtype} shape {images.shape}; expected uint8 (N,H,W,3) HWC RGB")
    if images.shape[1:3] != (32, 32):
        raise bad(f"key 'images' holds {images.shape[1]}x{images.shape[2]} images; CIFAR images are 32x32 "
                  f"(data.image_size resizes them for the model: store the 32x32 originals)")
    if labels.dtype.kind not in "iu" or labels.shape != (images.shape[0],):
        raise bad(f"key 'labels' has dtype {labels.dtype} shape {labels.shape}; "
                  f"expected an integer array of shape ({images.shape[0]},)")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise bad(f"key 'labels' holds values in [{labels.min()}, {labels.max()}]; expected [0, {num_classes - 1}]")
    if classes is not None and len(classes) != num_classes:
        raise bad(f"key 'classes' lists {len(classes)} names; expected {num_classes}")
    return images, labels.astype(np.int64), classes


# ---------------------------------------------------------------- CIFAR torchvision
def load_cifar_torchvision(name: str, cfg: Mapping[str, Any]):
    """(train images, train labels, test images, test labels, classes) from torchvision's layout.

    Only downloads when ``data.download`` is true; otherwise checks the files first, so a
    missing dataset fails with the layout instead of a network attempt.
    """
    import torchvision

    spec = CIFAR[name]
    root = opt_path(cfg.get("root"))
    layout = f"<data.root>/\n  {spec['tv_folder']}/\n" + "".join(f"    {f}\n" for f in spec["tv_files"])
    fix = (f"set data.download: true (needs internet) to fetch it into data.root, or copy the\n"
           f"extracted {spec['tv_folder']}/ from https://www.cs.toronto.edu/~kriz/cifar.html there,\n"
           f"or point data.root / data.train_file / data.test_file at npz files (data.format: npz)")
    if root is None:
        raise layout_error(f"{name} (torchvision layout)", None, layout, fix)
    download = bool(cfg["download"])
    missing = [f for f in spec["tv_files"] if not (root / spec["tv_folder"] / f).is_file()]
    if missing and not download:
        raise layout_error(f"{name} (torchvision layout)", root, layout, fix,
                           problem=f"missing {', '.join(missing)}")
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except RuntimeError as exc:  # corrupted files (md5 mismatch)
        raise layout_error(f"{name} (torchvision layout)", root, layout, fix, problem=str(exc)) from exc
    return (train.data, np.asarray(train.targets, dtype=np.int64),
            test.data, np.asarray(test.targets, dtype=np.int64), list(train.classes))


def _default_classes(name: str) -> list[str]:
    if name == "cifar10":
        return ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return [str(i) for i in range(100)]


def build_cifar(name: str, cfg: Mapping[str, Any], seed: int) -> DataBundle:
    """CIFAR-10/100 from npz (data.format npz, or auto with npz files present) or torchvision's layout."""
    spec = CIFAR[name]
    fmt = cfg["format"]
    files = find_cifar_npz(name, cfg) if fmt in ("auto", "npz") else None
    if fmt == "npz" and files is None:
        raise layout_error(f"{name} npz", opt_path(cfg.get("root")), _npz_layout(name), _npz_fix(name))
    if files is not None:
        x_tr, y_tr, classes = load_cifar_npz(files[0], spec["classes"], name)
        x_te, y_te, classes_te = load_cifar_npz(files[1], spec["classes"], name)
        classes = classes or classes_te or _default_classes(name)
    else:
        x_tr, y_tr, x_te, y_te, classes = load_cifar_torchvision(name, cfg)
    t_train, t_eval = cifar_transforms(cfg["augment"], spec["mean"], spec["std"], cfg.get("image_size"))
    test_idx = prefix(len(y_te), cfg.get("limit_test"))
    x_te, y_te = x_te[test_idx], y_te[test_idx]  # copy only the kept rows
    lim = cfg.get("limit_train")
    if lim is not None:
        x_tr, y_tr = x_tr[: int(lim)], y_tr[: int(lim)]
    test = ArrayImages(x_te, y_te, t_eval)
    train, val, test = train_val_test(
        lambda is_train: ArrayImages(x_tr, y_tr, t_train if is_train else t_eval),
        y_tr, test, None, float(cfg["val_fraction"]), seed,
    )
    size = int(cfg.get("image_size") or 32)
    return DataBundle(
        train=train, val=val, test=test, num_classes=spec["classes"], in_channels=3,
        image_size=(size, size), mean=tuple(spec["mean"]), std=tuple(spec["std"]), is_event=False,
        class_names=classes, name=name, input_encoding="normalize",
        extras={"source": [str(f) for f in files] if files else "torchvision"},
    )


# ---------------------------------------------------------------- ImageNet
IMAGENET_LAYOUT = """<data.root>/
  train/
    n01440764/  *.JPEG
    ...         (1000 class folders)
  val/
    n01440764/  *.JPEG   (validation images sorted into the same class folders)
    ..."""


def build_imagenet(cfg: Mapping[str, Any], seed: int) -> DataBundle:
    """ImageNet as two ImageFolders (root/train, root/val); val serves as the test split."""
    from torchvision.datasets import ImageFolder

    root = opt_path(cfg.get("root"))
    fix = ("set data.root to the ImageNet folder; sort the validation images into class folders\n"
           "(e.g. with the valprep.sh script used by the PyTorch ImageNet example)")
    for split in ("train", "val"):
        folder = None if root is None else root / split
        if folder is None or not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
            raise layout_error("imagenet (ImageFolder)", folder if folder is not None else root,
                               IMAGENET_LAYOUT, fix, problem=f"no class folders in {split}/")
    t_train, t_eval = imagenet_transforms(cfg["augment"], cfg.get("image_size"))
    try:
        train_eval = ImageFolder(str(root / "train"), transform=t_eval)
        test_full = ImageFolder(str(root / "val"), transform=t_eval)
    except (FileNotFoundError, RuntimeError) as exc:
        raise layout_error("imagenet (ImageFolder)", root, IMAGENET_LAYOUT, fix, problem=str(exc)) from exc
    if test_full.classes != train_eval.classes:
        raise layout_error("imagenet (ImageFolder)", root / "val", IMAGENET_LAYOUT, fix,
                           problem="val/ class folders differ from train/ class folders")
    train_aug = copy.copy(train_eval)  # shares the scanned file list: one directory walk, two views
    train_aug.transform = t_train
    test = LabelledSubset(test_full, balanced_prefix(test_full.targets, cfg.get("limit_test")), test_full.targets)
    train, val, test = train_val_test(
        lambda is_train: train_aug if is_train else train_eval, train_eval.targets, test,
        cfg.get("limit_train"), float(cfg["val_fraction"]), seed, balanced=True,
    )
    size = int(cfg.get("image_size") or 224)
    return DataBundle(
        train=train, val=val, test=test, num_classes=len(train_eval.classes), in_channels=3,
        image_size=(size, size), mean=IMAGENET_MEAN, std=IMAGENET_STD, is_event=False,
        class_names=list(train_eval.classes), name="imagenet", input_encoding="normalize",
    )
