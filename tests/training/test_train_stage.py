"""The train stage through the real CLI and runner: caching, invalidation, atomicity, resume, DDP, NaN."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.runner import StageError, run_stage, stage_states
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _states(cfg) -> dict[str, str]:
    return {name: state for name, state, _, _ in stage_states(cfg)}


def _assert_recorded_top1_is_best_pt(cfg: dict, train_dir: Path, metrics: dict) -> None:
    """``test_top1`` is what best.pt scores on the test split, recomputed here."""
    from pipeline.checkpoint import load_model
    from pipeline.data import data_bundle, eval_loader
    from pipeline.training.evaluate import evaluate

    best, _ = load_model(train_dir / "best.pt")
    again = evaluate(best, eval_loader(cfg, data_bundle(cfg).test, cfg["data"]["limit_test"]), "cpu", progress=False)
    assert metrics["test_n"] == again["n"] == cfg["data"]["limit_test"]
    assert again["top1"] == pytest.approx(metrics["test_top1"])


def test_cache_hit_miss_and_invalidation(write_config):
    path = write_config()
    cfg = load_config(path)
    assert run_stage(cfg, "train") == "done"
    train_dir = Path(cfg["artifacts_dir"]) / "tiny" / "train"
    man = json.loads((train_dir / "manifest.json").read_text())
    assert {"best.pt", "last.pt", "metrics.json"} <= set(man["outputs"]) and man["wall_time_s"] > 0
    assert man["packages"]["torch"].startswith("2.14") and man["device"].startswith("cpu")
    _assert_recorded_top1_is_best_pt(cfg, train_dir, man["metrics"])
    mtime = (train_dir / "best.pt").stat().st_mtime_ns

    assert run_stage(cfg, "train") == "cached"  # hit: nothing rewritten
    assert (train_dir / "best.pt").stat().st_mtime_ns == mtime
    assert _states(cfg)["train"] == "done"

    changed = load_config(path, ["train.lr=0.002"])  # miss: config slice changed
    assert _states(changed)["train"] == "stale"
    unrelated = load_config(path, ["validate.iterations=9"])  # other stages' keys do not touch train
    assert _states(unrelated)["train"] == "done"

    with open(train_dir / "best.pt", "ab") as f:  # corrupted output is detected and rebuilt
        f.write(b"junk")
    assert _states(cfg)["train"] == "stale"
    assert run_stage(cfg, "train") == "done"
    assert _states(cfg)["train"] == "done"


def test_trained_model_beats_chance(write_config):
    """Trained, not just run: 2 epochs on 768 digits reach ~48% test top-1 (measured); 30% on 128
    test images is > 7 sigma above chance (10%). The TINY schedule (6 steps) stays at chance."""
    cfg = load_config(write_config({"data": {"limit_train": 1024}, "train": {"epochs": 2, "max_batches": None,
                                                                            "lr": 0.01}}))
    assert run_stage(cfg, "train") == "done"
    train_dir = Path(cfg["artifacts_dir"]) / "tiny" / "train"
    metrics = json.loads((train_dir / "metrics.json").read_text())
    assert metrics["test_top1"] >= 30, f"test top-1 {metrics['test_top1']}% is near chance (10%)"
    _assert_recorded_top1_is_best_pt(cfg, train_dir, metrics)


def test_downstream_stage_refuses_missing_upstream(write_config):
    cfg = load_config(write_config())
    with pytest.raises(StageError, match="needs 'train', which is missing"):
        run_stage(cfg, "reduce_t")


def test_cli_run_twice_second_does_nothing(write_config):
    path = write_config({"train": {"epochs": 1, "max_batches": 2}})
    first = _cli("pipeline.stage", "train", "--config", str(path))
    assert first.returncode == 0, first.stderr
    second = _cli("pipeline.stage", "train", "--config", str(path))
    assert second.returncode == 0 and "up to date" in second.stdout
    status = _cli("pipeline", "status", "--config", str(path))
    assert status.returncode == 0
    rows = {line.split()[0]: line.split()[1] for line in status.stdout.splitlines()[2:]}
    assert rows["train"] == "done" and rows["reduce_t"] == "missing"


def _start_training(path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.stage", "train", "--config", str(path)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.stderr.read()}")
        if time.time() > end:
            proc.kill()
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.2)


def test_kill9_leaves_no_visible_output_and_resumes(write_config, tmp_path):
    over = {"train": {"epochs": 3, "max_batches": 4, "threads": 1}, "seed": 3}  # same threads: same sums
    path = write_config(over)
    cfg = load_config(path)
    run = Path(cfg["artifacts_dir"]) / "tiny"
    proc = _start_training(path)
    _wait_for(run / "train.partial" / "last.pt", proc)  # one epoch finished
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "train").exists(), "a killed stage must leave no visible output"
    done_epochs = torch.load(run / "train.partial" / "last.pt", weights_only=False)["epoch"]
    assert done_epochs >= 1

    # a second run while none holds the lock resumes from the partial checkpoint
    assert run_stage(cfg, "train") == "done"
    metrics = json.loads((run / "train" / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == done_epochs and metrics["epochs"] == 3
    assert not (run / "train.partial").exists()

    # and ends with the weights of an uninterrupted run (epoch-seeded RNG and shuffling)
    clean = load_config(write_config(over, name="clean"))
    run_stage(clean, "train")
    a = torch.load(run / "train" / "last.pt", weights_only=False)["model"]
    b = torch.load(Path(clean["artifacts_dir"]) / "clean" / "train" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lock_refuses_concurrent_run(write_config):
    path = write_config({"train": {"epochs": 3, "max_batches": 6}})
    cfg = load_config(path)
    proc = _start_training(path)
    try:
        _wait_for(Path(cfg["artifacts_dir"]) / "tiny" / "train.partial" / ".key", proc)
        second = _cli("pipeline.stage", "train", "--config", str(path))
        assert second.returncode == 1
        assert "another pipeline run of config 'tiny' is in progress" in second.stderr
    finally:
        proc.kill()
        proc.wait()


def test_nan_loss_stops_with_message_and_keeps_checkpoint(write_config):
    path = write_config({"train": {"epochs": 3, "max_batches": 3, "lr": 1.0e+30, "optimizer": "sgd"}})
    r = _cli("pipeline.stage", "train", "--config", str(path))
    assert r.returncode == 1
    assert "loss became" in r.stderr and "learning rate" in r.stderr
    run = Path(load_config(path)["artifacts_dir"]) / "tiny"
    assert not (run / "train").exists()


def test_ddp_two_gloo_processes(write_config):
    path = write_config({"train": {"epochs": 1, "max_batches": 2}})
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(29500 + os.getpid() % 1000), "-m", "pipeline.stage", "train", "--config", str(path)],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = load_config(path)
    man = json.loads((Path(cfg["artifacts_dir"]) / "tiny" / "train" / "manifest.json").read_text())
    assert man["status"] == "done" and man["metrics"]["epochs"] == 1
