"""build: TensorRT engines (FP16, INT8) where TensorRT and a GPU exist; a device bundle everywhere.

The bundle (ONNX graphs, sample inputs, ``bundle.json``, ``build_engines.sh``, ``JETSON.md``,
``staa_runtime/``) is always written, so the target can build its own engines. Where TensorRT
or CUDA is absent the stage records "skipped" with the reason; where present it builds every
engine through the TensorRT 10 Python API and runs each once on the sample images.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline import registry
from pipeline.deploy.packaging.bundle import BUILDS_FROM, BundleLayout, make_bundle
from pipeline.runner import StageContext, StageError, StageResult
from pipeline.runtime import get_backend, load_runner
from pipeline.runtime.backends.tensorrt_build import BuildRequest


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


def bundle_layout() -> BundleLayout:
    """The bundle's file names, from the registry rows of export (what it carries) and build (what it writes)."""
    export = registry.spec("export")
    return BundleLayout(
        copied=tuple(o.file for o in export.outputs if o.bundled),
        graphs=tuple(o.file for s, o in registry.measured() if s == "export" and o.kind == "onnx"),
        engine_plan=engine_plan(), fp32_graph=registry.file("export", "onnx_fp32"),
        int8_graph=registry.file("export", "onnx_int8"), step_graph=registry.file("export", "step_fp32"),
        samples=registry.file("export", "samples"), bundle_json=registry.file("build", "bundle"),
        script=registry.file("build", "script"), guide=registry.file("build", "guide"),
        intel_guide=registry.file("build", "intel_guide"), runtime=registry.file("build", "runtime").rstrip("/"),
        first_engine=registry.file("build", "engine_fp16"))


def _engine_check(folder: Path, engine: str) -> dict[str, Any]:
    """Top-1 and agreement with the float logits on the bundled sample images (not a gate: validate gates)."""
    samples = np.load(registry.path(folder, "export", "samples"))  # the bundle carries export's files by name
    with load_runner(folder / engine) as runner:
        logits = runner.predict_all(samples["x"], 32)
    pred, ref = logits.argmax(1), samples["logits"]
    return {"top1": float((pred == samples["y"]).mean() * 100),
            "agreement_with_float": float((pred == ref.argmax(1)).mean() * 100),
            "max_abs_diff_vs_float": float(np.abs(logits - ref).max())}


def run(ctx: StageContext) -> StageResult:
    b = ctx.cfg["build"]
    try:
        specs, facts = make_bundle(ctx.inputs["export"], ctx.out, b, bundle_layout())
    except (FileNotFoundError, ValueError) as exc:
        raise StageError(f"cannot assemble the device bundle: {exc}") from exc
    metrics: dict[str, Any] = {**facts, "precisions": list(b["precisions"]),
                               "batch_profile": [b["min_batch"], b["opt_batch"], b["max_batch"]],
                               "fp32_neurons": b["fp32_neurons"]}
    backend = get_backend("tensorrt")
    ok, why = backend.is_available()
    metrics["tensorrt"] = backend.check_env()
    if not ok:
        script, guide = ctx.output("script").name, ctx.output("guide").name
        reason = (f"TensorRT engines not built on this machine: {why}. The bundle in this folder builds them on "
                  f"the target: ./{script} (trtexec) or python3 -m staa_runtime build (see {guide})")
        return StageResult(metrics=metrics, status="skipped", reason=reason)
    results = backend.build(BuildRequest(ctx.out, tuple(specs)))
    errors = {name: r["error"] for name, r in results.items() if "error" in r}
    if errors:
        raise StageError("TensorRT build failed: " + "; ".join(f"{n}: {e}" for n, e in errors.items()) +
                         f" (build logs in the build folder; {registry.file('export', 'trt_check')} lists static "
                         f"problems)")
    # whole-clip engines only (the ones the report measures); a step engine needs the StepRunner loop
    measured = {o.file for o in ctx.spec.outputs if o.kind == "engine" and o.backends}
    for spec in specs:
        if spec.engine in measured:
            results[spec.name]["sample_check"] = _engine_check(ctx.out, spec.engine)
    metrics["engines"] = results
    return StageResult(metrics=metrics)
