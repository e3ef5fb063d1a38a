"""DVS128 Gesture and CIFAR10-DVS read through tonic, without ever letting tonic download.

tonic 1.7 downloads the moment its ``_check_exists`` fails (DVSGesture: the .tar.gz archive
plus >= 100 .npy files under ``ibmGestureTrain/``; CIFAR10DVS: ``CIFAR10DVS.zip`` plus >= 1000
.aedat4 files). Extracted data without the archive would trigger a multi-GB download, so this
module checks the extracted layout itself, raises :class:`DataError` showing it, and builds the
tonic datasets through subclasses whose ``download`` raises instead of fetching. tonic's own
file walk and readers (``np.load`` with the ms -> us conversion; ``tonic.io.read_aedat4``,
which needs ``aedat``) are used unchanged; samples are then ordered by path, since ``os.walk``
order is not stable across file systems and the frame cache is keyed per file.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import tonic

from .errors import DataError, layout_error

GESTURE = tonic.datasets.DVSGesture
C10DVS = tonic.datasets.CIFAR10DVS
_USER_DIR = re.compile(r"^user\d+_.+$")


def _no_download(self) -> None:
    raise DataError(f"{type(self).__name__}: refusing to download into {self.location_on_system}; "
                    f"place the extracted dataset there (see the layout in the data docs)")


class DVSGesture(GESTURE):
    """tonic's DVSGesture with the download path cut off (layout is checked beforehand).

    Keeps tonic's class name: tonic reads from ``<save_to>/<class name>/``.
    """

    def _check_exists(self) -> bool:
        return True

    download = _no_download


class CIFAR10DVS(C10DVS):
    """tonic's CIFAR10DVS with the download and extraction path cut off (same class name, same folder)."""

    def _check_exists(self) -> bool:
        return True

    download = _no_download


# ---------------------------------------------------------------- layout checks
GESTURE_LAYOUT = """<data.root>/
  DVSGesture/
    ibmGestureTrain/
      user01_fluorescent/
        0.npy  1.npy  ...  10.npy   (one file per gesture class, label = file name)
      user01_fluorescent_led/
      ...                           (users 01-23)
    ibmGestureTest/
      user24_fluorescent/  ...      (users 24-29)
each .npy: (N, 4) events, columns x, y, p, t (t in ms), as in tonic's preprocessed release"""


def _gesture_fix(root: Path | None) -> str:
    dest = "<data.root>/DVSGesture" if root is None else str(root / "DVSGesture")
    return (f"download {GESTURE.train_url} ({GESTURE.train_filename}) and\n"
            f"{GESTURE.test_url} ({GESTURE.test_filename}) and extract both into {dest}/\n"
            f"(tonic's preprocessed release); set data.root to the folder that holds DVSGesture/.\n"
            f"tonic datasets never download here (data.download applies to torchvision CIFAR only)")


def check_gesture_layout(root: Path | None) -> None:
    """Raise :class:`DataError` unless ``root/DVSGesture/ibmGesture{Train,Test}`` hold user folders of .npy files."""
    if root is None:
        raise layout_error("dvsgesture", None, GESTURE_LAYOUT, _gesture_fix(root))
    for folder_name in ("ibmGestureTrain", "ibmGestureTest"):
        folder = root / "DVSGesture" / folder_name
        if not folder.is_dir():
            archive = root / "DVSGesture" / f"{folder_name}.tar.gz"
            hint = f" ({archive.name} is there: extract it)" if archive.exists() else ""
            raise layout_error("dvsgesture", folder, GESTURE_LAYOUT, _gesture_fix(root),
                               problem=f"folder {folder_name}/ missing{hint}")
        n_files = 0
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            if not _USER_DIR.match(sub.name):
                raise layout_error("dvsgesture", sub, GESTURE_LAYOUT, _gesture_fix(root),
                                   problem=f"unexpected folder '{sub.name}' (expected userNN_<lighting>)")
            for f in sub.rglob("*.npy"):
                if not f.stem.isdigit() or not 0 <= int(f.stem) < len(GESTURE.classes):
                    raise layout_error("dvsgesture", f, GESTURE_LAYOUT, _gesture_fix(root),
                                       problem=f"file name '{f.name}' is not a class index 0..10")
                n_files += 1
        if n_files == 0:
            raise layout_error("dvsgesture", folder, GESTURE_LAYOUT, _gesture_fix(root),
                               problem=f"no userNN_<lighting>/<class>.npy files in {folder_name}/")


CIFAR10DVS_LAYOUT = """<data.root>/
  CIFAR10DVS/
    airplane/
      cifar10_airplane_0.aedat4  ...   (1000 recordings per class)
    automobile/  bird/  cat/  deer/  dog/  frog/  horse/  ship/  truck/
(the class zips of tonic's CIFAR10DVS.zip, extracted; read with aedat)"""


