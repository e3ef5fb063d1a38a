"""The runner interface: torch and ONNX Runtime agree on real images; benchmark; backend managers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.deploy.graphs.onnx_export import export_onnx, write_metadata
from pipeline.deploy.graphs.unroll import unroll_float
from pipeline.runtime import (BACKENDS, OrtRunner, Runner, TorchRunner, get_backend, load_runner)
from tests.helpers import firing_model, real_images

MODEL = {"arch": "resnet19", "width": 0.125, "T": 1, "num_classes": 10, "in_channels": 1, "staa": {"sa": False}}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    x, y, _ = real_images("digits", 24, T=1)
    flat = unroll_float(firing_model(MODEL, x))
    path = tmp_path_factory.mktemp("runtime") / "model_fp32.onnx"
    export_onnx(flat, (x[:2],), path)
    write_metadata(path, {"precision": "fp32"})
    return flat, path, x.numpy(), y.numpy()


def test_torch_and_onnxruntime_runners_predict_the_same(exported):
    flat, path, x, _ = exported
    t = TorchRunner(flat, input_shape=(None, 1, 16, 16))
    o = OrtRunner(path)
    lt, lo = t.predict(x), o.predict(x)
    assert lt.shape == lo.shape == (len(x), 10) and lt.dtype == lo.dtype == np.float32
    assert np.abs(lt - lo).max() <= 1e-4
    assert (lt.argmax(1) == lo.argmax(1)).all()
    assert o.name == "onnxruntime" and t.name == "torch" and o.precision == "fp32"
    assert o.input_shape == (None, 1, 16, 16) and o.input_names == ["input"] and o.output_names == ["logits"]
    assert np.array_equal(o.predict_all(x, batch_size=5), lo)


class CountingTorch(TorchRunner):
    """The real torch runner, recording (batch, torch threads) inside every call."""

    def run(self, feeds):
        self.seen = getattr(self, "seen", []) + [(len(feeds["input"]), torch.get_num_threads())]
        return super().run(feeds)


class CountingOrt(OrtRunner):
    """The real ONNX Runtime runner, recording (batch, the live session's intra-op threads) inside every call."""

    def run(self, feeds):
        threads = self.session.get_session_options().intra_op_num_threads
        self.seen = getattr(self, "seen", []) + [(len(feeds["input"]), threads)]
        return super().run(feeds)


def test_benchmark_times_real_runners_with_their_threads_fixed(exported):
    """Warm-up 1 + 5 timed calls, each at batch 2 on the thread count asked for; throughput = batch / mean."""
    flat, path, x, _ = exported
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runners = (CountingTorch(flat, input_shape=(None, 1, 16, 16)), CountingOrt(path, threads=2))
        for runner in runners:
            stats = runner.benchmark(batch=2, warmup=1, iters=5, threads=1)
            assert runner.seen == [(2, 1)] * 6, runner.name
            assert (stats["backend"], stats["precision"], stats["batch"], stats["iters"], stats["warmup"]) == (
                runner.name, "fp32", 2, 5, 1)
            assert stats["throughput"] == pytest.approx(2e3 / stats["mean_ms"], rel=1e-9)
    finally:
        torch.set_num_threads(prev)
    assert runners[1].threads == 1  # the session was rebuilt with the thread count asked for


def test_interface_is_small_enough_for_any_backend():
    """A backend only implements ``run``; predict and benchmark come from the base class."""

    class Doubler(Runner):
        name, precision = "numpy", "fp32"
        input_names, output_names, input_shape = ["input"], ["logits"], (None, 3)

        def run(self, feeds):
            return {"logits": feeds["input"] * 2}

    r = Doubler()
    assert np.array_equal(r.predict(np.ones((2, 3))), np.full((2, 3), 2.0, np.float32))
    assert r.benchmark(batch=4, warmup=0, iters=3)["batch"] == 4


def test_load_runner_by_suffix(exported, tmp_path):
    _, path, x, _ = exported
    assert isinstance(load_runner(path), OrtRunner)
    (tmp_path / "model.engine").write_bytes(b"\0")
    ok, _ = get_backend("tensorrt").is_available()
    if not ok:
        with pytest.raises(RuntimeError, match="tensorrt|TensorRT|CUDA"):
            load_runner(tmp_path / "model.engine")
    with pytest.raises(ValueError, match="expected .onnx or .engine"):
        load_runner(tmp_path / "model.bin")


def test_backend_managers_report_instead_of_crashing():
    assert set(BACKENDS) == {"torch", "onnxruntime", "openvino", "tensorrt"}
    for name, backend in BACKENDS.items():
        ok, reason = backend.is_available()
        assert isinstance(ok, bool) and reason
        env = backend.check_env()
        assert env["backend"] == name and env["available"] == ok
    assert BACKENDS["torch"].is_available()[0] and BACKENDS["onnxruntime"].is_available()[0]
    with pytest.raises(KeyError, match="known"):
        get_backend("tflite")


def test_runtime_package_imports_nothing_else_from_the_pipeline():
    """It is copied into the device bundle as ``staa_runtime``: only relative imports are allowed."""
    import ast
    from pathlib import Path

    import pipeline.runtime as rt

    for f in Path(rt.__file__).parent.rglob("*.py"):  # backends/ too
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("pipeline"), f"{f.name} imports {node.module}"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("pipeline") for a in node.names), f.name


