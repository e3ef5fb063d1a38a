"""N-MNIST recordings from an npz (layout: docs/data.md) as an event source.

Real sensor events through exactly the same event -> frame path as the DVS datasets, small
enough to test that path everywhere. Rows with ``is_test`` form the test split.
"""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np

from .errors import DATA_DOC, DataError, layout_error

REQUIRED = {
    "x": "iu", "y": "iu", "t": "iu", "p": "iub", "offsets": "iu", "labels": "iu", "is_test": "b",
    "sensor_size": "iu",
}
NMNIST_LAYOUT = """<data.root>/nmnist_small_events.npz   (or data.train_file / data.test_file)
  x, y (uint8), t (uint32, us), p (0/1): all events concatenated
  offsets (N+1,): sample i is [offsets[i]:offsets[i+1]]
  labels (N,), is_test (N,) bool, sensor_size [34, 34, 2]"""
NMNIST_FIX = ("set data.train_file (and optionally data.test_file) to the npz, or data.root to the folder\n"
              f"that holds nmnist_small_events.npz (format: {DATA_DOC} in the repository)")


def default_nmnist_file(root: Path | None, train_file: Path | None) -> Path:
    """data.train_file, else ``<root>/nmnist_small_events.npz``; DataError when neither exists."""
    path = train_file if train_file is not None else (None if root is None else root / "nmnist_small_events.npz")
    if path is None or not path.is_file():
        raise layout_error("nmnist", path if path is not None else root, NMNIST_LAYOUT, NMNIST_FIX)
    return path


class NpzEventSource:
    """The train or test rows of an N-MNIST-style npz; event arrays are read on first use."""

    name = "nmnist"

    def __init__(self, path: Path, test: bool):
        self.path = Path(path)
        if not zipfile.is_zipfile(self.path):  # np.load would try pickle next and blame allow_pickle
            raise layout_error("nmnist", self.path, NMNIST_LAYOUT, NMNIST_FIX,
                               problem="not an npz archive (not a zip of .npy arrays): a truncated or corrupt "
                                       "copy? replace the file")
        with np.load(self.path, allow_pickle=False) as z:
            missing = [k for k in REQUIRED if k not in z.files]
            if missing:
                raise DataError(f"{self.path}: missing key '{missing[0]}' (keys present: {sorted(z.files)});\n"
                                f"expected layout:\n{NMNIST_LAYOUT}")
            for key in ("offsets", "labels", "is_test", "sensor_size"):
                if z[key].dtype.kind not in REQUIRED[key]:
                    raise DataError(f"{self.path}: key '{key}' has dtype {z[key].dtype}; expected layout:\n{NMNIST_LAYOUT}")
            offsets, labels, is_test = z["offsets"].astype(np.int64), z["labels"].astype(np.int64), z["is_test"]
            sensor = tuple(int(v) for v in z["sensor_size"])
            classes = [str(c) for c in z["classes"]] if "classes" in z.files else [str(i) for i in range(10)]
        if len(offsets) != len(labels) + 1 or is_test.shape != labels.shape or len(sensor) != 3:
            raise DataError(f"{self.path}: key 'offsets' must have len(labels)+1 entries and 'is_test' one per label; "
                            f"got offsets {offsets.shape}, labels {labels.shape}, is_test {is_test.shape}")
        self.sensor_size = sensor
        self.class_names = classes
        self.rows = np.flatnonzero(is_test == bool(test))
        self._offsets = offsets
        self.targets = [int(labels[r]) for r in self.rows]
        h = hashlib.sha256()
        for arr in (offsets, labels, is_test.astype(np.uint8), np.asarray(sensor)):
            h.update(np.ascontiguousarray(arr).tobytes())
        self.fingerprint = f"npz-{h.hexdigest()[:16]}-{self.path.stat().st_size}"
        self._events: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def _arrays(self) -> dict[str, np.ndarray]:
        if self._events is None:
            with np.load(self.path, allow_pickle=False) as z:
                self._events = {k: z[k] for k in ("x", "y", "t", "p")}
            n = len(self._events["t"])
            if any(len(a) != n for a in self._events.values()) or self._offsets[-1] > n:
                raise DataError(f"{self.path}: keys 'x', 'y', 't', 'p' must have equal length >= offsets[-1]")
        return self._events

    def events(self, i: int) -> np.ndarray:
        """Structured events (x, y, t, p) of the i-th sample of this split, as tonic expects."""
        a, r = self._arrays(), self.rows[i]
        s = slice(int(self._offsets[r]), int(self._offsets[r + 1]))
        return np.rec.fromarrays([a["x"][s], a["y"][s], a["t"][s], a["p"][s]], names="x,y,t,p")

    def sample_id(self, i: int) -> str:
        return f"{int(self.rows[i]):07d}"
