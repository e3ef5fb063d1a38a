"""Event frames computed once and kept on disk, and the dataset that serves them.

Decoding a recording and counting its events costs far more than a training step, so each
sample's count frames are written once as ``<cache>/<key>/<sample_id>.npy``. The folder key
holds everything the frames depend on (dataset, T, image size, sensor size, the encoding
version and the source's fingerprint), so a changed T or size never reads stale frames.
Files are written to a temporary name and renamed, so concurrent loader workers and an
interrupted run never leave a half-written frame behind, and each file is checked when read (a
damaged one is computed again). The source's fingerprint is its content (N-MNIST: a hash of every
array), so two files of equal size never share frames. The cache lives under the artifacts folder
(``data_bundle``), never in the data folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from .frames import events_to_frames, frames_to_input, rebin

# Bump when the event -> frame encoding changes (frames.py), so old caches are not reused.
FRAME_VERSION = "v1"


class EventSource(Protocol):
    """Recordings of one dataset split: events by index, labels and stable per-sample ids."""

    name: str
    sensor_size: tuple[int, int, int]
    targets: list[int]
    fingerprint: str

    def __len__(self) -> int: ...
    def events(self, i: int) -> np.ndarray: ...
    def sample_id(self, i: int) -> str: ...


def default_cache_root(cache_dir: str | Path | None, data_root: Path | None = None) -> Path:
    """``data.cache_dir`` (``data_bundle`` sets it to ``<artifacts_dir>/frames_cache`` when the config
    leaves it unset); else the user cache folder. Never the data folder: it may be shared or read-only,
    and a cache there outlives the artifacts it was made for. ``data_root`` is ignored (kept for callers)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "staa-snn" / "frames"


class FrameCache:
    """One folder of ``.npy`` count frames for one (source, T, size, encoding) combination."""

    def __init__(self, root: Path, source: EventSource, n_frames: int, size: tuple[int, int]):
        self.settings = {
            "dataset": source.name, "T": int(n_frames), "size": [int(size[0]), int(size[1])],
            "sensor_size": [int(v) for v in source.sensor_size], "version": FRAME_VERSION,
            "source": source.fingerprint,
        }
        digest = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:12]
        self.dir = Path(root) / f"{source.name}-T{n_frames}-{size[0]}x{size[1]}-{FRAME_VERSION}-{digest}"
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "settings.json"
        if not meta.exists():
            _atomic_write(meta, lambda f: f.write(json.dumps(self.settings, indent=1).encode()))

    def path(self, sample_id: str) -> Path:
        return self.dir / f"{sample_id}.npy"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``[T, P, H, W]`` of every frame file in this folder."""
        s = self.settings
        return (s["T"], s["sensor_size"][2], s["size"][0], s["size"][1])

    def get(self, sample_id: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached frames of ``sample_id``, checked (shape, dtype, finite, non-negative counts);
        computed and stored on a miss or a file that fails the check."""
        path = self.path(sample_id)
        try:
            stored = np.load(path, allow_pickle=False)
            if (stored.shape == self.shape and stored.dtype in (np.float16, np.float32)
                    and np.isfinite(stored).all() and not (stored < 0).any()):
                return stored
        except (FileNotFoundError, ValueError, EOFError, OSError):
            pass
        frames = np.asarray(compute(), dtype=np.float32)
        half = frames.astype(np.float16)
        stored = half if np.array_equal(half.astype(np.float32), frames) else frames  # exact only
        _atomic_write(path, lambda f: np.save(f, stored, allow_pickle=False))
        return stored


def _atomic_write(path: Path, write: Callable) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class EventFrames(Dataset):
    """Samples of an :class:`EventSource` as ``log1p`` count frames ``[T, P, H, W]`` float32, label int."""

    def __init__(self, source: EventSource, cache: FrameCache, n_frames: int, size: tuple[int, int],
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.source, self.cache, self.n_frames, self.size = source, cache, int(n_frames), tuple(size)
        self.augment = augment
        self.targets = list(source.targets)

    def __len__(self) -> int:
        return len(self.source)

    def counts(self, i: int) -> np.ndarray:
        """Cached count frames of sample ``i`` (rebinned to the image size, no augmentation)."""
        return self.cache.get(
            self.source.sample_id(i),
            lambda: rebin(events_to_frames(self.source.events(i), self.source.sensor_size, self.n_frames),
                          self.size).numpy(),
        )

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(np.asarray(self.counts(i), dtype=np.float32))
        if self.augment is not None:
            x = self.augment(x)
        return frames_to_input(x), self.targets[i]
