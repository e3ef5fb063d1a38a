"""The build stage: a self-contained device bundle, a "skipped" record without TensorRT, and a
build script whose every trtexec command parses and uses valid flags."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import yaml

from pipeline.deploy.graphs.onnx_export import deploy_metadata, export_onnx, neuron_scopes, write_metadata
from pipeline.deploy.graphs.streaming import build_streaming
from pipeline.deploy.packaging.trt_script import TRTEXEC_FLAGS, parse_script, validate_args
from pipeline.deploy.graphs.unroll import UnrolledInfo, unroll_float, unroll_qat
from pipeline.runtime import get_backend
from tests.conftest import TINY
from tests.helpers import firing_model, quantize_convs, real_images

MODEL = {"arch": "resnet19", "width": 0.125, "T": 1, "num_classes": 10, "in_channels": 1, "staa": {"sa": False}}
TRT_OK, TRT_WHY = get_backend("tensorrt").is_available()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """What the export stage leaves: FP32, INT8 and step graphs with metadata, sample inputs, trt_check.json."""
    out = tmp_path_factory.mktemp("export")
    x, y, bundle = real_images("digits", 16, T=1)
    model = firing_model(MODEL, x)
    flat = unroll_float(model)
    meta = {"dataset": "digits", "num_classes": 10, "class_names": [str(i) for i in range(10)], "mean": [0.3],
            "std": [0.4], "is_event": False, "image_size": [16, 16]}
    info = UnrolledInfo("float", 1, MODEL, meta, True, ())
    props = dict(deploy_metadata(info, precision="fp32", pipeline_version="test", config_hash="0" * 64),
                 neuron_scopes=neuron_scopes(flat))
    export_onnx(flat, (x[:2],), out / "model_fp32.onnx")
    write_metadata(out / "model_fp32.onnx", props)
    export_onnx(unroll_qat(quantize_convs(model, [x])), (x[:2],), out / "model_int8.onnx")
    write_metadata(out / "model_int8.onnx", dict(props, precision="int8"))
    net = build_streaming(flat, x)
    export_onnx(net, net.example_inputs(x[:2]), out / "step_fp32.onnx", input_names=net.input_names,
                output_names=net.output_names, static_inputs=("step",))
    write_metadata(out / "step_fp32.onnx", props)
    with torch.no_grad():
        np.savez(out / "sample_inputs.npz", x=x.numpy(), y=y.numpy(), logits=flat(x).numpy())
    (out / "trt_check.json").write_text("{}")
    return out


@pytest.fixture(scope="module")
def build_run(tmp_path_factory, export_dir):
    import stages.build
    from pipeline.config import deep_merge, load_config
    from pipeline.registry import spec
    from pipeline.runner import StageContext

    root = tmp_path_factory.mktemp("build")
    raw = deep_merge(TINY, {"name": "tiny", "artifacts_dir": str(root / "artifacts"),
                            "build": {"min_batch": 1, "opt_batch": 4, "max_batch": 32, "workspace_mb": 512}})
    (root / "tiny.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(str(root / "tiny.yaml"))
    out = root / "build"
    out.mkdir()
    ctx = StageContext(cfg=cfg, spec=spec("build"), out=out, inputs={"export": export_dir}, store=None,
                       device="cpu", log=logging.getLogger("test.build"))
    return stages.build.run(ctx), out


def test_build_records_skipped_with_its_reason(build_run):
    if TRT_OK:
        pytest.skip(f"TensorRT is available here ({TRT_WHY}): the stage builds instead of skipping")
    result, _ = build_run
    assert result.status == "skipped"
    assert "TensorRT" in result.reason and "build_engines.sh" in result.reason and "JETSON.md" in result.reason
    assert result.metrics["engines_planned"] == ["model_fp16", "model_int8", "step_fp16"]
    assert result.metrics["tensorrt"]["available"] is False


def test_bundle_is_self_contained(build_run):
    _, out = build_run
    for name in ("model_fp32.onnx", "model_int8.onnx", "step_fp32.onnx", "sample_inputs.npz", "bundle.json",
                 "build_engines.sh", "JETSON.md", "staa_runtime/__main__.py", "staa_runtime/backends/tensorrt_build.py"):
        assert (out / name).is_file(), name
    assert os.access(out / "build_engines.sh", os.X_OK)
    bundle = json.loads((out / "bundle.json").read_text())
    assert {e["name"] for e in bundle["engines"]} == {"model_fp16", "model_int8", "step_fp16"}
    guide = (out / "JETSON.md").read_text()
    assert "build_engines.sh" in guide and "tied to the GPU" in guide and "staa_runtime" in guide
    # the bundled runner works with the rest of the pipeline made unimportable
    code = ("import sys, runpy; sys.modules['pipeline'] = None; "
            "sys.argv = ['staa_runtime', 'predict', 'model_fp32.onnx']; "
            "runpy.run_module('staa_runtime', run_name='__main__', alter_sys=True)")
    done = subprocess.run([sys.executable, "-c", code], cwd=out, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(out)})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["n"] == 16 and report["agreement_with_float"] == 100.0 and report["max_abs_diff_vs_float"] <= 1e-4


def test_build_script_commands_are_valid_trtexec(build_run, export_dir):
    _, out = build_run
    text = (out / "build_engines.sh").read_text()
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n", str(out / "build_engines.sh")]).returncode == 0
    commands = parse_script(text)
    assert len(commands) == 3
    by_engine = {}
    for args in commands:
        assert validate_args(args) == [], args
        flags = dict(a.partition("=")[::2] for a in args)
        assert set(flags) <= set(TRTEXEC_FLAGS)
        assert (out / flags["--onnx"]).is_file()
        assert flags["--memPoolSize"] == "workspace:512" and flags["--timingCacheFile"] == "timing.cache"
        assert flags["--profilingVerbosity"] == "detailed" and flags["--exportLayerInfo"].endswith(".layers.json")
        by_engine[flags["--saveEngine"]] = flags
    fp16, int8, step = by_engine["model_fp16.engine"], by_engine["model_int8.engine"], by_engine["step_fp16.engine"]
    assert (fp16["--minShapes"], fp16["--optShapes"], fp16["--maxShapes"]) == (
        "input:1x1x16x16", "input:4x1x16x16", "input:32x1x16x16")
    assert "--fp16" in fp16 and "--stronglyTyped" in int8 and "--int8" not in int8 and "--fp16" not in int8
    assert int8["--onnx"] == "model_int8.onnx" and fp16["--onnx"] == "model_fp32.onnx"
    # FP16: the neuron layers are pinned to FP32, and every pinned name is a node of the graph
    assert fp16["--precisionConstraints"] == "obey"
    nodes = {n.name for n in onnx.load(str(out / "model_fp32.onnx")).graph.node}
    pinned = [p.rpartition(":")[0] for p in fp16["--layerPrecisions"].split(",")]
    assert pinned and set(pinned) <= nodes
    assert any(n.endswith("GreaterOrEqual") for n in pinned)  # the threshold compare itself
    outputs = dict(p.rsplit(":", 1) for p in fp16["--layerOutputTypes"].split(","))
    assert set(outputs) <= nodes and all(set(t.split("+")) == {"fp32"} for t in outputs.values())
    # the step graph: every membrane input gets the batch profile, the step index stays static
    assert "step:" not in step["--minShapes"] and step["--minShapes"].count("u_in.") == 17


def test_engine_plan_and_bundle_follow_the_registry():
    """The engines come from the build stage's declared outputs and their parent graphs; the bundle copies
    the export outputs marked ``bundled``."""
    from pipeline import registry
    from stages.build import bundle_layout

    ENGINE_PLAN, COPIED = bundle_layout().engine_plan, bundle_layout().copied

    assert ENGINE_PLAN == (("model_fp16", "model_fp32.onnx", "fp16"), ("model_int8", "model_int8.onnx", "int8"),
                           ("model_fp32", "model_fp32.onnx", "fp32"), ("step_fp16", "step_fp32.onnx", "fp16"),
                           ("step_fp32", "step_fp32.onnx", "fp32"), ("step_int8", "step_int8.onnx", "int8"))
    declared = {o.file for o in registry.spec("build").outputs if o.kind == "engine" and not o.fields}
    assert {f"{name}.engine" for name, _, _ in ENGINE_PLAN} >= declared
    assert set(COPIED) == {o.file for o in registry.spec("export").outputs if o.bundled}


def test_build_request_is_one_checked_object(tmp_path):
    """``TensorRTBackend.build`` takes one frozen request; a bad engine or a repeated name is refused
    when the request is made, before TensorRT is touched."""
    import dataclasses
    import inspect

    from pipeline.runtime.backends.tensorrt_build import BuildRequest, EngineSpec

    fp16 = EngineSpec("model_fp16", "model_fp32.onnx", "fp16", {"input": [-1, 1, 16, 16]}, 1, 4, 32)
    req = BuildRequest(str(tmp_path), [fp16])
    assert req.folder == tmp_path and req.engines == (fp16,) and req.verbose is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.verbose = True  # type: ignore[misc]
    with pytest.raises(ValueError, match="min_batch <= opt_batch"):
        BuildRequest(tmp_path, [fp16, EngineSpec("model_int8", "model_int8.onnx", "int8", fp16.inputs, 8, 4, 32)])
    with pytest.raises(ValueError, match="repeat in one build request: model_fp16"):
        BuildRequest(tmp_path, [fp16, fp16])
    assert list(inspect.signature(get_backend("tensorrt").build).parameters) == ["request"]


def test_validate_args_rejects_what_trtexec_would():
    assert validate_args(["--onnx=m.onnx", "--fp16"]) == []
    assert any("unknown" in p for p in validate_args(["--onnx=m.onnx", "--workspaceSize=10"]))
    assert any("bad value" in p for p in validate_args(["--minShapes=input:1,3,16,16"]))
    assert any("bad value" in p for p in validate_args(["--precisionConstraints=strict"]))
    assert any("cannot be combined" in p for p in validate_args(["--stronglyTyped", "--int8"]))
    assert any("precisionConstraints" in p for p in validate_args(["--layerPrecisions=a:fp32"]))
    assert any("takes no value" in p for p in validate_args(["--fp16=1"]))


@pytest.mark.skipif(not TRT_OK, reason=f"TensorRT engine build needs TensorRT 10 and a CUDA GPU: {TRT_WHY}")
def test_engines_build_and_agree_with_the_float_model(build_run):
    result, out = build_run
    assert result.status == "done"
    for name in ("model_fp16", "model_int8"):
        info = result.metrics["engines"][name]
        assert (out / info["engine"]).is_file() and (out / info["layer_info"]).is_file()
        assert info["sample_check"]["agreement_with_float"] >= 90.0
    assert result.metrics["engines"]["model_fp16"]["fp32_pinned_layers"] > 0
    assert (out / "timing.cache").is_file()


def test_bundle_files_are_copies_an_edit_of_one_leaves_the_other(export_dir, tmp_path):
    """Issue 20 case 9: export/ and build/ shared files by hard link, so an in-place edit of one
    corrupted the device bundle (and the export manifest's sha256) too."""
    import hashlib

    from pipeline.config import load_config
    from pipeline.deploy.packaging.bundle import make_bundle
    from stages.build import bundle_layout

    COPIED = bundle_layout().copied
    out = tmp_path / "bundle"
    make_bundle(export_dir, out, load_config()["build"], bundle_layout())
    name = "sample_inputs.npz"
    before = hashlib.sha256((export_dir / name).read_bytes()).hexdigest()
    for f in COPIED:
        if (out / f).is_file():
            assert os.stat(out / f).st_ino != os.stat(export_dir / f).st_ino, f
    with open(out / name, "r+b") as f:  # an in-place edit on the device side
        f.write(b"edited")
    assert hashlib.sha256((export_dir / name).read_bytes()).hexdigest() == before
