"""Export one graph and prove it: compaction, ONNX check, metadata, ONNX Runtime parity, TensorRT static check.

Every check runs on the final file: the graph is compacted (weight Q/DQ folded to int8
initializers, simplified by onnxslim: :mod:`pipeline.deploy.graphs.compact`) before it is checked,
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
from ..graphs.compact import compact_onnx, file_stats
from ..graphs.onnx_export import (SPIKE_PREFIX, SpikeProbe, check_onnx, export_onnx, neuron_scopes,
                                  strip_outputs, write_metadata)
from ..graphs.streaming import build_streaming
from .parity import ParityReport, SpikeFn, compare, torch_with_spikes
from .trt_check import TrtCheckReport, check_model


@dataclass(frozen=True)
class Gates:
    """Tolerances of one comparison (see :mod:`pipeline.deploy.proofs.parity`)."""

    max_abs_diff: float
    min_spike_agreement: float | None
    tie_tol: float
    flip_margin: float = 1e-4
    max_numerical_share: float = 1.0  # of the images excused as rounding flips (see pipeline.deploy.proofs.parity)


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


class _StepProbe(nn.Module):
    """A :class:`~pipeline.deploy.graphs.streaming.StreamingNet` whose step spikes are extra outputs ``spike:<layer>``
    (``[B, ...]``, one step), after the deployed outputs: exported once, the shipped step graph is this one with
    the extra outputs stripped, so spikes are measured on the computation that ships."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.names = list(net.state_layers)

    def forward(self, frame: torch.Tensor, step: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(frame, step, *state)
        return (*out, *[m.spikes[0] for m in self.net._neurons])

    @property
    def output_names(self) -> list[str]:
        return list(self.net.output_names) + [SPIKE_PREFIX + n for n in self.names]


def _stream_outputs(runner: Any, state: Mapping[str, list[int]], T: int, x: np.ndarray) -> tuple[np.ndarray, dict]:
    """A clip through a step-graph runner: (mean logits, ``{layer: spikes [T, B, ...]}`` when it has spike outputs)."""
    from pipeline.runtime.stream import state_output

    feeds_state = {n: np.zeros((x.shape[0], *s), np.float32) for n, s in state.items()}
    total, spikes = None, {}
    for t in range(T):
        frame = x[:, t] if x.ndim == 5 else x
        feeds = {"input": np.ascontiguousarray(frame, np.float32), **feeds_state}
        if "step" in runner.input_names:
            feeds["step"] = np.array([t], np.int64)
        out = runner.run(feeds)
        feeds_state = {n: out[state_output(n)] for n in feeds_state}
        logits = np.asarray(out["logits_step"], np.float32)
        total = logits.copy() if total is None else total + logits
        for k, v in out.items():
            if k.startswith(SPIKE_PREFIX):
                spikes.setdefault(k[len(SPIKE_PREFIX):], []).append(v)
    assert total is not None
    return total / T, {k: np.stack(v) for k, v in spikes.items()}


def _runtime_runners(runtime: str) -> Any:
    if runtime == "onnxruntime":
        return lambda p: OrtRunner(p, disabled_optimizers=EXACT_QDQ)
    from pipeline.runtime import OpenVinoRunner

    return lambda p: OpenVinoRunner(p)


def streaming_parity(step_probe: Path, step_graph: Path, full_probe: Path, state: Mapping[str, list[int]], T: int,
                     x: torch.Tensor, runtime: str, batch_size: int = 64) -> dict[str, Any]:
    """The step graph run T times vs the unrolled graph, both in ``runtime``: logits and every layer's spikes.

    ``max_abs_diff``: logits of the shipped step graph (``step_graph``) vs the unrolled graph (``full_probe``'s
    logits output); ``spikes_differing``: spike elements that differ, per layer, step probe vs unrolled probe.
    """
    open_runner = _runtime_runners(runtime)
    step, probe, full = open_runner(step_graph), open_runner(step_probe), open_runner(full_probe)
    worst, differing, total, top1 = 0.0, {}, 0, 0
    for xb in batches(x, batch_size):
        arr = xb.numpy()
        logits, _ = _stream_outputs(step, state, T, arr)
        _, step_spikes = _stream_outputs(probe, state, T, arr)
        outs = full.run({full.input_names[0]: arr})
        ref = np.asarray(outs["logits"], np.float32)
        worst = max(worst, float(np.abs(logits - ref).max()))
        top1 += int((logits.argmax(1) != ref.argmax(1)).sum())
        for name, s in step_spikes.items():
            want = np.swapaxes(outs[SPIKE_PREFIX + name], 0, 1)  # [T, B, ...]
            differing[name] = differing.get(name, 0) + int((s != want).sum())
            total += int(s.size)
    return {"runtime": runtime, "n": len(x), "max_abs_diff": worst, "top1_mismatches": top1,
            "spike_elements": total, "spikes_differing": sum(differing.values()),
            "layers_differing": sorted(k for k, v in differing.items() if v)}


def streaming_failures(res: Mapping[str, Any], max_abs_diff: float, what: str) -> list[str]:
    """Gate failures of one :func:`streaming_parity` result: spikes must be identical, logits within tolerance."""
    out = []
    if res["spikes_differing"]:
        out.append(f"{what} on {res['runtime']}: {res['spikes_differing']} of {res['spike_elements']} spikes differ "
                   f"from the unrolled graph's (layers {', '.join(res['layers_differing'][:3])}); the step graph must "
                   f"reproduce every spike: check the carried state (u_in/sa_in) and the step modules")
    if res["max_abs_diff"] > max_abs_diff:
        out.append(f"{what} on {res['runtime']}: T steps give logits {res['max_abs_diff']:.3g} from the unrolled "
                   f"graph's (tolerance {max_abs_diff:g}, export.max_abs_diff / int8_max_abs_diff)")
    return out


def export_streaming_verified(unrolled: nn.Module, x: torch.Tensor, path: Path, *, opset: int, dynamo: bool,
                              metadata: Mapping[str, Any], gates: Gates, reference: Path | None,
                              batch_size: int = 64, simplify: bool = True, work_dir: Path | None = None,
                              what: str = "streaming", runtimes: tuple[str, ...] = ("onnxruntime", "openvino"),
                              ) -> tuple[dict[str, Any], list[str], TrtCheckReport]:
    """Export the one-step graph of ``unrolled`` (float or Q/DQ), compact it, and check that T steps reproduce
    the unrolled graph on ``x``: identical spikes and logits within ``gates.max_abs_diff``, on every runtime.

    The step graph is exported once with its spikes as extra outputs (a probe, in ``work_dir``) and shipped
    with them stripped; the unrolled module is exported the same way (probe) for the reference spikes and
    logits, so graph is compared with graph in each runtime (a rounding-level spike flip against torch would
    cascade, see ``pipeline.deploy.proofs.parity``). OpenVINO is checked when it can load here, else recorded as
    unchecked with the reason. ``reference`` (the exported full graph), when given, is also compared in ONNX
    Runtime on logits (``parity_vs_onnx``); the torch comparison is a record.
    """
    import tempfile

    net = build_streaming(unrolled, x[:2])
    frame = x[:2, 0] if x.dim() == 5 else x[:2]  # events [B, T, C, H, W]: one frame per step
    state = net.state_inputs()
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="step-probe-", dir=work_dir) as tmp:
        work = Path(tmp)
        probe_net = _StepProbe(net)
        step_probe = export_onnx(probe_net, net.example_inputs(frame), work / f"{path.stem}.probe.onnx", opset=opset,
                                 dynamo=dynamo, input_names=net.input_names, output_names=probe_net.output_names,
                                 static_inputs=("step",))
        before = file_stats(strip_outputs(step_probe, work / f"{path.stem}.raw.onnx", keep=net.output_names))
        compaction = compact_onnx(step_probe, fold_weights=True, slim=simplify)
        strip_outputs(step_probe, path, keep=net.output_names)
        compaction.update(before=before, after=file_stats(path))
        summary = check_onnx(path)
        write_metadata(path, dict(metadata, **net.metadata(), neuron_scopes=neuron_scopes(unrolled)))
        full_module = SpikeProbe(unrolled)
        full_probe = export_onnx(full_module, (x[:2],), work / "unrolled.probe.onnx", opset=opset, dynamo=dynamo,
                                 output_names=full_module.output_names)
        compact_onnx(full_probe, fold_weights=True, slim=simplify)
        runtimes_res: dict[str, Any] = {}
        for runtime in runtimes:
            try:
                res = streaming_parity(step_probe, path, full_probe, state, net.T, x, runtime, batch_size)
            except ImportError as exc:
                runtimes_res[runtime] = {"checked": False, "reason": f"{runtime} cannot be imported: {exc}"}
                continue
            except RuntimeError as exc:
                if runtime == "onnxruntime":
                    raise
                runtimes_res[runtime] = {"checked": False, "reason": f"{runtime}: {exc}"}
                continue
            runtimes_res[runtime] = {"checked": True, **res}
            failures += streaming_failures(res, gates.max_abs_diff, what)
    stepper = StepRunner(OrtRunner(path, disabled_optimizers=EXACT_QDQ), state, net.T)
    full = OrtRunner(reference, disabled_optimizers=EXACT_QDQ) if reference is not None else None
    vs_torch, vs_graph = (ParityReport(gates.tie_tol, gates.flip_margin, gates.max_numerical_share) for _ in range(2))
    with torch.no_grad():
        for xb in batches(x, batch_size):
            streamed = stepper.run(xb.numpy())
            vs_torch.update(unrolled(xb), streamed)
            if full is not None:
                vs_graph.update(full.predict(xb.numpy()), streamed)
    if full is not None:
        failures += vs_graph.failures(gates.max_abs_diff, None, f"{what} vs the exported unrolled graph")
        quantisers = {"step": summary["op_counts"].get("QuantizeLinear", 0),
                      "unrolled": check_onnx(reference)["op_counts"].get("QuantizeLinear", 0)}
        if quantisers["step"] != quantisers["unrolled"]:
            # a lost spike quantiser is exact on 0/1 spikes, so parity alone would not show it
            failures.append(f"{what}: the step graph has {quantisers['step']} QuantizeLinear nodes, the unrolled graph "
                            f"{quantisers['unrolled']}: the step module must run every quantiser of the unrolled one "
                            f"(pipeline/deploy/graphs/streaming.py)")
    if summary["control_flow"]:
        failures.append(f"{what}: the graph has control flow ({', '.join(summary['control_flow'])}); it must be static")
    metrics = {"check": summary, "parity_vs_torch": vs_torch.metrics(),
               "parity_vs_onnx": vs_graph.metrics() if full is not None else None,
               "parity_runtimes": runtimes_res, "state_tensors": len(net.state_shapes),
               "quantizers": quantisers if full is not None else None,
               "sa_state_tensors": len(net.sa_shapes), "T": net.T, "compact": compaction}
    return metrics, failures, check_model(path)
