"""Event data: tonic layout checks (no download ever), generated recordings in tonic's on-disk
formats (DVS128 Gesture .npy, CIFAR10-DVS .aedat4), real N-MNIST events, the frame cache."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import shared_file
from pipeline.data import DataError, build_datasets, events_to_frames
from pipeline.data.frames import rebin
from pipeline.data.transforms import EventFrameAugment, shift_frames


@pytest.fixture
def nmnist_file() -> Path:
    return shared_file("nmnist_small_events.npz")


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# ---------------------------------------------------------------- layout errors, no download
def test_gesture_empty_root_shows_layout_and_never_downloads(tmp_path, no_network):
    with pytest.raises(DataError) as err:
        build_datasets({"dataset": "dvsgesture", "root": str(tmp_path)}, T=4)
    msg = str(err.value)
    for part in (str(tmp_path), "DVSGesture/", "ibmGestureTrain/", "user01_fluorescent/", "0.npy",
                 "ibmGestureTrain.tar.gz", "figshare", "data.root"):
        assert part in msg, part
    assert list(tmp_path.iterdir()) == []  # no folder created, no archive fetched


def test_cifar10dvs_empty_root_shows_layout_and_never_downloads(tmp_path, no_network):
    with pytest.raises(DataError) as err:
        build_datasets({"dataset": "cifar10dvs", "root": str(tmp_path)}, T=4)
    msg = str(err.value)
    for part in (str(tmp_path), "CIFAR10DVS/", "airplane/", ".aedat4", "CIFAR10DVS.zip", "data.root"):
        assert part in msg, part
    assert list(tmp_path.iterdir()) == []


def test_tonic_partial_layouts_are_explained(tmp_path, no_network):
    (tmp_path / "DVSGesture").mkdir()
    (tmp_path / "DVSGesture" / "ibmGestureTrain.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match="extract it"):
        build_datasets({"dataset": "dvsgesture", "root": str(tmp_path)}, T=4)
    c = tmp_path / "CIFAR10DVS"
    (c / "airplane").mkdir(parents=True)
    (c / "airplane" / "a.aedat4").write_bytes(b"")
    (c / "bird.zip").write_bytes(b"")
    with pytest.raises(DataError, match="automobile.*extract them"):
        build_datasets({"dataset": "cifar10dvs", "root": str(tmp_path)}, T=4)
    assert len(all_files(tmp_path)) == 3


def test_tonic_subclasses_refuse_to_download(tmp_path, no_network):
    from pipeline.data.tonic_sources import CIFAR10DVS, DVSGesture

    for ds in (DVSGesture(str(tmp_path), train=True), CIFAR10DVS(str(tmp_path))):
        assert len(ds) == 0
        with pytest.raises(DataError, match="refusing to download"):
            ds.download()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- DVS128 Gesture, generated .npy
def write_gesture(root: Path, n_events: int = 300) -> dict[Path, int]:
    """tonic's preprocessed layout: DVSGesture/ibmGesture{Train,Test}/userNN_<light>/<class>.npy, (N,4) x,y,p,t[ms]."""
    rng = np.random.default_rng(0)
    counts = {}
    for split, users in (("ibmGestureTrain", ["user01_fluorescent", "user02_led"]), ("ibmGestureTest", ["user24_natural"])):
        for user in users:
            d = root / "DVSGesture" / split / user
            d.mkdir(parents=True)
            for c in range(11):
                n = n_events + c
                ev = np.stack([rng.integers(0, 128, n), rng.integers(0, 128, n), rng.integers(0, 2, n),
                               np.sort(rng.integers(0, 1500, n))], axis=1).astype(np.int64)
                np.save(d / f"{c}.npy", ev)
                counts[d / f"{c}.npy"] = n
    return counts


