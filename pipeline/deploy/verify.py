"""Export one graph and prove it: compaction, ONNX check, metadata, ONNX Runtime parity, TensorRT static check.

Every check runs on the final file: the graph is compacted (weight Q/DQ folded to int8
initializers, simplified by onnxslim: :mod:`pipeline.deploy.compact`) before it is checked,
compared with torch and statically checked for TensorRT.

The export stage calls :func:`export_verified` for the FP32 and INT8 graphs and
:func:`export_streaming_verified` for the one-step graph; each returns its metrics, the gate
failures (empty when all pass) and the static TensorRT report.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from pipeline.runtime import OrtRunner, StepRunner
from pipeline.runtime.backends.onnxruntime import EXACT_QDQ
from .compact import compact_onnx, file_stats
from .onnx_export import (SPIKE_PREFIX, SpikeProbe, check_onnx, export_onnx, neuron_scopes, strip_outputs,
                          write_metadata)
from .parity import ParityReport, SpikeFn, compare, torch_with_spikes
from .streaming import STATE_IN, build_streaming
from .trt_check import TrtCheckReport, check_model


@dataclass(frozen=True)
class Gates:
    """Tolerances of one comparison (see :mod:`pipeline.deploy.parity`)."""

    max_abs_diff: float
    min_spike_agreement: float | None
    tie_tol: float
    flip_margin: float = 1e-4
    max_numerical_share: float = 1.0  # of the images excused as rounding flips (see pipeline.deploy.parity)


def batches(x: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(x), size):
        yield x[i:i + size]


def ort_candidate(graph: Path, probe: Path | None = None, threads: int | None = None,
                  ort_defaults: bool = False) -> SpikeFn:
    """``x -> (logits from graph, spikes from the probe graph)`` through ONNX Runtime.

    Exact graph semantics unless ``ort_defaults`` (see ``pipeline.runtime.backends.onnxruntime``).
    """
    disabled = () if ort_defaults else EXACT_QDQ
    real = OrtRunner(graph, threads=threads, disabled_optimizers=disabled)
    spy = OrtRunner(probe, threads=threads, disabled_optimizers=disabled) if probe is not None else None

    def run(x: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        arr = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
        logits = real.predict(arr)
        spikes: dict[str, np.ndarray] = {}
        if spy is not None:
            outs = spy.run({spy.input_names[0]: arr})
            spikes = {k[len(SPIKE_PREFIX):]: np.swapaxes(v, 0, 1) for k, v in outs.items() if k.startswith(SPIKE_PREFIX)}
        return logits, spikes

    return run


def prove_graph(reference: SpikeFn, path: Path, probe: Path | None, x: torch.Tensor, gates: Gates, what: str,
                batch_size: int = 64) -> tuple[ParityReport, list[str]]:
    """Export's parity gates: the graph at ``path`` (spikes read from its ``probe`` twin) in ONNX Runtime
    against ``reference`` (a torch module's logits, spikes and membranes) on the inputs ``x``."""
    report = compare(reference, ort_candidate(path, probe), batches(x, batch_size), gates.tie_tol, gates.flip_margin,
                     max_numerical_share=gates.max_numerical_share)
    return report, report.failures(gates.max_abs_diff, gates.min_spike_agreement, what)


def export_verified(module: nn.Module, x: torch.Tensor, path: Path, *, opset: int, dynamo: bool,
                    metadata: Mapping[str, Any], gates: Gates, what: str, work_dir: Path,
                    batch_size: int = 64, simplify: bool = True) -> tuple[dict[str, Any], list[str], TrtCheckReport]:
    """Export ``module`` to ``path``, compact it, and run every check on the real inputs ``x``.

    One trace: the module is exported with its spikes as extra outputs (the probe graph, kept in
    ``work_dir``); the probe is compacted (weight Q/DQ folded, simplified unless ``simplify`` is
    false), and the deployed graph is that graph with the extra outputs stripped, so spikes are
    measured on the computation that ships. ``metrics["compact"]`` holds node counts and bytes
    before (the exporter's graph) and after.
    """
    example = (x[:2],)
    probe_module = SpikeProbe(module)
    probe = export_onnx(probe_module, example, Path(work_dir) / f"{path.stem}.probe.onnx", opset=opset,
                        dynamo=dynamo, output_names=probe_module.output_names)
    raw = strip_outputs(probe, Path(work_dir) / f"{path.stem}.raw.onnx", keep=["logits"])
    compaction = compact_onnx(probe, fold_weights=True, slim=simplify)
    strip_outputs(probe, path, keep=["logits"])
    summary = check_onnx(path)
    write_metadata(path, dict(metadata, neuron_scopes=neuron_scopes(module)))
    compaction.update(before=file_stats(raw), after=file_stats(path))
    reference = torch_with_spikes(module)
    report, failures = prove_graph(reference, path, probe, x, gates, what, batch_size)
    if summary["control_flow"]:
        failures.append(f"{what}: the graph has control flow ({', '.join(summary['control_flow'])}); it must be static")
    metrics: dict[str, Any] = {"check": summary, "parity": report.metrics(), "compact": compaction}
    if any(op in summary["op_counts"] for op in ("QuantizeLinear", "DequantizeLinear")):
        # information, not a gate: ONNX Runtime with every default transformer (it quantises conv biases)
        defaults = compare(reference, ort_candidate(path, probe, ort_defaults=True), batches(x, batch_size),
                           gates.tie_tol, gates.flip_margin)
        metrics["parity_ort_defaults"] = {k: v for k, v in defaults.metrics().items() if k != "spike_agreement"}
    return metrics, failures, check_model(path)


def export_streaming_verified(unrolled: nn.Module, x: torch.Tensor, path: Path, *, opset: int, dynamo: bool,
                              metadata: Mapping[str, Any], gates: Gates, reference: Path | None,
                              batch_size: int = 64, simplify: bool = True) -> tuple[dict[str, Any], list[str], TrtCheckReport]:
    """Export the one-step graph, simplify it, and check that T steps reproduce the unrolled graph on ``x``.

    Gated against the exported full graph ``reference`` in ONNX Runtime when given (else against
    the unrolled torch module); the torch comparison is always recorded.
    """
    net = build_streaming(unrolled, x[:2])
    frame = x[:2, 0] if x.dim() == 5 else x[:2]  # events [B, T, C, H, W]: one frame per step
    export_onnx(net, net.example_inputs(frame), path, opset=opset, dynamo=dynamo, input_names=net.input_names,
                output_names=net.output_names, static_inputs=("step",))
    before = file_stats(path)
    compaction = compact_onnx(path, fold_weights=False, slim=simplify)
    compaction.update(before=before, after=file_stats(path))
    summary = check_onnx(path)
    write_metadata(path, dict(metadata, **net.metadata(), neuron_scopes=neuron_scopes(unrolled)))
    shapes = {f"{STATE_IN}{i}": list(s) for i, s in enumerate(net.state_shapes)}
    stepper = StepRunner(OrtRunner(path), shapes, net.T)
    full = OrtRunner(reference) if reference is not None else None
    vs_torch, vs_graph = (ParityReport(gates.tie_tol, gates.flip_margin, gates.max_numerical_share) for _ in range(2))
    with torch.no_grad():
        for xb in batches(x, batch_size):
            streamed = stepper.run(xb.numpy())
            vs_torch.update(unrolled(xb), streamed)
            if full is not None:
                vs_graph.update(full.predict(xb.numpy()), streamed)
    # the gate compares graph with graph (same runtime, same kernels); against torch it is a record,
    # since a rounding-level spike flip there would cascade (see pipeline.deploy.parity)
    if full is not None:
        failures = vs_graph.failures(gates.max_abs_diff, None, "streaming vs unrolled ONNX")
    else:
        failures = vs_torch.failures(gates.max_abs_diff, None, "streaming vs unrolled torch")
    metrics = {"check": summary, "parity_vs_torch": vs_torch.metrics(),
               "parity_vs_onnx": vs_graph.metrics() if full is not None else None,
               "state_tensors": len(net.state_shapes), "T": net.T, "compact": compaction}
    return metrics, failures, check_model(path)