def _c10dvs_fix(root: Path | None) -> str:
    dest = "<data.root>/CIFAR10DVS" if root is None else str(root / "CIFAR10DVS")
    return (f"download {C10DVS.url} ({C10DVS.filename}), unzip it into {dest}/ and unzip each\n"
            f"class zip there (airplane.zip ... truck.zip) so that one folder per class holds .aedat4\n"
            f"files; set data.root to the folder that holds CIFAR10DVS/. tonic never downloads here")


def check_cifar10dvs_layout(root: Path | None) -> None:
    """Raise :class:`DataError` unless every class folder under ``root/CIFAR10DVS`` holds .aedat4 files."""
    if root is None:
        raise layout_error("cifar10dvs", None, CIFAR10DVS_LAYOUT, _c10dvs_fix(root))
    base = root / "CIFAR10DVS"
    if not base.is_dir():
        raise layout_error("cifar10dvs", base, CIFAR10DVS_LAYOUT, _c10dvs_fix(root), problem="folder CIFAR10DVS/ missing")
    counts = {c: 0 for c in C10DVS.classes}
    for f in base.rglob("*.aedat4"):
        if f.parent.name not in counts:
            raise layout_error("cifar10dvs", f, CIFAR10DVS_LAYOUT, _c10dvs_fix(root),
                               problem=f"recording in folder '{f.parent.name}', which is not a class name")
        counts[f.parent.name] += 1
    missing = [c for c, n in counts.items() if n == 0]
    if missing:
        zips = [z.name for z in base.glob("*.zip")]
        hint = f" (zip files present: {', '.join(sorted(zips))}: extract them)" if zips else ""
        raise layout_error("cifar10dvs", base, CIFAR10DVS_LAYOUT, _c10dvs_fix(root),
                           problem=f"no .aedat4 files for class(es) {', '.join(missing)}{hint}")


# ---------------------------------------------------------------- sources
class TonicSource:
    """A tonic event dataset (or a subset of its samples) in stable path order."""

    def __init__(self, name: str, dataset, base: Path, indices: np.ndarray | None = None):
        order = sorted(range(len(dataset.data)), key=lambda i: dataset.data[i])
        if indices is not None:
            order = [order[i] for i in indices]
        self.name, self.dataset, self._order = name, dataset, order
        self.sensor_size = tuple(int(v) for v in dataset.sensor_size)
        self.targets = [int(dataset.targets[i]) for i in order]
        self._rel = [str(Path(dataset.data[i]).relative_to(base)) for i in order]
        self._ids = [hashlib.sha1(f"{r}|{Path(dataset.data[i]).stat().st_size}".encode()).hexdigest()[:20]
                     for r, i in zip(self._rel, order)]
        self.fingerprint = f"tonic-{tonic.__version__}"  # per-sample ids carry path and size

    def __len__(self) -> int:
        return len(self._order)

    def events(self, i: int) -> np.ndarray:
        return self.dataset[self._order[i]][0]

    def sample_id(self, i: int) -> str:
        return self._ids[i]

    def path(self, i: int) -> str:
        return self._rel[i]


def gesture_sources(root: Path) -> tuple[TonicSource, TonicSource]:
    """(train, test) sources of DVS128 Gesture (official user split)."""
    check_gesture_layout(root)
    base = root / "DVSGesture"
    return (TonicSource("dvsgesture", DVSGesture(str(root), train=True), base),
            TonicSource("dvsgesture", DVSGesture(str(root), train=False), base))


def cifar10dvs_sources(root: Path, test_fraction: float = 0.1, split_seed: int = 0) -> tuple[TonicSource, TonicSource]:
    """(train, test) sources of CIFAR10-DVS: no official split, so a fixed seeded 90/10 per class."""
    check_cifar10dvs_layout(root)
    ds = CIFAR10DVS(str(root))
    base = root / "CIFAR10DVS"
    full = TonicSource("cifar10dvs", ds, base)
    labels = np.asarray(full.targets)
    rng = np.random.default_rng(split_seed)
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_test = max(1, int(round(test_fraction * len(idx)))) if len(idx) > 1 else 0
        test.extend(rng.permutation(idx)[:n_test].tolist())
    test_idx = np.sort(np.asarray(test, dtype=np.int64))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return (TonicSource("cifar10dvs", ds, base, train_idx), TonicSource("cifar10dvs", ds, base, test_idx))


def class_names(name: str) -> list[str]:
    """Class names in label order."""
    if name == "dvsgesture":
        return list(GESTURE.classes)
    return [c for c, _ in sorted(C10DVS.classes.items(), key=lambda kv: kv[1])]
