"""The artifact store: atomic commits, output hashing, corruption detection and the run lock."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pipeline.artifacts import ArtifactError, Manifest, RunStore
from tests.conftest import REPO


def _commit(store: RunStore, stage: str, key: str, text: str = "weights") -> None:
    part = store.open_partial(stage, key)
    (part / "model.bin").write_text(text)
    store.commit(stage, Manifest(stage=stage, key=key, status="done"))


def test_partial_is_invisible_until_commit(tmp_path):
    store = RunStore(tmp_path, "run")
    part = store.open_partial("train", "k1")
    (part / "model.bin").write_text("half")
    assert store.state("train", "k1") == "missing" and not store.stage_dir("train").exists()
    store.commit("train", Manifest(stage="train", key="k1", status="done"))
    assert store.state("train", "k1") == "done" and not part.exists()
    man = store.manifest("train")
    assert set(man.outputs) == {"model.bin"} and len(man.outputs["model.bin"]) == 64


def test_key_change_and_corruption_make_stale(tmp_path):
    store = RunStore(tmp_path, "run")
    _commit(store, "train", "k1")
    assert store.state("train", "k2") == "stale"
    (store.stage_dir("train") / "model.bin").write_text("tampered")
    assert store.verify("train") == ["model.bin"]
    assert store.state("train", "k1") == "stale"


def test_recommit_replaces_old_outputs(tmp_path):
    store = RunStore(tmp_path, "run")
    _commit(store, "train", "k1", "old")
    _commit(store, "train", "k2", "new")
    assert (store.stage_dir("train") / "model.bin").read_text() == "new"
    assert store.state("train", "k2") == "done"
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".train")] == []


def test_partial_reused_for_same_key_wiped_for_other(tmp_path):
    store = RunStore(tmp_path, "run")
    (store.open_partial("train", "k1") / "last.pt").write_text("epoch 3")
    assert (store.open_partial("train", "k1") / "last.pt").read_text() == "epoch 3"
    assert not (store.open_partial("train", "k2") / "last.pt").exists()


def test_lock_refuses_second_holder_across_processes(tmp_path):
    store = RunStore(tmp_path, "run")
    code = ("import sys, time; from pathlib import Path; from pipeline.artifacts import RunStore; "
            f"l = RunStore(Path({str(tmp_path)!r}), 'run').lock(); l.__enter__(); print('held', flush=True); time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ArtifactError, match=rf"in progress \(pid {holder.pid}\)"):
            with store.lock():
                pass
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    with store.lock():  # released by the dead process
        pass