def test_tensorrt_runner_matches_onnxruntime(exported, tmp_path):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed on this machine")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU; none is visible here")
    from pipeline.runtime import EngineSpec, build_engine
    from pipeline.runtime.backends.tensorrt import TrtRunner

    _, path, x, _ = exported
    (tmp_path / path.name).write_bytes(path.read_bytes())
    spec = EngineSpec(name="model_fp32", onnx=path.name, precision="fp32", inputs={"input": [-1, 1, 16, 16]},
                      min_batch=1, opt_batch=4, max_batch=32)
    info = build_engine(spec, tmp_path)
    assert info["tensorrt"] == trt.__version__
    runner = TrtRunner(tmp_path / spec.engine)
    ref = OrtRunner(path).predict(x)
    got = runner.predict(x)
    assert np.abs(got - ref).max() <= 1e-3 and (got.argmax(1) == ref.argmax(1)).mean() >= 0.99


def test_predict_refuses_nonfinite_inputs_unless_allowed(exported, tmp_path, capsys):
    """Issue 20 case 8: NaN/inf inputs gave exit 0 and finite logits (all-NaN input: about 9% top-1)."""
    import json

    from pipeline.runtime.__main__ import main
    from pipeline.runtime.base import NonFiniteInput

    _, path, x, y = exported
    bad = x.copy()
    bad[0, 0, 0, 0], bad[3, 0, 1, 1] = np.nan, np.inf
    samples = tmp_path / "nan.npz"
    np.savez(samples, x=bad, y=y)
    assert main(["predict", str(path), "--samples", str(samples)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("staa_runtime predict: error:"), err
    assert "2 of 24 input samples hold non-finite values (2 values: NaN, +inf)" in err[0] and "--allow-nonfinite" in err[0]
    assert main(["predict", str(path), "--samples", str(samples), "--allow-nonfinite"]) == 0
    out = capsys.readouterr()
    assert "warning: 2 of 24 input samples" in out.err and json.loads(out.out)["n"] == 24
    with OrtRunner(path) as runner, pytest.raises(NonFiniteInput):
        runner.predict_all(bad)  # the library refuses too


def test_predict_without_labels_and_bad_samples_are_one_line(exported, tmp_path, capsys):
    import json

    from pipeline.runtime.__main__ import main

    _, path, x, _ = exported
    unlabelled = tmp_path / "x_only.npz"
    np.savez(unlabelled, x=x)
    assert main(["predict", str(path), "--samples", str(unlabelled)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["top1"] is None and len(report["predictions"]) == len(x)
    for name, content in (("none.npz", None), ("junk.npz", b"not a zip"), ("noimages.npz", {"y": np.zeros(3)})):
        f = tmp_path / name
        if isinstance(content, bytes):
            f.write_bytes(content)
        elif content is not None:
            np.savez(f, **content)
        assert main(["predict", str(path), "--samples", str(f)]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("staa_runtime predict: error:") and name in err[0], err
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(path.read_bytes()[:500])
    assert main(["predict", str(broken), "--samples", str(unlabelled)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "onnxruntime cannot load" in err[0], err
