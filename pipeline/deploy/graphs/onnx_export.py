"""ONNX export of unrolled modules: export, full check, shape inference, metadata, spike probes.

Why the legacy exporter is the default: with plain-comparison spikes and the membrane created
inside ``forward`` both exporters give a static graph (docs/architecture.md §5, checked again here), the
legacy one is about 5x faster on these nets, and its Q/DQ export is the one the quantiser
recommends for TensorRT (no extra ``Clip`` between per-channel Q and DQ). ``export.dynamo: true``
switches to ``torch.export`` (needs onnxscript and opset >= 18).

Node names carry module scopes (``/layer1/layer1.0/sn1/lif/GreaterOrEqual``; dynamo graphs are
renamed the same way from their node metadata, :func:`scope_node_names`): that is how the build
finds the neuron layers to keep in FP32 inside FP16 engines.

Every graph gets one dynamic axis, the batch (named ``batch``), on every input and output.
"""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from pipeline.deploy.graphs.compact import prune_unused
from pipeline.models import neuron_modules, record_spikes

BATCH = "batch"
CONTROL_FLOW = ("Loop", "If", "Scan")
SPIKE_PREFIX = "spike:"


class ExportError(RuntimeError):
    """Export or the ONNX check failed; the message names the graph and the cause."""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' deprecation and tracer chatter (the checks below are what count)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def export_onnx(module: nn.Module, example: Sequence[torch.Tensor], path: Path, *, opset: int = 18,
                dynamo: bool = False, input_names: Sequence[str] = ("input",),
                output_names: Sequence[str] = ("logits",), static_inputs: Sequence[str] = ()) -> Path:
    """Export ``module(*example)`` to ``path`` with a dynamic batch axis on every tensor.

    ``static_inputs`` names inputs without a batch axis (e.g. the streaming graph's step index).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = tuple(example)
    module = module.eval()
    try:
        with torch.no_grad(), _quiet():
            if dynamo:
                if opset < 18:
                    raise ExportError(f"export.dynamo needs opset >= 18 (asked for {opset}); raise export.opset "
                                      f"or set export.dynamo: false")
                batch = torch.export.Dim(BATCH, min=1, max=4096)
                shapes = _dynamic_shapes(module, [None if n in static_inputs else {0: batch} for n in input_names])
                torch.onnx.export(module, example, str(path), dynamo=True, opset_version=opset,
                                  input_names=list(input_names), output_names=list(output_names),
                                  dynamic_shapes=shapes, external_data=False)
                scope_node_names(path)
            else:
                axes = {n: {0: BATCH} for n in list(input_names) + list(output_names) if n not in static_inputs}
                torch.onnx.export(module, example, str(path), dynamo=False, opset_version=opset,
                                  input_names=list(input_names), output_names=list(output_names),
                                  dynamic_axes=axes, do_constant_folding=True)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"torch.onnx.export ({'dynamo' if dynamo else 'legacy'}, opset {opset}) failed for "
                          f"{path.name}: {type(exc).__name__}: {exc}") from exc
    return path


def scope_node_names(path: Path) -> None:
    """Prefix dynamo-exported node names with their module scope, as the legacy exporter names them.

    ``node_ge_1`` whose ``pkg.torch.onnx.name_scopes`` is ``['', 'stem', 'stem.sn', 'stem.sn.lif',
    'ge_1']`` becomes ``/stem/sn/lif/node_ge_1``, so neuron layers are found by scope (FP32 pinning)
    whichever exporter wrote the graph.
    """
    import ast

    import onnx

    model = onnx.load(str(path))
    changed = False
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        raw = props.get("pkg.torch.onnx.name_scopes")
        if not raw or node.name.startswith("/"):
            continue
        try:
            scopes = [s for s in ast.literal_eval(raw)[:-1] if s]
        except (ValueError, SyntaxError):
            continue
        node.name = "/" + "".join(f"{s.rsplit('.', 1)[-1]}/" for s in scopes) + node.name
        changed = True
    if changed:
        onnx.save(model, str(path))


def _dynamic_shapes(module: nn.Module, per_input: list[Any]) -> tuple[Any, ...]:
    """``dynamic_shapes`` in the structure torch.export sees: a ``*args`` parameter is one tuple."""
    import inspect

    params = list(inspect.signature(module.forward).parameters.values())
    out: list[Any] = []
    for i, p in enumerate(params):
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            out.append(tuple(per_input[i:]))
            return tuple(out)
        if i < len(per_input):
            out.append(per_input[i])
    return tuple(out)


def _dims(value_info: Any) -> list[int | str | None]:
    out: list[int | str | None] = []
    for d in value_info.type.tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return out


def io_shapes(model: Any) -> tuple[dict[str, list], dict[str, list]]:
    """``({input: dims}, {output: dims})`` of a loaded ONNX model; dims are ints or symbol names."""
    inits = {i.name for i in model.graph.initializer}
    ins = {v.name: _dims(v) for v in model.graph.input if v.name not in inits}
    outs = {v.name: _dims(v) for v in model.graph.output}
    return ins, outs


def check_onnx(path: Path) -> dict[str, Any]:
    """``onnx.checker`` (full check) plus strict shape inference; returns a summary of the graph.

    Raises :class:`ExportError` naming the file and the checker's complaint.
    """
    import onnx

    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise ExportError(f"{path.name} fails the ONNX check: {type(exc).__name__}: {exc}") from exc
    ops = Counter(n.op_type for n in inferred.graph.node)
    ins, outs = io_shapes(inferred)
    opset = next((o.version for o in inferred.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "opset": opset, "nodes": len(inferred.graph.node), "op_counts": dict(sorted(ops.items())),
        "control_flow": sorted(op for op in ops if op in CONTROL_FLOW), "inputs": ins, "outputs": outs,
        "bytes": path.stat().st_size,
    }


def write_metadata(path: Path, props: Mapping[str, Any]) -> None:
    """Set ``metadata_props`` (values JSON-encoded unless already strings); replaces same-name keys."""
    import onnx

    model = onnx.load(str(path))
    keep = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    onnx.save(model, str(path))


def read_metadata(path: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def deploy_metadata(info: Any, *, precision: str, pipeline_version: str, config_hash: str,
                    input_encoding: str = "", extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a device needs to feed the graph and read its output (stored in every ONNX file)."""
    meta = info.data_meta
    if meta.get("is_event"):
        layout = f"NTCHW float32: event frames, T={info.T} steps"
    else:
        layout = f"NCHW float32: one normalised image, repeated over T={info.T} steps inside the graph"
    props: dict[str, Any] = {
        "T": str(info.T), "precision": precision, "num_classes": str(meta.get("num_classes", "")),
        "class_names": list(meta.get("class_names", [])), "mean": list(meta.get("mean", [])),
        "std": list(meta.get("std", [])), "input_layout": layout, "input_encoding": input_encoding,
        "image_size": list(meta.get("image_size", [])), "dataset": str(meta.get("dataset", "")),
        "output": "logits [batch, num_classes], averaged over T", "pipeline_version": pipeline_version,
        "config_hash": config_hash, "bn_folded": str(bool(info.bn_folded)).lower(),
    }
    props.update(extra or {})
    return props


