"""A new user's first hour: clear data errors with nothing left behind, one CLI, the Makefile's SET,
run folders that record their config, status states, timing statistics, a repository that stands alone.

The CLI runs in subprocesses (the real entry points, exit codes and console output)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import registry
from pipeline.artifacts import Manifest, RunStore
from pipeline.cli import _display_state, _status_note, best_shipping_row, split_set_string
from pipeline.config import load_config
from pipeline.runtime.base import BENCH_DEFAULTS, Runner, benchmark
from pipeline.schema import SCHEMA, defaults
from tests.conftest import REPO

PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cli(*args: str, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV)


def _assert_one_clean_error(res: subprocess.CompletedProcess, prefix: str) -> str:
    """Exit 2, no traceback, exactly one error message; returns it."""
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    starts = [line for line in res.stderr.splitlines() if line.startswith(prefix)]
    assert len(starts) == 1, res.stderr
    return res.stderr[res.stderr.index(prefix):]


# ------------------------------------------------------------------ data errors
def test_missing_dataset_exit_2_nothing_left(tmp_path):
    art = tmp_path / "art"
    res = _cli("pipeline", "run", "--config", "configs/cifar100.yaml", "--set", f"artifacts_dir={art}",
               "--set", "device=cpu")  # the GPU configs ask for CUDA, which is checked first
    msg = _assert_one_clean_error(res, "data error:")
    assert str(REPO / "data" / "cifar100") in msg  # the absolute path looked at
    assert "cifar-100-python/" in msg and "how to fix" in msg
    assert not art.exists()  # no run folder, no .partial, no .lock


def _cifar_npz_config(tmp_path: Path, train: Path, test: Path) -> Path:
    cfg = {"name": "npzrun", "artifacts_dir": str(tmp_path / "art"),
           "data": {"dataset": "cifar10", "format": "npz", "train_file": str(train), "test_file": str(test)},
           "model": {"width": 0.125, "T": 2}, "reduce_t": {"steps": [1]}}
    path = tmp_path / "npz.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _good_npz(path: Path, n: int = 20) -> Path:
    np.savez(path, images=np.zeros((n, 32, 32, 3), np.uint8), labels=np.arange(n, dtype=np.int64) % 10)
    return path


def test_corrupt_npz_exit_2_clear_message_nothing_left(tmp_path):
    train = tmp_path / "train.npz"
    train.write_bytes(os.urandom(4096))  # np.load would fall back to pickle and blame allow_pickle
    res = _cli("pipeline", "stage", "train", "--config",
               str(_cifar_npz_config(tmp_path, train, _good_npz(tmp_path / "test.npz"))))
    msg = _assert_one_clean_error(res, "data error:")
    assert str(train) in msg and "not an npz archive" in msg and "expected layout" in msg and "docs/data.md" in msg
    assert "pickle" not in msg
    assert not (tmp_path / "art").exists()


def test_wrong_shape_npz_names_the_key_and_leaves_nothing(tmp_path):
    from pipeline.data import DataError
    from pipeline.runner import run_stage

    train = tmp_path / "train.npz"
    np.savez(train, images=np.zeros((20, 28, 28), np.uint8), labels=np.zeros(20, np.int64))
    cfg = load_config(_cifar_npz_config(tmp_path, train, _good_npz(tmp_path / "test.npz")), ["device=cpu"])
    with pytest.raises(DataError) as err:
        run_stage(cfg, "train")
    msg = str(err.value)
    assert f"looked at: {train}" in msg and "'images' has dtype uint8 shape (20, 28, 28)" in msg
    assert "(N,32,32,3) uint8" in msg and "how to fix" in msg
    assert not (tmp_path / "art").exists()


def test_failed_call_keeps_a_partial_it_did_not_create(tmp_path):
    """A partial folder from an interrupted run (a checkpoint to resume from) survives a data error."""
    from pipeline.data import DataError
    from pipeline.registry import spec
    from pipeline.runner import run_stage, run_store, stage_key

    train = tmp_path / "train.npz"
    train.write_bytes(b"not a zip")
    cfg = load_config(_cifar_npz_config(tmp_path, train, _good_npz(tmp_path / "test.npz")), ["device=cpu"])
    store = run_store(cfg)
    part = store.open_partial("train", stage_key(cfg, spec("train"), store))
    (part / "last.pt").write_text("epoch 3")
    with pytest.raises(DataError):
        run_stage(cfg, "train")
    assert (part / "last.pt").read_text() == "epoch 3"
    assert not (store.root / ".lock").exists()


def test_runtime_cli_missing_file_and_no_tensorrt(tmp_path):
    res = _cli("pipeline.runtime", "bench", str(tmp_path / "none.onnx"))
    assert "none.onnx" in _assert_one_clean_error(res, "staa_runtime bench: error:")
    res = _cli("pipeline.runtime", "predict", str(tmp_path / "none.onnx"), "--samples", str(tmp_path / "s.npz"))
    assert "s.npz" in _assert_one_clean_error(res, "staa_runtime predict: error:")
    if shutil.which("trtexec") is None:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            engine = tmp_path / "m.engine"
            engine.write_bytes(b"x")
            res = _cli("pipeline.runtime", "bench", str(engine))
            assert "tensorrt" in _assert_one_clean_error(res, "staa_runtime bench: error:")


# ------------------------------------------------------------------ one CLI
def test_force_is_checked_against_the_registry():
    res = _cli("pipeline", "run", "--force", "trian")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "'trian'" in res.stderr and "train" in res.stderr and "validate" in res.stderr


def test_version_list_and_config():
    from pipeline import __version__

    assert __version__ in _cli("pipeline", "--version").stdout
    assert __version__ in _cli("pipeline.stage", "--version").stdout
    listed = _cli("pipeline", "list")
    assert listed.returncode == 0
    assert "qat.pt" in listed.stdout and "cifar10_small.yaml" in listed.stdout and "resnet19" in listed.stdout
    assert _cli("pipeline", "list", "--names").stdout.split() == list(registry.names())
    res = _cli("pipeline", "config", "--config", "configs/cifar10_small.yaml", "--set", "train.epochs=2",
               "--sets", "reduce_t.steps=[2, 1] name=x y")
    assert res.returncode == 0, res.stderr
    printed = yaml.safe_load(res.stdout)
    assert printed["train"]["epochs"] == 2 and printed["reduce_t"]["steps"] == [2, 1] and printed["name"] == "x y"
    assert printed["data"]["val_fraction"] == 0.1 and printed["validate"]["min_seconds"] == 0.5  # defaults filled


def test_verbose_accepted_everywhere():
    for args in (("pipeline", "-v", "list", "--names"), ("pipeline", "list", "-v", "--names"),
                 ("pipeline", "config", "-v"), ("pipeline.stage", "train", "-v", "--help")):
        assert _cli(*args).returncode == 0, args


def test_set_string_splits_before_each_key():
    assert split_set_string("train.epochs=5 data.batch_size=64") == ["train.epochs=5", "data.batch_size=64"]
    assert split_set_string("reduce_t.steps=[2, 1] name=my run") == ["reduce_t.steps=[2, 1]", "name=my run"]
    assert split_set_string("") == []


def test_console_script_points_at_the_cli():
    import importlib
    import tomllib

    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["staa-pipeline"]
    module, _, attr = target.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


# ------------------------------------------------------------------ Makefile
def _make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-o", ".venv/.installed", f"PYTHON={PY}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=ENV)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_status_and_clean_honour_set(tmp_path):
    dry = _make("-n", "status", "SET=reduce_t.steps=[2, 1] name=it's")
    assert "--sets 'reduce_t.steps=[2, 1] name=it'\\''s'" in dry.stdout, dry.stdout
    sets = f"SET=artifacts_dir={tmp_path} name=mk reduce_t.steps=[2, 1]"
    res = _make("status", sets)
    assert res.returncode == 0, res.stderr
    assert f"run 'mk' in {tmp_path / 'mk'}" in res.stdout
    (tmp_path / "mk" / "train").mkdir(parents=True)
    (tmp_path / "other" / "train").mkdir(parents=True)
    res = _make("clean", sets)
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "mk" / "train").exists() and (tmp_path / "other" / "train").exists()
    stages = _make("-n", "export").stdout
    assert "-m pipeline.stage export" in stages  # a target made from the registry


# ------------------------------------------------------------------ status, lock
def test_status_states_and_notes():
    skipped = Manifest(stage="build", key="k", status="skipped",
                       reason="TensorRT engines not built on this machine: the tensorrt Python package is "
                              "not installed; " + "x" * 300)
    assert _display_state("done", skipped, running=False) == "skipped"
    note = _status_note(skipped, state="skipped")
    assert note.startswith("skipped: TensorRT engines not built on this machine") and len(note) <= 60
    failed = Manifest(stage="validate", key="k", status="failed", failed_gates=["qat/qat.pt: drop 5 > 1"])
    assert "1 gate(s) failed: qat/qat.pt" in _status_note(failed, state="failed")
    assert _display_state("missing", None, running=True) == "running"
    assert "resumes" in _status_note(None, state="missing", partial=True)


def test_status_shows_running_while_the_lock_is_held(tmp_path):
    store = RunStore(tmp_path, "live")
    with store.lock():
        store.open_partial("train", "k")
        res = _cli("pipeline", "status", "--set", f"artifacts_dir={tmp_path}", "--set", "name=live")
    assert res.returncode == 0, res.stderr
    assert f"pid {os.getpid()}" in res.stdout
    rows = {line.split()[0]: line.split()[1] for line in res.stdout.splitlines()[2:]}
    assert rows["train"] == "running" and rows["qat"] == "missing"


def test_lock_file_and_created_run_folder_are_removed(tmp_path):
    store = RunStore(tmp_path / "a" / "b", "run")
    with store.lock():
        assert store.lock_holder() == os.getpid()
    assert not (tmp_path / "a").exists()  # created for the lock, empty again: removed
    with store.lock():
        (store.root / "train").mkdir()
    assert (store.root / "train").is_dir() and not (store.root / ".lock").exists()
    assert store.lock_holder() is None


# ------------------------------------------------------------------ results and timing
def _row(name: str, p50: float, passed: bool | None, ships: bool = True, total: bool | None = True) -> dict:
    gate = {"passed": passed}
    return {"artifact": name, "backend": "onnxruntime", "precision": "fp32", "T": 2, "status": "ok", "top1": 90.0,
            "delta": -0.5, "ships": ships, "gate": gate, "total_gate": None if total is None else {"passed": total},
            "latency": {"batch": 1, "p50_ms": p50}}


def test_best_shipping_row_is_the_fastest_that_passed():
    rows = [_row("train/best.pt", 0.1, True, ships=False), _row("export/model_int8.onnx", 0.5, False),
            _row("export/model_fp32.onnx", 2.0, True), _row("build/model_fp16.engine", 1.0, True, total=False)]
    assert best_shipping_row({"rows": rows})["artifact"] == "export/model_fp32.onnx"
    assert best_shipping_row({"rows": rows[:2]}) is None


class SleepRunner(Runner):
    name, precision, input_names, output_names, input_shape = "sleep", "fp32", ["x"], ["y"], (None, 2)

    def run(self, feeds):
        time.sleep(0.002)
        return {"y": np.zeros((len(feeds["x"]), 2), np.float32)}


class SpikyRunner(SleepRunner):
    calls = 0

    def run(self, feeds):
        self.calls += 1
        time.sleep(0.030 if self.calls % 10 == 0 else 0.002)
        return {"y": np.zeros((len(feeds["x"]), 2), np.float32)}


def test_benchmark_statistics_and_minimum_duration():
    res = benchmark(SleepRunner(), batch=1, warmup=0, iters=3, min_seconds=0.15)
    assert res["iters"] > 3 and res["timed_s"] >= 0.15 and res["min_iters"] == 3
    assert res["min_ms"] <= res["p50_ms"] <= res["p95_ms"] <= res["p99_ms"] <= res["max_ms"]
    assert res["min_ms"] >= 2.0 and res["max_ms"] - res["min_ms"] >= res["std_ms"] > 0.0
    # one slow call in ten: the tail statistics must see it, the median must not
    slow = SpikyRunner()
    res = benchmark(slow, batch=1, warmup=0, iters=40, min_seconds=0.0)
    assert res["iters"] == 40 == slow.calls
    assert res["max_ms"] >= 30.0 and res["p99_ms"] >= 30.0 and res["p50_ms"] < 15.0 and res["min_ms"] < 15.0
    assert res["mean_ms"] >= 0.9 * (36 * 2.0 + 4 * 30.0) / 40
    quick = benchmark(SleepRunner(), batch=1, warmup=0, iters=4)
    assert quick["iters"] == 4  # no minimum duration: exactly the calls asked for


def test_device_bench_defaults_match_the_report():
    v = defaults(SCHEMA["validate"])
    assert BENCH_DEFAULTS == {"warmup": v["warmup"], "iters": v["iterations"], "threads": v["threads"],
                              "min_seconds": v["min_seconds"]}


def test_build_script_times_each_engine():
    from pipeline.deploy.packaging.trt_script import parse_script, render_jetson_guide, render_script, validate_args
    from pipeline.runtime.backends.tensorrt_build import EngineSpec

    specs = [EngineSpec("model_fp16", "model_fp32.onnx", "fp16", {"input": [-1, 1, 16, 16]}, 1, 4, 32),
             EngineSpec("model_int8", "model_int8.onnx", "int8", {"input": [-1, 1, 16, 16]}, 1, 4, 32)]
    text = render_script(specs)
    timed = parse_script(text, "time")
    assert [c[0] for c in timed] == ["--loadEngine=model_fp16.engine", "--loadEngine=model_int8.engine"]
    for args in timed:
        assert validate_args(args) == [] and "--skipInference" not in args and "--shapes=input:1x1x16x16" in args
    assert len(parse_script(text)) == 2  # the build commands, as before
    guide = render_jetson_guide(specs, {}, graph="model_fp32.onnx", step="step_fp32.onnx",
                                samples="sample_inputs.npz", first_engine="model_fp16.engine")
    assert "Performance summary" in guide and "GPU Compute Time" in guide and "timing.log" in guide


# ------------------------------------------------------------------ console and a clone that stands alone
def test_nncf_info_stays_off_the_console_but_reaches_the_log(caplog, capsys):
    import nncf  # noqa: F401  (its import installs a stdout handler on the "nncf" logger)

    from pipeline.console import ConsoleFilter, quiet_nncf

    quiet_nncf()
    lg = logging.getLogger("nncf")
    with caplog.at_level(logging.DEBUG):
        lg.info("nncf-info-line")
    assert "nncf-info-line" not in capsys.readouterr().out  # its own handler is gone
    from nncf.common.utils.debug import is_debug

    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.DEBUG)  # what setup_logging does: NNCF must not enter its slow debug mode
    try:
        assert not is_debug()
    finally:
        root.setLevel(level)
    assert [r.getMessage() for r in caplog.records if r.name == "nncf"] == ["nncf-info-line"]  # reaches the root
    console = ConsoleFilter()
    rec = lambda name, level: logging.LogRecord(name, level, __file__, 1, "m", None, None)  # noqa: E731
    assert not console.filter(rec("nncf", logging.INFO)) and console.filter(rec("nncf", logging.ERROR))
    assert not console.filter(rec("nncf", logging.WARNING)) and console.held_warnings == 1  # in stage.log only
    assert console.filter(rec("pipeline.train", logging.INFO)) and not console.filter(rec("pipeline", logging.DEBUG))
    assert ConsoleFilter(verbose=True).filter(rec("nncf", logging.DEBUG))


def test_progress_is_plain_lines_off_a_terminal(caplog):
    from pipeline.console import LogProgress, progress

    with caplog.at_level(logging.INFO, logger="pipeline.progress"):
        bar = progress(range(3), desc="epoch", interval_s=0.0)  # pytest's stderr is not a terminal
        assert isinstance(bar, LogProgress) and list(bar) == [0, 1, 2]
    assert [r.getMessage().split(" s")[0].rsplit(" ", 1)[0] for r in caplog.records] == [
        "epoch 1/3 (33%)", "epoch 2/3 (67%)", "epoch 3/3 (100%)"]
    assert list(progress(range(2), enabled=False, interval_s=0.0)) == [0, 1]


def test_repository_cites_only_its_own_documents():
    design, shared_readme = "DESIGN" + ".md", "shared/data/" + "README.md"
    assert (REPO / "docs" / "architecture.md").is_file() and (REPO / "docs" / "data.md").is_file()
    roots = [REPO / d for d in ("pipeline", "stages", "tests", "bench", "configs", ".ci")]
    files = [p for r in roots if r.exists() for p in r.rglob("*") if p.is_file() and p.suffix in (".py", ".yaml", ".md", "")]
    files += [REPO / "README.md", REPO / "Makefile", REPO / "docs" / "architecture.md"]
    cited = [str(p.relative_to(REPO)) for p in files
             if design in p.read_text(errors="ignore") or shared_readme in p.read_text(errors="ignore")]
    assert cited == []


# ------------------------------------------------------------------ one real stage (slow)
@pytest.mark.slow
def test_stage_run_writes_config_and_keeps_the_console_short(write_config, tmp_path):
    path = write_config({"train": {"epochs": 1, "max_batches": 1}})
    res = _cli("pipeline", "stage", "train", "--config", str(path), "--set", "seed=3")
    assert res.returncode == 0, res.stderr
    console = (res.stdout + res.stderr).splitlines()
    assert len(console) <= 8, console
    assert not any("\r" in line for line in console)
    run = tmp_path / "artifacts" / "tiny"
    text = (run / "config.yaml").read_text()
    assert "# command: python -m pipeline stage train --config" in text and "--set seed=3" in text
    again = load_config(run / "config.yaml")
    assert again["seed"] == 3 and again["train"]["max_batches"] == 1
    assert not (run / ".lock").exists()
    status = _cli("pipeline", "status", "--config", str(run / "config.yaml"))
    rows = {line.split()[0]: line.split()[1] for line in status.stdout.splitlines()[2:]}
    assert rows["train"] == "done", status.stdout  # the written config is the config that ran
    assert (run / "train" / "stage.log").stat().st_size > 0