def test_gesture_generated_frames_and_cache(tmp_path, no_network):
    counts = write_gesture(tmp_path / "data")
    cfg = {"dataset": "dvsgesture", "root": str(tmp_path / "data"), "image_size": 32,
           "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.1}
    b = build_datasets(cfg, T=4)
    assert (b.is_event, b.num_classes, b.in_channels, b.image_size, b.frames) == (True, 11, 2, (32, 32), 4)
    assert b.mean == (0.0, 0.0) and b.std == (1.0, 1.0) and b.class_names[0] == "Hand clapping"
    assert len(b.test) == 11 and len(b.train) + len(b.val) == 22 and len(b.val) == 2
    assert "flip=False" in b.extras["augment"]  # left/right-hand gestures: never flipped
    src = b.test.dataset.source
    for i in range(len(b.test)):
        x, y = b.test[i]
        assert x.shape == (4, 2, 32, 32) and x.dtype == torch.float32 and float(x.min()) >= 0
        assert y == int(Path(src.path(i)).stem)  # label = file name
        counts_i = b.test.dataset.counts(b.test.indices[i])
        n = counts[tmp_path / "data" / "DVSGesture" / src.path(i)]
        assert float(np.asarray(counts_i, np.float64).sum()) == n  # every event counted once (4x4 binning)
        assert torch.allclose(x, torch.log1p(torch.from_numpy(np.asarray(counts_i, np.float32))))
    cache = Path(b.extras["cache_dir"])
    assert cache.parent == tmp_path / "cache" and "T4-32x32" in cache.name
    assert len(list(cache.glob("*.npy"))) == 11
    x_train, _ = b.train[0]
    assert x_train.shape == (4, 2, 32, 32)


# ---------------------------------------------------------------- CIFAR10-DVS, generated .aedat4
def write_aedat4(path: Path, t: np.ndarray, x: np.ndarray, y: np.ndarray, on: np.ndarray) -> None:
    """An uncompressed AEDAT 4 file with one EVTS stream (the format tonic reads through aedat)."""
    flatbuffers = pytest.importorskip("flatbuffers")
    desc = ('<dv version="2.0"><node name="outInfo"><node name="0">'
            '<attr key="typeIdentifier" type="string">EVTS</attr><node name="info">'
            '<attr key="sizeX" type="int">128</attr><attr key="sizeY" type="int">128</attr>'
            '</node></node></node></dv>')
    b = flatbuffers.Builder(1024)
    s = b.CreateString(desc)
    b.StartObject(3)  # IOHeader: compression (0 = none), file_data_position (-1), description
    b.PrependUOffsetTRelativeSlot(2, s, 0)
    b.PrependInt64Slot(1, -1, -1)
    b.PrependInt32Slot(0, 0, 0)
    b.FinishSizePrefixed(b.EndObject(), b"IOHE")
    header = bytes(b.Output())
    ev = np.zeros(len(t), np.dtype({"names": ["t", "x", "y", "on"], "formats": ["<i8", "<i2", "<i2", "u1"],
                                    "offsets": [0, 8, 10, 12], "itemsize": 16}))
    ev["t"], ev["x"], ev["y"], ev["on"] = t, x, y, on
    payload = ev.tobytes()
    b = flatbuffers.Builder(len(payload) + 64)
    b.StartVector(16, len(t), 8)  # EventPacket.elements: [Event] structs of 16 bytes
    b.head -= len(payload)
    b.Bytes[b.head:b.head + len(payload)] = payload
    vec = b.EndVector()
    b.StartObject(1)
    b.PrependUOffsetTRelativeSlot(0, vec, 0)
    b.FinishSizePrefixed(b.EndObject(), b"EVTS")
    packet = bytes(b.Output())
    path.write_bytes(b"#!AER-DAT4.0\r\n" + header + (0).to_bytes(4, "little") + len(packet).to_bytes(4, "little") + packet)


def test_cifar10dvs_generated_aedat4(tmp_path, no_network):
    from pipeline.data.tonic_sources import C10DVS

    rng = np.random.default_rng(1)
    for name in C10DVS.classes:
        d = tmp_path / "data" / "CIFAR10DVS" / name
        d.mkdir(parents=True)
        for k in range(3):
            n = 200
            write_aedat4(d / f"cifar10_{name}_{k}.aedat4", np.sort(rng.integers(0, 10**6, n)) + 10**6,
                         rng.integers(0, 128, n), rng.integers(0, 128, n), rng.integers(0, 2, n))
    cfg = {"dataset": "cifar10dvs", "root": str(tmp_path / "data"), "image_size": 64,
           "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.1}
    b = build_datasets(cfg, T=3)
    assert (b.num_classes, b.in_channels, b.image_size, b.class_names[0]) == (10, 2, (64, 64), "airplane")
    assert len(b.test) == 10 and sorted(b.test.targets) == list(range(10))  # fixed 90/10 per class
    assert len(b.train) + len(b.val) == 20
    again = build_datasets(cfg, T=3, seed=5)
    assert [again.test.dataset.source.path(i) for i in again.test.indices] == \
        [b.test.dataset.source.path(i) for i in b.test.indices]
    x, y = b.test[0]
    assert x.shape == (3, 2, 64, 64) and y == 0 and float(x.sum()) > 0
    counts = np.asarray(b.test.dataset.counts(b.test.indices[0]), np.float64)
    assert counts.sum() == 200  # 2x2 binning keeps every event
    assert "flip=True" in b.extras["augment"]


# ---------------------------------------------------------------- N-MNIST (real events)
@pytest.mark.shared_data
def test_nmnist_real_frames_and_cache(tmp_path, nmnist_file, no_network):
    cfg = {"dataset": "nmnist", "train_file": str(nmnist_file), "cache_dir": str(tmp_path), "limit_test": 20}
    b = build_datasets(cfg, T=8)
    assert (b.num_classes, b.in_channels, b.image_size, b.is_event) == (10, 2, (34, 34), True)
    assert len(b.test) == 20 and len(b.train) + len(b.val) == 1000 and len(b.val) == 100
    with np.load(nmnist_file) as z:
        labels, is_test, offsets = z["labels"], z["is_test"], z["offsets"]
    test_rows = np.flatnonzero(is_test)
    src = b.test.dataset.source
    for i in range(3):
        x, y = b.test[i]
        assert x.shape == (8, 2, 34, 34) and x.dtype == torch.float32 and float(x.sum()) > 0
        assert y == int(labels[test_rows[i]])
        n_events = int(offsets[test_rows[i] + 1] - offsets[test_rows[i]])
        raw = events_to_frames(src.events(i), src.sensor_size, 8)
        assert raw.shape == (8, 2, 34, 34) and int(raw.sum()) == n_events  # conservation
        assert (raw.sum(axis=(1, 2, 3)) > 0).sum() >= 6  # events spread over the time bins
        cached = b.test.dataset.cache.path(src.sample_id(i))
        assert cached.is_file() and np.array_equal(np.load(cached).astype(np.int64), raw)
    # second build: cache hit, files untouched
    path = b.test.dataset.cache.path(src.sample_id(0))
    mtime = path.stat().st_mtime_ns
    b2 = build_datasets(cfg, T=8)
    assert torch.equal(b2.test[0][0], b.test[0][0]) and path.stat().st_mtime_ns == mtime
    # another T: another cache folder
    b3 = build_datasets(cfg, T=4)
    assert b3.test[0][0].shape == (4, 2, 34, 34) and b3.extras["cache_dir"] != b.extras["cache_dir"]
    # resized to 17x17: counts binned 2x2, still all events
    b4 = build_datasets({**cfg, "image_size": 17}, T=8)
    assert b4.test[0][0].shape == (8, 2, 17, 17)
    assert float(np.asarray(b4.test.dataset.counts(0), np.float64).sum()) == int(offsets[test_rows[0] + 1] - offsets[test_rows[0]])


def test_nmnist_missing_and_corrupt(tmp_path, no_network):
    with pytest.raises(DataError) as err:
        build_datasets({"dataset": "nmnist", "root": str(tmp_path)}, T=4)
    assert "nmnist_small_events.npz" in str(err.value) and "data.train_file" in str(err.value)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros(3, np.uint8), y=np.zeros(3, np.uint8), t=np.arange(3, dtype=np.uint32),
             p=np.zeros(3, np.uint8), labels=np.zeros(1, np.int64), is_test=np.zeros(1, bool),
             sensor_size=np.array([34, 34, 2]))
    with pytest.raises(DataError, match="'offsets'"):
        build_datasets({"dataset": "nmnist", "train_file": str(bad), "cache_dir": str(tmp_path / "c")}, T=4)


# ---------------------------------------------------------------- frame function and augmentation
def _events(t, x=None, y=None, p=None):
    n = len(t)
    x = np.arange(n) % 34 if x is None else x
    y = np.zeros(n, int) if y is None else y
    p = np.arange(n) % 2 if p is None else p
    return np.rec.fromarrays([np.asarray(x, np.uint8), np.asarray(y, np.uint8), np.asarray(t, np.uint32),
                              np.asarray(p, np.uint8)], names="x,y,t,p")


def test_events_to_frames_keeps_every_event_and_time_order():
    ev = _events([0, 0, 5, 9, 9, 9])  # several events at the last timestamp
    f = events_to_frames(ev, (34, 34, 2), 3)
    assert f.shape == (3, 2, 34, 34) and f.sum() == 6
    assert f.sum(axis=(1, 2, 3)).tolist() == [2, 1, 3]  # window (9-0)//3+1 = 4: [0,4) [4,8) [8,12)
    short = events_to_frames(_events([7, 7, 8]), (34, 34, 2), 5)  # shorter than T ticks
    assert short.sum() == 3
    empty = events_to_frames(_events([]), (34, 34, 2), 4)
    assert empty.shape == (4, 2, 34, 34) and empty.sum() == 0
    off = events_to_frames(_events([1, 2, 3], x=[0, 40, 1]), (34, 34, 2), 2)  # off-sensor event dropped
    assert off.sum() == 2


def test_rebin_and_frame_augmentation():
    f = torch.arange(2 * 2 * 8 * 8, dtype=torch.float32).reshape(2, 2, 8, 8)
    assert torch.isclose(rebin(f, (4, 4)).sum(), f.sum())
    s = shift_frames(f, 2, -3)
    assert torch.equal(s[..., 2:, :5], f[..., :6, 3:]) and s[..., :2, :].abs().sum() == 0
    torch.manual_seed(0)
    aug = EventFrameAugment(flip=False, translate=True)
    outs = [aug(f) for _ in range(10)]
    assert all(o.shape == f.shape for o in outs) and any(not torch.equal(o, f) for o in outs)
    # the same shift for every time step
    o = outs[next(i for i, o in enumerate(outs) if not torch.equal(o, f))]
    assert any(torch.equal(o, shift_frames(f, dy, dx)) for dy in range(-1, 2) for dx in range(-1, 2))
