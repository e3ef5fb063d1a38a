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
from dataclasses import dataclass
from typing import Any, Mapping

import pipeline.runtime as rt
from pipeline.runtime.backends.tensorrt_build import EngineSpec

from ..graphs.onnx_export import io_shapes, neuron_nodes, read_metadata
from .openvino_guide import render_intel_guide
from .trt_script import render_jetson_guide, render_script

# what an engine of each precision is built from: an FP32 graph (FP16 or FP32 engine), a Q/DQ graph (INT8)
BUILDS_FROM = {"fp16": "fp32", "fp32": "fp32", "int8": "int8"}


@dataclass(frozen=True)
class BundleLayout:
    """Every file name the bundle knows, handed in by the build stage (from the stage registry), so this
    library knows no pipeline file names: the export files it copies, the engines to plan, the files it writes."""

    copied: tuple[str, ...]  # export's files the bundle carries
    graphs: tuple[str, ...]  # the whole-sequence ONNX graphs among them (INTEL.md's shapes)
    engine_plan: tuple[tuple[str, str, str], ...]  # (engine name, source graph, precision), in build order
    fp32_graph: str  # the float graph: required, and the source of the bundle's metadata
    int8_graph: str
    step_graph: str  # the one-step streaming graph
    samples: str  # the parity images, labels and float logits
    bundle_json: str
    script: str
    guide: str  # JETSON.md
    intel_guide: str  # INTEL.md
    runtime: str  # the standalone runner package's folder name
    first_engine: str  # the engine named in the guide when none is planned


def _copy(src: Path, dst: Path) -> None:
    """Copy (never hard-link: an in-place edit of one file would change the other, and the sha256 that
    export's manifest recorded would no longer match a bundle someone edited, or the reverse)."""
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    shutil.copy2(src, dst)


def copy_runtime(dst: Path, name: str) -> Path:
    """Copy ``pipeline/runtime`` as a standalone package ``dst/name`` (``staa_runtime``)."""
    src = Path(rt.__file__).parent
    target = dst / name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for f in sorted(src.rglob("*.py")):  # with its subpackages (backends/)
        (target / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target / f.relative_to(src))
    return target


def engine_specs(folder: Path, build: Mapping[str, Any], plan: tuple[tuple[str, str, str], ...]) -> list[EngineSpec]:
    """The engines to build from the graphs present in ``folder``, following ``build.precisions``."""
    import onnx

    specs = []
    for name, graph, precision in plan:
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


def graph_inputs(folder: Path, names: list[str], graphs: tuple[str, ...]) -> dict[str, dict[str, list]]:
    """``{graph: {input: dims}}`` of the whole-sequence ONNX graphs in ``folder`` (for INTEL.md's shapes)."""
    import onnx

    out = {}
    for name in names:
        if name in graphs:
            ins, _ = io_shapes(onnx.load(str(folder / name), load_external_data=False))
            out[name] = ins
    return out


def make_bundle(export_dir: Path, out: Path, build: Mapping[str, Any],
                layout: BundleLayout) -> tuple[list[EngineSpec], dict[str, Any]]:
    """Fill ``out`` with the bundle; returns (engine specs, facts for the metrics)."""
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in layout.copied:
        if (export_dir / name).is_file():
            _copy(export_dir / name, out / name)
            copied.append(name)
    fp32, samples = layout.fp32_graph, layout.samples
    if fp32 not in copied:
        raise FileNotFoundError(f"{export_dir / fp32} is missing; re-run the export stage")
    specs = engine_specs(out, build, layout.engine_plan)
    meta = read_metadata(out / fp32)
    (out / layout.bundle_json).write_text(json.dumps({
        "engines": [s.to_dict() for s in specs], "graphs": copied, "metadata": meta,
        "samples": samples if samples in copied else None,
        "runtime": layout.runtime,
    }, indent=2))
    script = out / layout.script
    script.write_text(render_script(specs))
    script.chmod(0o755)
    (out / layout.guide).write_text(render_jetson_guide(specs, meta, graph=fp32, step=layout.step_graph,
                                                        samples=samples, first_engine=layout.first_engine))
    (out / layout.intel_guide).write_text(render_intel_guide(graph_inputs(out, copied, layout.graphs), meta,
                                                             fp32_graph=fp32, int8_graph=layout.int8_graph))
    copy_runtime(out, layout.runtime)
    return specs, {"bundle_files": copied, "engines_planned": [s.name for s in specs]}
