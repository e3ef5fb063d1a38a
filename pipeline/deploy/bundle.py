"""The device bundle: everything a Jetson needs in one folder (the build stage's output).

Contents: the ONNX graphs and ``sample_inputs.npz`` (copied from the export stage, so the folder
is self-contained), ``bundle.json`` (engine recipes: :class:`EngineSpec` per engine),
``build_engines.sh`` (trtexec), ``JETSON.md``, ``INTEL.md`` (the same graphs with OpenVINO on an
Intel CPU/iGPU/NPU) and ``staa_runtime/`` (a copy of ``pipeline.runtime``, which imports nothing
else from the pipeline).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import pipeline.runtime as rt
from pipeline import registry
from pipeline.runtime.backends.tensorrt_build import EngineSpec

from .onnx_export import io_shapes, neuron_nodes, read_metadata
from .openvino_guide import render_intel_guide
from .trt_script import render_jetson_guide, render_script

RUNTIME_PACKAGE = registry.file("build", "runtime").rstrip("/")
# what an engine of each precision is built from: an FP32 graph (FP16 or FP32 engine), a Q/DQ graph (INT8)
BUILDS_FROM = {"fp16": "fp32", "fp32": "fp32", "int8": "int8"}


def engine_plan() -> tuple[tuple[str, str, str], ...]:
    """(engine name, source graph in the export folder, precision) for every engine the build stage declares,
    in its order; a family (``step_{precision}.engine``) gives one engine per precision its graph builds."""
    plan = []
    for o in registry.spec("build").outputs:
        if o.kind != "engine":
            continue
        _, graph = registry.ref(o.parent)
        precisions = [o.precision] if o.precision else [p for p, g in BUILDS_FROM.items() if g == graph.precision]
        for p in precisions:
            plan.append((Path(o.filename(**({"precision": p} if o.fields else {}))).stem, graph.file, p))
    return tuple(plan)


ENGINE_PLAN = engine_plan()
COPIED = tuple(o.file for o in registry.spec("export").outputs if o.bundled)  # export's files the bundle carries
GRAPHS = tuple(o.file for s, o in registry.measured() if s == "export" and o.kind == "onnx")  # whole-sequence


def _copy(src: Path, dst: Path) -> None:
    """Copy (never hard-link: an in-place edit of one file would change the other, and the sha256 that
    export's manifest recorded would no longer match a bundle someone edited, or the reverse)."""
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    shutil.copy2(src, dst)


def copy_runtime(dst: Path) -> Path:
    """Copy ``pipeline/runtime`` as a standalone package ``dst/staa_runtime``."""
    src = Path(rt.__file__).parent
    target = dst / RUNTIME_PACKAGE
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for f in sorted(src.rglob("*.py")):  # with its subpackages (backends/)
        (target / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target / f.relative_to(src))
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


def graph_inputs(folder: Path, names: list[str]) -> dict[str, dict[str, list]]:
    """``{graph: {input: dims}}`` of the whole-sequence ONNX graphs in ``folder`` (for INTEL.md's shapes)."""
    import onnx

    out = {}
    for name in names:
        if name in GRAPHS:
            ins, _ = io_shapes(onnx.load(str(folder / name), load_external_data=False))
            out[name] = ins
    return out


def make_bundle(export_dir: Path, out: Path, build: Mapping[str, Any]) -> tuple[list[EngineSpec], dict[str, Any]]:
    """Fill ``out`` with the bundle; returns (engine specs, facts for the metrics)."""
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in COPIED:
        if (export_dir / name).is_file():
            _copy(export_dir / name, out / name)
            copied.append(name)
    fp32, samples = registry.file("export", "onnx_fp32"), registry.file("export", "samples")
    if fp32 not in copied:
        raise FileNotFoundError(f"{export_dir / fp32} is missing; re-run the export stage")
    specs = engine_specs(out, build)
    meta = read_metadata(out / fp32)
    registry.path(out, "build", "bundle").write_text(json.dumps({
        "engines": [s.to_dict() for s in specs], "graphs": copied, "metadata": meta,
        "samples": samples if samples in copied else None,
        "runtime": RUNTIME_PACKAGE,
    }, indent=2))
    script = registry.path(out, "build", "script")
    script.write_text(render_script(specs))
    script.chmod(0o755)
    registry.path(out, "build", "guide").write_text(render_jetson_guide(specs, meta))
    registry.path(out, "build", "intel_guide").write_text(render_intel_guide(graph_inputs(out, copied), meta))
    copy_runtime(out)
    return specs, {"bundle_files": copied, "engines_planned": [s.name for s in specs]}
