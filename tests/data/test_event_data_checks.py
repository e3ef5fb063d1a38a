"""Bad event data fails before any frame is computed or cached, and the frame cache is keyed by content
(issue 20, cases 2 and 3: a file with float timestamps trained on another file's cached frames; events
outside the sensor trained on blank frames; empty splits and bad labels ended in tracebacks)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import DataError, build_datasets, data_bundle
from pipeline.data.static import load_cifar_npz
from tests.conftest import REPO


def _nmnist(path: Path, n: int = 12, events: int = 30, seed: int = 0, **override) -> Path:
    """A small N-MNIST-layout npz: ``n`` samples of ``events`` events each, every third one a test row."""
    rng = np.random.default_rng(seed)
    arrays = {
        "x": rng.integers(0, 34, n * events).astype(np.uint8), "y": rng.integers(0, 34, n * events).astype(np.uint8),
        "t": np.tile(np.arange(events, dtype=np.uint32) * 1000, n), "p": rng.integers(0, 2, n * events).astype(np.uint8),
        "offsets": np.arange(n + 1, dtype=np.int64) * events, "labels": np.arange(n, dtype=np.int64) % 10,
        "is_test": np.arange(n) % 3 == 0, "sensor_size": np.array([34, 34, 2]),
    }
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def _build(train_file: Path, cache: Path, **data):
    return build_datasets({"dataset": "nmnist", "train_file": str(train_file), "cache_dir": str(cache),
                           "val_fraction": 0.25, **data}, T=4)


@pytest.mark.parametrize("override, problem", [
    ({"t": np.tile(np.arange(30, dtype=np.float64), 12)}, "key 't' has dtype float64"),
    ({"x": np.full(360, 40, np.uint8)}, "key 'x' holds values in [40, 40], outside the sensor"),
    ({"y": np.full(360, 34, np.uint8)}, "key 'y' holds values in [34, 34], outside the sensor"),
    ({"p": np.full(360, 2, np.uint8)}, "key 'p' holds values in [2, 2], outside the sensor"),
    ({"labels": np.arange(12, dtype=np.int64)}, "key 'labels' holds values in [0, 11]; expected [0, 9]"),
    ({"labels": np.zeros(0, np.int64), "offsets": np.zeros(1, np.int64), "is_test": np.zeros(0, bool)},
     "it holds no samples"),
    ({"is_test": np.ones(12, bool)}, "no train rows"),
    ({"offsets": np.arange(13, dtype=np.int64)[::-1] * 30}, "key 'offsets' must start at 0, never decrease"),
    ({"t": np.tile(np.arange(30, dtype=np.int64) - 5, 12)}, "key 't' holds negative timestamps"),
])
def test_bad_event_data_is_one_data_error_and_leaves_nothing(tmp_path, override, problem):
    data = tmp_path / "data"
    data.mkdir()
    bad = _nmnist(data / "bad.npz", **override)
    with pytest.raises(DataError) as e:
        _build(bad, tmp_path / "cache")
    assert problem in str(e.value) and str(bad) in str(e.value), str(e.value)
    assert not (tmp_path / "cache").exists() and sorted(p.name for p in data.iterdir()) == ["bad.npz"]


def test_two_files_of_equal_size_never_share_frames(tmp_path):
    a = _nmnist(tmp_path / "a.npz", seed=1)
    b = _nmnist(tmp_path / "b.npz", seed=2)
    assert a.stat().st_size == b.stat().st_size
    ba, bb = _build(a, tmp_path / "cache"), _build(b, tmp_path / "cache")
    assert ba.extras["cache_dir"] != bb.extras["cache_dir"]
    xa, xb = ba.test[0][0], bb.test[0][0]
    assert not np.array_equal(xa.numpy(), xb.numpy())  # b's own events, not a's cached frames
    b.write_bytes(a.read_bytes())  # same content under another name: the same frames
    assert _build(b, tmp_path / "cache").extras["cache_dir"] == ba.extras["cache_dir"]


def test_a_damaged_cached_frame_is_computed_again(tmp_path):
    bundle = _build(_nmnist(tmp_path / "a.npz"), tmp_path / "cache")
    first = bundle.test[0][0].clone()
    ds = bundle.test.dataset
    path = ds.cache.path(ds.source.sample_id(0))
    np.save(path, np.zeros((2, 2), np.float32))  # wrong shape: another encoding, or a damaged file
    assert np.array_equal(bundle.test[0][0].numpy(), first.numpy())
    assert np.load(path).shape == (4, 2, 34, 34)


def test_the_frame_cache_lives_under_the_artifacts_folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    f = _nmnist(data / "nmnist_small_events.npz")
    cfg = {"data": {"dataset": "nmnist", "root": str(data), "val_fraction": 0.25},
           "model": {"T": 4}, "seed": 0, "artifacts_dir": str(tmp_path / "artifacts")}
    bundle = data_bundle(cfg)
    bundle.test[0]
    assert Path(bundle.extras["cache_dir"]).parent == tmp_path / "artifacts" / "frames_cache"
    assert sorted(p.name for p in data.iterdir()) == [f.name]  # nothing written into the data folder


def test_bad_event_data_through_the_cli_exit_2_nothing_left(tmp_path):
    bad = _nmnist(tmp_path / "bad.npz", t=np.tile(np.arange(30, dtype=np.float32), 12))
    art = tmp_path / "artifacts"
    res = subprocess.run([sys.executable, "-m", "pipeline", "stage", "train", "--config", "configs/nmnist.yaml",
                          "--set", f"data.train_file={bad}", "--set", f"artifacts_dir={art}", "--set", "device=cpu"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and res.stderr.count("data error:") == 1, res.stderr
    assert "key 't' has dtype float32" in res.stderr
    assert not art.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]


def test_cifar_images_of_another_size_are_refused(tmp_path):
    path = tmp_path / "train.npz"
    np.savez(path, images=np.zeros((8, 28, 28, 3), np.uint8), labels=np.zeros(8, np.int64))
    with pytest.raises(DataError, match=r"28x28 images; CIFAR images are 32x32"):
        load_cifar_npz(path, 10, "cifar10")
