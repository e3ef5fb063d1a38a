"""Part ``realdata`` of bench/gpu_check.sh and bench/gpu_data.py (issue 22, item 4): where the CIFAR-10 files are
looked for, what each train-stage run is told, how the all-STAA - plain difference is formed, and the cut test
file that travels to the GPU machine. The GPU runs themselves need a GPU; their CPU smoke runs in the script."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from tests.conftest import REPO


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


parts = _load("gpu_check_parts")
gpu_data = _load("gpu_data")


def _fake_cifar(path: Path, n: int) -> None:
    np.savez(path, images=np.arange(n * 3072, dtype=np.int64).astype(np.uint8).reshape(n, 32, 32, 3),
             labels=np.arange(n) % 10, index_in_class=np.arange(n) // 10, from_jpeg=np.zeros(n, bool),
             classes=np.array([f"c{i}" for i in range(10)]))


def test_find_realdata_takes_the_first_folder_holding_both_files(tmp_path):
    only_test, both, later = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (only_test, both, later):
        d.mkdir()
    _fake_cifar(only_test / "cifar10_test.npz", 10)
    for d in (both, later):
        _fake_cifar(d / "cifar10_test.npz", 10)
        _fake_cifar(d / "cifar10_train_subset.npz", 10)
    assert parts.find_realdata([only_test, both, later]) == both


def test_find_realdata_skips_naming_every_folder_and_the_fix(tmp_path):
    with pytest.raises(parts.Skip) as err:
        parts.find_realdata([tmp_path / "x", tmp_path / "y"])
    msg = str(err.value)
    assert str(tmp_path / "x") in msg and str(tmp_path / "y") in msg
    assert "bench/gpu_data.py" in msg and "GPU_CHECK_DATA" in msg


def test_the_env_folder_is_looked_at_first(monkeypatch, tmp_path):
    monkeypatch.setenv("GPU_CHECK_DATA", str(tmp_path))
    assert parts.realdata_dirs()[0] == tmp_path
    assert REPO / "bench" / "data" in parts.realdata_dirs()


@pytest.mark.parametrize("gpu", [True, False])
def test_realdata_sets_are_valid_config_and_differ_only_by_variant(tmp_path, gpu):
    cfgs = {v: load_config(REPO / "configs" / "cifar10_small.yaml",
                           parts.realdata_sets(tmp_path, tmp_path / v, v, 1, gpu, 7)) for v in ("plain", "all")}
    plain, staa = cfgs["plain"], cfgs["all"]
    assert plain["model"]["neuron"]["kind"] == "lif" and not any(plain["model"]["staa"][p] for p in parts_of_staa())
    assert staa["model"]["neuron"]["kind"] == "alif" and all(staa["model"]["staa"][p] for p in parts_of_staa())
    assert plain["data"] == staa["data"] and plain["train"] == staa["train"] and plain["seed"] == staa["seed"] == 1
    assert plain["data"]["root"] == str(tmp_path)
    if gpu:
        assert (plain["device"], plain["model"]["width"], plain["data"]["batch_size"], plain["train"]["epochs"],
                plain["data"]["limit_test"]) == ("cuda", 1.0, 128, 7, 2000)
    else:
        assert plain["device"] == "cpu" and plain["train"]["max_batches"] == 2 and plain["data"]["limit_train"] == 64


def parts_of_staa() -> tuple[str, ...]:
    return ("pe", "gc", "sa", "tsrd")


def test_realdata_summary_pairs_by_seed():
    s = parts.realdata_summary({("plain", 0): 50.0, ("all", 0): 53.5, ("plain", 1): 52.0, ("all", 1): 51.0,
                                ("plain", 2): 40.0})
    assert s["all_minus_plain_by_seed"] == {0: 3.5, 1: -1.0}  # seed 2 has no all-STAA run: not paired
    assert s["all_minus_plain_mean"] == 1.25
    assert s["mean_top1"] == {"plain": round((50 + 52 + 40) / 3, 2), "all": 52.25}
    assert parts.realdata_summary({("plain", 0): 50.0})["all_minus_plain_mean"] is None


def test_gpu_data_cuts_the_test_file_to_its_first_rows(tmp_path):
    src, dst = tmp_path / "cifar10_test.npz", tmp_path / "cut.npz"
    _fake_cifar(src, 40)
    assert gpu_data.cut_test(src, dst, 20) == 20
    a, b = np.load(src), np.load(dst)
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        assert np.array_equal(b[k], a[k] if k == "classes" else a[k][:20]), k
    assert np.bincount(b["labels"]).tolist() == [2] * 10  # the interleaved layout: a prefix is class-balanced


def test_gpu_data_refuses_a_file_of_another_layout(tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros(3))
    with pytest.raises(SystemExit, match="lacks images"):
        gpu_data.cut_test(tmp_path / "bad.npz", tmp_path / "out.npz", 2)
