"""Static-image data: the embedded digits default, CIFAR npz / torchvision layouts, ImageFolder,
the validation split and the loader helper. Real data only; shared files skip when absent."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import shared_data_dir, shared_file  # noqa: F401
from pipeline.data import DataBundle, DataError, build_datasets, make_loader


DIGITS = {"dataset": "digits", "image_size": 16, "val_fraction": 0.1, "augment": {"crop_padding": 1}}


# ---------------------------------------------------------------- digits
def test_digits_bundle_shapes_and_stats(no_network):
    b = build_datasets(DIGITS, T=4)
    assert isinstance(b, DataBundle)
    assert (b.name, b.num_classes, b.in_channels, b.image_size, b.is_event) == ("digits", 10, 1, (16, 16), False)
    assert b.class_names == [str(i) for i in range(10)]
    assert len(b.train) + len(b.val) == 1437 and len(b.test) == 360 and len(b.val) == 144
    x, y = b.test[0]
    assert x.dtype == torch.float32 and x.shape == (1, 16, 16) and isinstance(y, int)
    xs = torch.stack([b.test[i][0] for i in range(len(b.test))])
    assert abs(float(xs.mean())) < 0.1 and 0.85 < float(xs.std()) < 1.15  # normalised with train stats
    assert sorted(set(b.test.targets)) == list(range(10))


def test_digits_split_is_deterministic():
    a, b = build_datasets(DIGITS, T=4, seed=3), build_datasets(DIGITS, T=4, seed=3)
    assert torch.equal(a.test[5][0], b.test[5][0]) and a.test.targets == b.test.targets
    assert a.val.indices == b.val.indices and a.mean == b.mean
    c = build_datasets(DIGITS, T=4, seed=4)
    assert c.test.targets == a.test.targets  # the test split ignores the run seed
    assert c.val.indices != a.val.indices


def test_missing_keys_fall_back_to_schema_defaults():
    b = build_datasets({"limit_train": 50, "limit_test": 20}, T=1)
    assert b.name == "digits" and len(b.test) == 20 and len(b.train) + len(b.val) == 50


def test_unknown_dataset_is_a_data_error():
    with pytest.raises(DataError, match="data.dataset"):
        build_datasets({"dataset": "mnist-9000"}, T=4)


# ---------------------------------------------------------------- validation split
def test_val_split_seeded_disjoint_and_uses_eval_transforms():
    b = build_datasets({**DIGITS, "limit_train": 400, "val_fraction": 0.25}, T=4, seed=7)
    train_idx, val_idx = set(b.train.indices), set(b.val.indices)
    assert len(val_idx) == 100 and not (train_idx & val_idx) and train_idx | val_idx == set(range(400))
    assert np.bincount(b.val.targets, minlength=10).min() >= 8  # stratified: every class held out
    again = build_datasets({**DIGITS, "limit_train": 400, "val_fraction": 0.25}, T=4, seed=7)
    assert again.val.indices == b.val.indices
    # eval view: identical on every fetch; train view: augmented (padded random crops differ)
    torch.manual_seed(0)
    assert all(torch.equal(b.val[i][0], b.val[i][0]) for i in range(5))
    fetches = [b.train[0][0] for _ in range(12)]
    assert any(not torch.equal(fetches[0], f) for f in fetches[1:])
    # the same underlying sample through the two views: eval equals the un-augmented tensor
    base_eval, base_train = b.val.dataset, b.train.dataset
    assert base_eval is not base_train and base_eval.images is base_train.images


def test_val_fraction_zero_gives_empty_val():
    b = build_datasets({**DIGITS, "val_fraction": 0.0, "limit_train": 30}, T=4)
    assert len(b.val) == 0 and len(b.train) == 30


# ---------------------------------------------------------------- loader
def test_make_loader_seeded_shuffle_and_drop_last():
    b = build_datasets({**DIGITS, "limit_train": 100, "val_fraction": 0.0}, T=4)
    order = lambda seed: [int(v) for _, y in make_loader(b.train, 32, True, 0, seed) for v in y]  # noqa: E731
    first, second = order(1), order(1)
    assert first == second and len(first) == 96  # drop_last for training
    assert order(2) != first
    ev = make_loader(b.test, 64, train=False, workers=0, seed=0)
    assert not ev.drop_last and sum(len(y) for _, y in ev) == len(b.test)
    assert [int(v) for v in next(iter(ev))[1]] == b.test.targets[:64]  # eval keeps order
    small = make_loader(b.train, 256, train=True, workers=0, seed=0)
    assert not small.drop_last and len(small) == 1  # one partial batch rather than an empty epoch


# ---------------------------------------------------------------- CIFAR npz (real data)
@pytest.mark.shared_data
def test_cifar10_npz_real(no_network):
    shared_file("cifar10_test.npz")
    shared_file("cifar10_train_subset.npz")
    cfg = {"dataset": "cifar10", "root": str(shared_data_dir()), "limit_test": 300, "limit_train": 200,
           "augment": {"autoaugment": True, "cutout": 8}}
    b = build_datasets(cfg, T=4)
    assert (b.num_classes, b.in_channels, b.image_size) == (10, 3, (32, 32))
    assert b.class_names[:2] == ["airplane", "automobile"] and b.mean == (0.4914, 0.4822, 0.4465)
    assert len(b.test) == 300 and np.bincount(b.test.targets).tolist() == [30] * 10  # interleaved prefix
    assert len(b.train) + len(b.val) == 200 and len(b.val) == 20
    xs = torch.stack([b.test[i][0] for i in range(300)])
    assert xs.shape == (300, 3, 32, 32) and xs.dtype == torch.float32
    assert torch.all(xs.mean(dim=(0, 2, 3)).abs() < 0.15)
    assert torch.all((xs.std(dim=(0, 2, 3)) - 1).abs() < 0.15)
    x, y = b.train[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10


@pytest.mark.shared_data
def test_cifar10_npz_explicit_files_and_resize(tmp_path):
    test = shared_file("cifar10_test.npz")
    train = shared_file("cifar10_train_subset.npz")
    cfg = {"dataset": "cifar10", "format": "npz", "train_file": str(train), "test_file": str(test),
           "limit_test": 20, "limit_train": 40, "image_size": 40}
    b = build_datasets(cfg, T=4)
    assert b.image_size == (40, 40) and b.train[0][0].shape == (3, 40, 40) and b.test[0][0].shape == (3, 40, 40)


def _write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_corrupt_npz_names_the_key(tmp_path):
    imgs = np.zeros((20, 32, 32, 3), np.uint8)
    labels = np.arange(20) % 10
    good = _write_npz(tmp_path / "ok.npz", images=imgs, labels=labels)
    base = {"dataset": "cifar10", "format": "npz", "train_file": str(good)}
    cases = {
        "labels": _write_npz(tmp_path / "nolabels.npz", images=imgs),
        "images": _write_npz(tmp_path / "float.npz", images=imgs.astype(np.float32), labels=labels),
        "'labels'": _write_npz(tmp_path / "range.npz", images=imgs, labels=labels + 5),
    }
    for key, bad in cases.items():
        with pytest.raises(DataError, match=key) as err:
            build_datasets({**base, "test_file": str(bad)}, T=4)
        assert str(bad) in str(err.value)
    assert len(build_datasets({**base, "test_file": str(good)}, T=4).test) == 20


def test_npz_format_missing_shows_layout(tmp_path, no_network):
    with pytest.raises(DataError) as err:
        build_datasets({"dataset": "cifar100", "format": "npz", "root": str(tmp_path)}, T=4)
    msg = str(err.value)
    assert str(tmp_path) in msg and "cifar100_test.npz" in msg and "data.train_file" in msg


# ---------------------------------------------------------------- torchvision layout
@pytest.mark.parametrize("name,folder,file", [("cifar10", "cifar-10-batches-py", "data_batch_1"),
                                              ("cifar100", "cifar-100-python", "train")])
def test_torchvision_layout_missing_without_download(tmp_path, no_network, name, folder, file):
    root = tmp_path / "cifar"
    root.mkdir()
    with pytest.raises(DataError) as err:
        build_datasets({"dataset": name, "root": str(root), "format": "auto", "download": False}, T=4)
    msg = str(err.value)
    assert str(root) in msg and folder in msg and file in msg and "data.download: true" in msg
    assert list(root.iterdir()) == []  # nothing created, nothing fetched


def test_torchvision_without_root(no_network):
    with pytest.raises(DataError, match="data.root"):
        build_datasets({"dataset": "cifar10"}, T=4)


# ---------------------------------------------------------------- ImageNet (ImageFolder)
def test_imagenet_missing_shows_layout(tmp_path):
    with pytest.raises(DataError) as err:
        build_datasets({"dataset": "imagenet", "root": str(tmp_path)}, T=4)
    msg = str(err.value)
    assert "train/" in msg and "val/" in msg and "n01440764" in msg and str(tmp_path) in msg


def test_imagenet_imagefolder_small(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n001", "n002"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
    b = build_datasets({"dataset": "imagenet", "root": str(tmp_path), "image_size": 32, "limit_train": 6,
                        "val_fraction": 0.34, "limit_test": 4}, T=4)
    assert b.class_names == ["n001", "n002"] and b.num_classes == 2 and b.image_size == (32, 32)
    assert len(b.train) + len(b.val) == 6 and len(b.val) == 2
    assert sorted(b.test.targets) == [0, 0, 1, 1]  # class-balanced limit over folder order
    assert b.train[0][0].shape == (3, 32, 32) and b.test[0][0].shape == (3, 32, 32)


def test_every_dataset_choice_has_a_builder_and_every_builder_a_choice():
    """A dataset is one builder, one BUILDERS row and one schema choice (docs/extending.md): neither list may
    name a dataset the other lacks."""
    from pipeline.data.build import BUILDERS
    from pipeline.schema import SCHEMA

    assert set(SCHEMA["data"]["dataset"].options) == set(BUILDERS)
