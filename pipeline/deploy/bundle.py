"""The device bundle: everything a Jetson needs in one folder (the build stage's output).

Contents: the ONNX graphs and ``sample_inputs.npz`` (copied from the export stage, so the folder
is self-contained), ``bundle.json`` (engine recipes: :class:`EngineSpec` per engine),
``build_engines.sh`` (trtexec), ``JETSON.md`` and ``staa_runtime/`` (a copy of
``pipeline.runtime``, which imports nothing else from the pipeline).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from pipeline.runtime.trt_build import EngineSpec

from .onnx_export import io_shapes, neuron_nodes, read_metadata
from .trt_script import render_jetson_guide, render_script

RUNTIME_PACKAGE = "staa_runtime"
# engine name -> (source graph in the export folder, precision)
ENGINE_PLAN: tuple[tuple[str, str, str], ...] = (
    ("model_fp16", "model_fp32.onnx", "fp16"),
    ("model_int8", "model_int8.onnx", "int8"),
    ("model_fp32", "model_fp32.onnx", "fp32"),
    ("step_fp16", "step_fp32.onnx", "fp16"),
    ("step_fp32", "step_fp32.onnx", "fp32"),
)
COPIED = ("model_fp32.onnx", "model_int8.onnx", "step_fp32.onnx", "sample_inputs.npz", "trt_check.json")


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link (artifacts are immutable; saves space) or copy where links are not possible."""
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_runtime(dst: Path) -> Path:
    """Copy ``pipeline/runtime`` as a standalone package ``dst/staa_runtime``."""
    import pipeline.runtime as rt

    src = Path(rt.__file__).parent
    target = dst / RUNTIME_PACKAGE
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for f in sorted(src.glob("*.py")):
        shutil.copy2(f, target / f.name)
    return target


def engine_specs(folder: Path, build: Mapping[str, Any]) -> list[EngineSpec]:
    """The engines to build from the graphs present in ``folder``, following ``build.precisions``."""
    import onnx

    specs = []
    for name, graph, precision in ENGINE_PLAN:
        path = folder / graph
        if precision not in build["precisions"] or not path.is_file():
            continue
        ins, _ = io_shapes(onnx.load(str(path), load_external_data=False))
        inputs = {n: [d if isinstance(d, int) and d > 0 else -1 for d in dims] for n, dims in ins.items()}
        spec = EngineSpec(name=name, onnx=graph, precision=precision, inputs=inputs,
                          min_batch=int(build["min_batch"]), opt_batch=int(build["opt_batch"]),
                          max_batch=int(build["max_batch"]), workspace_mb=int(build["workspace_mb"]))
        if precision == "fp16" and build["fp32_neurons"]:
            scopes = json.loads(read_metadata(path).get("neuron_scopes", "[]"))
            nodes = neuron_nodes(path, scopes) if scopes else {"compute": [], "float_out": {}}
            spec.fp32_scopes, spec.fp32_layers, spec.fp32_outputs = scopes, nodes["compute"], nodes["float_out"]
        spec.validate()
        specs.append(spec)
    return specs


def make_bundle(export_dir: Path, out: Path, build: Mapping[str, Any]) -> tuple[list[EngineSpec], dict[str, Any]]:
    """Fill ``out`` with the bundle; returns (engine specs, facts for the metrics)."""
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in COPIED:
        if (export_dir / name).is_file():
            _link_or_copy(export_dir / name, out / name)
            copied.append(name)
    if "model_fp32.onnx" not in copied:
        raise FileNotFoundError(f"{export_dir / 'model_fp32.onnx'} is missing; re-run the export stage")
    specs = engine_specs(out, build)
    meta = read_metadata(out / "model_fp32.onnx")
    (out / "bundle.json").write_text(json.dumps({
        "engines": [s.to_dict() for s in specs], "graphs": copied, "metadata": meta,
        "samples": "sample_inputs.npz" if "sample_inputs.npz" in copied else None,
        "runtime": RUNTIME_PACKAGE,
    }, indent=2))
    script = out / "build_engines.sh"
    script.write_text(render_script(specs))
    script.chmod(0o755)
    (out / "JETSON.md").write_text(render_jetson_guide(specs, meta))
    copy_runtime(out)
    return specs, {"bundle_files": copied, "engines_planned": [s.name for s in specs]}
