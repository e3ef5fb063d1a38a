"""Shared fixtures: the offline data folder (skip when absent) and tiny run configs."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STAA_SHARED_DATA", REPO.parent / "shared" / "data"))

# Tiny test models run fastest on one thread (two spin-wait when the 2 cores are shared).
torch.set_num_threads(1)


def shared_data_dir() -> Path:
    return SHARED_DATA


def shared_file(name: str) -> Path:
    """A file of ../shared/data, or skip the test saying why."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (the offline real-data folder; set STAA_SHARED_DATA to use another)")
    return path


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test on any attempt to open a network connection."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# A digits run small enough for a test: width 1/8 ResNet-19 at T=2, a few batches per epoch.
TINY = {
    "data": {"dataset": "digits", "image_size": 16, "batch_size": 32, "eval_batch_size": 128,
             "limit_train": 256, "limit_test": 128, "val_fraction": 0.25,
             "augment": {"crop_padding": 1, "flip": False, "autoaugment": False}},
    "model": {"arch": "resnet19", "width": 0.125, "T": 2},
    "train": {"epochs": 2, "optimizer": "adamw", "lr": 0.005, "max_batches": 3},
    "reduce_t": {"steps": [1], "epochs": 1, "lr": 0.001, "max_batches": 2},
    "qat": {"epochs": 1, "calibration_samples": 64, "max_batches": 2},
    "unroll": {"parity_images": 32},
    "export": {"parity_images": 32},
    "validate": {"iterations": 3, "warmup": 1, "batch_sizes": [1, 8], "limit_test": 64},
}


@pytest.fixture
def write_config(tmp_path):
    """Write a config (TINY merged with ``overrides``) to tmp_path; artifacts go under tmp_path too."""
    from pipeline.config import deep_merge

    def make(overrides: dict | None = None, name: str = "tiny") -> Path:
        cfg = deep_merge(TINY, overrides or {})
        cfg.setdefault("name", name)
        cfg["artifacts_dir"] = str(tmp_path / "artifacts")
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return make
