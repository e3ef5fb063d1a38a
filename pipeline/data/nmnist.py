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
    """The train or test rows of an N-MNIST-style npz, read and checked when built (bad data fails here,
    before a frame is computed or cached); ``fingerprint`` hashes the content."""

    name = "nmnist"

    def __init__(self, path: Path, test: bool):
        self.path = Path(path)
        if not zipfile.is_zipfile(self.path):  # np.load would try pickle next and blame allow_pickle
            raise layout_error("nmnist", self.path, NMNIST_LAYOUT, NMNIST_FIX,
                               problem="not an npz archive (not a zip of .npy arrays): a truncated or corrupt "
                                       "copy? replace the file")
        try:
            with np.load(self.path, allow_pickle=False) as z:
                missing = [k for k in REQUIRED if k not in z.files]
                if missing:
                    raise self._bad(f"missing key '{missing[0]}' (keys present: {sorted(z.files)})")
                arrays = {k: z[k] for k in REQUIRED}
                classes = [str(c) for c in z["classes"]] if "classes" in z.files else [str(i) for i in range(10)]
        except DataError:
            raise
        except Exception as exc:  # damaged members, object arrays: name the file, not numpy's option
            raise self._bad(f"an array could not be read ({type(exc).__name__}): a truncated or corrupt copy? "
                            f"replace the file") from exc
        self._check(arrays, classes, test)
        offsets, labels, is_test = (arrays[k].astype(np.int64) if k != "is_test" else arrays[k]
                                    for k in ("offsets", "labels", "is_test"))
        self.sensor_size = tuple(int(v) for v in arrays["sensor_size"])
        self.class_names = classes
        self.rows = np.flatnonzero(is_test == bool(test))
        self._offsets = offsets
        self.targets = [int(labels[r]) for r in self.rows]
        self._events: dict[str, np.ndarray] = {k: arrays[k] for k in ("x", "y", "t", "p")}
        # the frame cache's key: the content itself (every array, its dtype and shape), not the file's
        # size or name, so two files of equal size never share frames and an edited file gets new ones
        h = hashlib.sha256()
        for key in sorted(REQUIRED):
            arr = np.ascontiguousarray(arrays[key])
            h.update(f"{key}:{arr.dtype.str}:{arr.shape}|".encode())
            h.update(arr.tobytes())
        self.fingerprint = f"npz-{h.hexdigest()[:24]}"

    def _bad(self, problem: str) -> DataError:
        return layout_error("nmnist", self.path, NMNIST_LAYOUT, NMNIST_FIX, problem=problem)

    def _check(self, a: dict[str, np.ndarray], classes: list[str], test: bool) -> None:
        """Every check the frames rely on, before any frame is computed or cached: dtypes (integer
        timestamps and coordinates), lengths, offsets, at least one sample in this split, labels among
        the classes, coordinates inside the sensor, polarities 0/1."""
        for key, kinds in REQUIRED.items():
            if a[key].dtype.kind not in kinds or a[key].ndim != 1:
                want = {"iu": "an integer", "iub": "an integer or boolean", "b": "a boolean"}[kinds]
                raise self._bad(f"key '{key}' has dtype {a[key].dtype} shape {a[key].shape}; expected {want} "
                                f"1-D array" + (" (timestamps in microseconds)" if key == "t" else ""))
        n, labels, offsets = len(a["t"]), a["labels"], a["offsets"].astype(np.int64)
        if any(len(a[k]) != n for k in ("x", "y", "p")):
            raise self._bad(f"keys 'x', 'y', 't', 'p' must have equal length; got "
                            f"{[len(a[k]) for k in ('x', 'y', 't', 'p')]}")
        if len(offsets) != len(labels) + 1 or a["is_test"].shape != labels.shape or len(a["sensor_size"]) != 3:
            raise self._bad(f"key 'offsets' must have len(labels)+1 entries, 'is_test' one per label and "
                            f"'sensor_size' 3; got offsets {offsets.shape}, labels {labels.shape}, is_test "
                            f"{a['is_test'].shape}, sensor_size {a['sensor_size'].shape}")
        if len(labels) == 0:
            raise self._bad("it holds no samples (labels is empty)")
        if offsets[0] != 0 or (np.diff(offsets) < 0).any() or offsets[-1] > n:
            raise self._bad(f"key 'offsets' must start at 0, never decrease and end at most at the {n} events; "
                            f"got {offsets[0]} .. {offsets[-1]}")
        split = "test" if test else "train"
        if not (a["is_test"] == bool(test)).any():
            raise self._bad(f"no {split} rows (is_test is {'never' if test else 'always'} true): the {split} split "
                            f"is empty; set is_test per sample, or pass the {split} rows in data.{split}_file")
        if labels.min() < 0 or labels.max() >= len(classes):
            raise self._bad(f"key 'labels' holds values in [{labels.min()}, {labels.max()}]; expected "
                            f"[0, {len(classes) - 1}] ({len(classes)} classes)")
        width, height, polarities = (int(v) for v in a["sensor_size"])
        for key, side in (("x", width), ("y", height), ("p", polarities)):
            v = a[key].astype(np.int64)
            if n and (v.min() < 0 or v.max() >= side):
                raise self._bad(f"key '{key}' holds values in [{v.min()}, {v.max()}], outside the sensor "
                                f"(sensor_size {[width, height, polarities]}: expected [0, {side - 1}])")
        if n and a["t"].astype(np.int64).min() < 0:
            raise self._bad("key 't' holds negative timestamps; expected microseconds >= 0")

    def __len__(self) -> int:
        return len(self.rows)

    def _arrays(self) -> dict[str, np.ndarray]:
        return self._events

    def events(self, i: int) -> np.ndarray:
        """Structured events (x, y, t, p) of the i-th sample of this split, as tonic expects."""
        a, r = self._arrays(), self.rows[i]
        s = slice(int(self._offsets[r]), int(self._offsets[r + 1]))
        return np.rec.fromarrays([a["x"][s], a["y"][s], a["t"][s], a["p"][s]], names="x,y,t,p")

    def sample_id(self, i: int) -> str:
        return f"{int(self.rows[i]):07d}"
