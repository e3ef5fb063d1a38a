"""The backend table (pipeline/runtime/specs.py): every backend list is derived from it, runner
options are checked against it, and a backend added by one row shows in the report."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from pipeline import registry
from pipeline.registry import Output, StageSpec
from pipeline.report import inventory, plots, report_json
from pipeline.runtime import specs
from pipeline.runtime.backends import BACKENDS, get_backend, load_runner

# ONNX Runtime under another name: one spec row, reusing the onnxruntime module's runner
ORT_COPY = specs.BackendSpec("ort_copy", "onnxruntime", "onnx", "ORT copy", "P", suffixes=(".onnx",),
                             options=dict(specs.spec("onnxruntime").options), defaults={"threads": 1})


def test_spec_table_imports_with_the_stdlib_only():
    """pipeline/registry.py reads the table, and the Makefile imports the registry before the venv exists."""
    code = ("import sys; import pipeline.registry as r; "
            "heavy = sorted(m for m in ('numpy', 'torch', 'onnx', 'onnxruntime', 'openvino') if m in sys.modules); "
            "print(heavy, tuple(r.BACKENDS))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] ('torch', 'onnxruntime', 'openvino', 'tensorrt')"


def test_every_backend_list_is_the_table():
    names = tuple(specs.SPECS)
    assert names == ("torch", "onnxruntime", "openvino", "tensorrt")
    assert tuple(registry.BACKENDS) == names and tuple(report_json.BACKENDS) == names and tuple(BACKENDS) == names
    assert dict(plots.MARKERS) == {"torch": "o", "onnxruntime": "s", "openvino": "D", "tensorrt": "^"}
    assert {k: dict(v) for k, v in inventory.RUNNER_OPTIONS.items() if v} == {"openvino": {"inference_precision": "f32"}}
    assert plots._legend() == "o torch, s ONNX Runtime, D OpenVINO, ^ TensorRT"
    assert specs.loaders(".onnx") == ("onnxruntime", "openvino") and specs.loaders(".plan") == ("tensorrt",)
    assert [n for n, s in specs.SPECS.items() if s.needs_gpu] == ["tensorrt"]
    with specs.temporary(ORT_COPY):
        assert registry.BACKENDS[-1] == report_json.BACKENDS[-1] == "ort_copy" and "ort_copy" in BACKENDS
        assert plots.MARKERS["ort_copy"] == "P" and inventory.RUNNER_OPTIONS["ort_copy"] == {"threads": 1}
        assert specs.loaders(".onnx") == ("onnxruntime", "openvino", "ort_copy")
        assert registry.check() == []
    assert "ort_copy" not in registry.BACKENDS and "ort_copy" not in plots.MARKERS
    with pytest.raises(ValueError, match="built in"):
        specs.unregister("onnxruntime")
    with specs.temporary(ORT_COPY), pytest.raises(ValueError, match="already registered"):
        specs.register(ORT_COPY)


def test_a_stage_row_naming_an_unknown_backend_is_refused():
    row = StageSpec("serve", ("export.*",), (), (Output("g", "g.onnx", "onnx", ("ort_copy",), "fp32",
                                                       parent="unroll.float", gate="onnx_fp32",
                                                       steps_from="metadata"),), "test")
    assert any("backend 'ort_copy'" in p for p in registry.check([*registry.stages(), row]))


@pytest.mark.parametrize("backend, options, words", [
    ("openvino", {"inference_precison": "f32"},  # a typo
     ("'inference_precison'", "'openvino'", "inference_precision", "adapt_qdq")),
    ("onnxruntime", {"threads": "4"}, ("'threads'", "'onnxruntime'", "int or None", "str '4'")),
    ("onnxruntime", {"threads": True}, ("'threads'", "bool True")),  # a bool is not a thread count
    ("openvino", {"adapt_qdq": 1}, ("'adapt_qdq'", "must be bool")),
    ("tensorrt", {"workspace": 1}, ("'workspace'", "'tensorrt'", "precision, device")),
])
def test_runner_options_are_checked_against_the_row(backend, options, words):
    with pytest.raises(ValueError) as err:
        specs.check_options(backend, options)
    for w in words:
        assert w in str(err.value), (w, str(err.value))
    # the manager checks before it loads anything: no file, no runtime needed for the error
    with pytest.raises(ValueError, match=next(iter(options))):
        get_backend(backend).runner("absent.onnx", **options)


def test_good_options_and_defaults_pass():
    assert specs.check_options("openvino", {"threads": None, "static_batch": 4, "config": {}}) == \
        {"threads": None, "static_batch": 4, "config": {}}
    with pytest.raises(ValueError, match="'bogus'.*not among its options"):
        specs.BackendSpec("x", "onnxruntime", "onnx", "X", "x", options={"threads": (int,)}, defaults={"bogus": 1})
    with pytest.raises(ValueError, match="'threads' of backend 'x' must be int"):
        specs.BackendSpec("x", "onnxruntime", "onnx", "X", "x", options={"threads": (int,)}, defaults={"threads": "1"})


def test_load_runner_dispatches_by_the_table(tmp_path):
    with pytest.raises(ValueError, match="expected .onnx or .engine or .plan or .trt"):
        load_runner(tmp_path / "model.bin")
    with pytest.raises(ValueError, match="backend must be one of tensorrt, got 'openvino'"):
        load_runner(tmp_path / "model.engine", backend="openvino")
    with pytest.raises(KeyError, match="unknown backend 'ort_copy'"):
        get_backend("ort_copy")


def test_a_backend_added_by_one_row_is_measured_and_reported(tmp_path, write_config):
    """ONNX Runtime registered as "ort_copy" plus a stage whose graph it runs: validate measures the
    graph on it, and the report (json, markdown) carries the row like any built-in backend's."""
    from test_validate import _fake_run

    from pipeline.report import validate_report
    from stages import validate

    serve = StageSpec("serve", ("export.*",), (), (Output(
        "graph", "model_fp32.onnx", "onnx", ("ort_copy",), "fp32", parent="unroll.float", gate="onnx_fp32",
        steps_from="metadata", help="the export's FP32 graph, served by ort_copy"),), "a test's serving stage")
    ctx = _fake_run(tmp_path, write_config)
    ctx.cfg["validate"].update(batch_sizes=[1], warmup=0, iterations=1, min_seconds=0.0)  # figures, not timings
    (tmp_path / "up" / "serve").mkdir()
    (tmp_path / "up" / "serve" / "model_fp32.onnx").write_bytes((ctx.inputs["export"] / "model_fp32.onnx").read_bytes())
    ctx.inputs["serve"] = tmp_path / "up" / "serve"
    with specs.temporary(ORT_COPY), registry.temporary(serve):
        runner = load_runner(ctx.inputs["serve"] / "model_fp32.onnx", backend="ort_copy")
        assert runner.name == "ort_copy" and runner.threads is None
        validate.run(ctx)
    doc = json.loads((ctx.out / "report.json").read_text())
    rows = {r["artifact"]: r for r in doc["rows"]}
    assert list(rows)[-1] == "serve/model_fp32.onnx"
    copy, ort = rows["serve/model_fp32.onnx"], rows["export/model_fp32.onnx"]
    assert copy["backend"] == "ort_copy" and copy["status"] == "ok" and copy["n"] == 16
    assert copy["top1"] == ort["top1"] and copy["agreement"] == ort["agreement"]  # the same runtime
    assert copy["gate"]["name"] == "onnx_fp32" and copy["gate"]["passed"]
    assert copy["executed"]["ops"] == ort["executed"]["ops"] and copy["benchmarks"][0]["backend"] == "ort_copy"
    assert copy["benchmarks"][0]["threads"] == ort["benchmarks"][0]["threads"]
    with specs.temporary(ORT_COPY):
        assert validate_report(doc) == []
    assert any("'ort_copy' not one of" in e for e in validate_report(doc))  # unregistered: unknown again
    assert "| serve/model_fp32.onnx | ort_copy |" in (ctx.out / "report.md").read_text()