def strip_outputs(src: Path, dst: Path, keep: Sequence[str]) -> Path:
    """Copy ``src`` to ``dst`` keeping only the graph outputs ``keep``; nodes and initializers
    that no longer feed any kept output are removed.

    The export stage exports once with spike probes as extra outputs (:class:`SpikeProbe`) and
    derives the deployed graph by dropping them, so spikes are measured on the very computation
    that ships, and each graph is traced once.
    """
    import onnx

    model = onnx.load(str(src))
    g = model.graph
    outputs = [o for o in g.output if o.name in keep]
    if len(outputs) != len(keep):
        raise ExportError(f"{src.name} lacks outputs {sorted(set(keep) - {o.name for o in outputs})}")
    del g.output[:]
    g.output.extend(outputs)
    prune_unused(model)
    onnx.save(model, str(dst))
    return Path(dst)


class SpikeProbe(nn.Module):
    """Wrap a model so that its neuron outputs become graph outputs ``spike:<layer>`` after logits.

    Spikes are returned batch-first (``[B, T, ...]``) so the batch is axis 0 of every output.

    Exported once next to the real graph, it measures per-layer spike agreement in ONNX Runtime
    without editing the deployed graph.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.names = [name for name, _ in neuron_modules(model)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with record_spikes(self.model) as store:
            logits = self.model(x)
            spikes = [store[n].transpose(0, 1) for n in self.names]  # [B, T, ...]: batch first
        return (logits, *spikes)

    @property
    def output_names(self) -> list[str]:
        return ["logits"] + [SPIKE_PREFIX + n for n in self.names]


def neuron_scopes(model: nn.Module) -> list[str]:
    """Node-name scopes of the neurons in a legacy-exported graph (``/layer1/layer1.0/sn1/lif/``).

    The legacy exporter names a node ``/<scope>/<Op>``, where the scope repeats the path of the
    modules whose ``forward`` ran, each written relative to its parent with containers spelled out.
    Rather than re-derive that spelling, match on the last component: every neuron attribute is
    named ``lif`` in the backbones, so its scope is the path segment ``/<attr>/``.
    """
    return sorted({"/" + name.rsplit(".", 1)[-1] + "/" for name, _ in neuron_modules(model)})


def neuron_nodes(path: Path, scopes: Sequence[str]) -> dict[str, Any]:
    """ONNX nodes inside neuron scopes, split by what TensorRT precision pinning may touch.

    ``compute``: names of nodes with a float input (membrane arithmetic, the threshold compare):
    their layer precision can be pinned to FP32. ``float_out``: ``{name: number of outputs}`` of
    nodes whose outputs are all float (trtexec wants one type per output, joined by ``+``).
    Constants are left out (they become weights).
    """
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    for node in model.graph.node:
        if node.op_type == "Constant":
            for out in node.output:
                types[out] = next((a.t.data_type for a in node.attribute if a.name == "value"), 0)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    compute: list[str] = []
    float_out: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Constant" or not any(s in node.name for s in scopes):
            continue
        if any(types.get(i) in floats for i in node.input if i):
            compute.append(node.name)
        if node.output and all(types.get(o) in floats for o in node.output):
            float_out[node.name] = len(node.output)
    return {"compute": compute, "float_out": float_out}
