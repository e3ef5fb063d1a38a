"""Find every artifact of a run and say how to load it, which gate guards it and what it came from.

Why a separate module: the validate stage must treat a float checkpoint, a QAT model, an
unrolled module, an ONNX file (under ONNX Runtime and under OpenVINO) and a TensorRT engine the
same way (one runner each), and the report must explain every row, including the ones that could
not run (a skipped build, OpenVINO not installed). This module only *lists*; loading happens
lazily through ``Artifact.opener`` so that a broken artifact becomes one failed row, not a crashed
stage.

The rows come from the stage table alone (a :class:`pipeline.stage_table.Table` the validate stage
hands in: ``registry.table()``): one row per declared output and backend, so a stage added through
a registry row shows in the report with no change here. A row's name is the output's
``<stage>/<file>`` (``Table.artifact``) for its first
backend and ``<stage>/<file>@<backend>`` for the others; its runner comes from the backend registry
(``pipeline.runtime.backends``), a torch model's loader from the output's kind.

Gate parents (``validate.gate_reference: parent``, the default) follow each output's declared
``parent``: each compression step is gated against the artifact it was made from, so the config's
tolerances mean "what this step may cost": reduced T vs the float baseline; QAT vs the float model
at its T (``FLOAT_AT_T``); unrolled vs its torch source; ONNX (ONNX Runtime and OpenVINO rows
alike) vs the unrolled module; engines vs their ONNX. With ``baseline`` every gate compares
against the float baseline instead (cumulative cost).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from pipeline.artifacts import MANIFEST
from pipeline.checkpoint import load_model
from pipeline.compress.quantize import load_qat_model
from pipeline.deploy.graphs.onnx_export import read_metadata
from pipeline.deploy.graphs.unroll import load_unrolled
from pipeline.runtime import specs
from pipeline.runtime.backends import get_backend
from pipeline.schema import SCHEMA, defaults
from pipeline.stage_table import FLOAT_AT_T, PRECISIONS, Output, Table

OPENVINO_SUFFIX = "@openvino"  # "export/model_int8.onnx@openvino": the same file, compiled by OpenVINO
# runner options per backend, the spec rows' defaults: the report measures what the graph asks for
# (OpenVINO would otherwise be free to run an FP32 graph in bf16 on CPUs that have it)
RUNNER_OPTIONS: Mapping[str, Mapping[str, Any]] = specs.column("defaults")


@dataclass
class Loaded:
    """What opening an artifact gives: a runner, and the torch module behind it (None for graphs)."""

    runner: Any  # pipeline.runtime.base.Runner
    module: Any = None  # torch.nn.Module for torch artifacts (firing rates, SOPs)
    T: int | None = None


@dataclass
class Artifact:
    """One row of the report before it is measured."""

    name: str  # "<stage>/<file>" (+ "@<backend>" after an output's first backend), unique in the run
    stage: str
    backend: str  # "torch", "onnxruntime", "openvino", "tensorrt"
    precision: str  # "fp32", "fp16", "int8"
    T: int | None
    path: Path | None
    gate: str | None = None  # key of validate.gates, None for the baseline
    parent: str | None = None  # artifact it was made from (gate reference in "parent" mode)
    identity: str | None = None  # key of validate.changed: the row must compute identity_parent's function
    identity_parent: str | None = None  # the row it must equal (its parent, or the file's exact-backend row)
    status: str = "ok"  # "ok" or "skipped: <reason>"
    opener: Callable[[], Loaded] | None = None
    energy_from: str | None = None  # graph rows inherit ops from this torch artifact
    notes: list[str] = field(default_factory=list)
    ships: bool = False  # a deployable graph (ONNX, engine): also gated against the float baseline
    kind: str = ""  # the output's registry kind ("checkpoint", "onnx", ...)

    @property
    def size_mb(self) -> float | None:
        return self.path.stat().st_size / 2**20 if self.path is not None and self.path.is_file() else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


# --- loaders and runners ---------------------------------------------------------------------------

def _float(path: Path, T: int | None) -> tuple[Any, int | None]:
    model, _ = load_model(path)
    return model, model.T


def _qat(path: Path, T: int | None) -> tuple[Any, int | None]:
    model, _ = load_qat_model(path)
    return model.eval(), getattr(model, "T", T)


def _unrolled(path: Path, T: int | None) -> tuple[Any, int | None]:
    module, info = load_unrolled(path)
    return module, info.T


# registry kind -> (path, T from the inventory) -> (torch module in eval mode, its T)
TORCH_LOADERS: dict[str, Callable[[Path, int | None], tuple[Any, int | None]]] = {
    "checkpoint": _float, "qat_checkpoint": _qat, "unrolled": _unrolled,
}


def _opener(kind: str, backend: str, path: Path, precision: str, T: int | None, device: str,
            input_shape: tuple[int | None, ...]) -> Callable[[], Loaded]:
    """Open lazily: a torch output through its kind's loader and the torch backend's runner, a graph
    (ONNX, engine) directly through its backend's runner."""
    if backend == "torch":
        def open_torch() -> Loaded:  # an unknown kind fails its own row when opened, not the inventory
            if kind not in TORCH_LOADERS:
                raise ValueError(f"no torch loader for outputs of kind {kind!r}; known: {', '.join(TORCH_LOADERS)}")
            module, steps = TORCH_LOADERS[kind](path, T)
            runner = get_backend("torch").runner(module, precision=precision, device=device, input_shape=input_shape)
            return Loaded(runner, module, steps)
        return open_torch

    def open_graph() -> Loaded:
        return Loaded(get_backend(backend).runner(path, precision=precision, **RUNNER_OPTIONS.get(backend, {})))
    return open_graph


# --- time steps ------------------------------------------------------------------------------------

def _graph_T(path: Path) -> int | None:
    try:
        return int(read_metadata(path).get("T", ""))
    except Exception:  # metadata absent or unreadable: the row still runs
        return None


def _steps(o: Output, path: Path, values: dict[str, str], metrics: dict[str, Any], model_T: int,
           current_T: int) -> int | None:
    """The row's T, from where the registry says it is recorded (``Output.steps_from``; "parent" is
    resolved by the caller)."""
    if o.steps_from == "config":
        return model_T
    if o.steps_from == "name":
        return int(values["T"])
    if o.steps_from == "metrics":
        return metrics.get("T", current_T)
    if o.steps_from == "metadata":
        return _graph_T(path)
    raise ValueError(f"unknown steps_from {o.steps_from!r}")


# --- discovery -------------------------------------------------------------------------------------

def _stage_metrics(table: Table, stage: str, folder: Path) -> dict[str, Any]:
    """The stage's metrics.json (its manifest's copy when the file is absent)."""
    files = [o.file for o in table.spec(stage).outputs if o.kind == "metrics"]
    found = _read_json(folder / files[0]) if files else {}
    return found or _read_json(folder / MANIFEST).get("metrics", {})


def _present(o: Output, folder: Path) -> list[tuple[Path, dict[str, str]]]:
    """The files of ``o`` in ``folder``: one (path, placeholder values) per file; a family by T, highest first."""
    if not o.fields:
        path = folder / o.file
        return [(path, {})] if path.is_file() else []
    found = [(p, v) for p in folder.iterdir() if p.is_file() and (v := o.match(p.name)) is not None]
    return sorted(found, key=lambda pv: (-int(pv[1].get("T", 0)), pv[0].name))


def _planned(stage: str, metrics: dict[str, Any]) -> list[str]:
    """The precisions a stage meant to build (its metrics' record, else its config section's default)."""
    planned = metrics.get("precisions")
    if planned is None and isinstance(SCHEMA.get(stage), dict):
        planned = defaults(SCHEMA[stage]).get("precisions")
    return list(planned) if planned is not None else list(PRECISIONS)


def _skipped(table: Table, stage: str, folder: Path, metrics: dict[str, Any]) -> str | None:
    """``skipped: <reason>`` when the stage recorded a skip or left every optional model out, else None."""
    manifest = _read_json(folder / MANIFEST)
    optional = [o for s, o in table.measured() if s == stage and o.optional]
    if manifest.get("status") != "skipped" and any(_present(o, folder) for o in optional):
        return None
    what = optional[0].kind if optional else "output"
    return "skipped: " + (manifest.get("reason") or metrics.get("reason") or f"no {what} was built")


def _float_at(table: Table, rows: list[Artifact], T: int | None) -> str:
    """:data:`FLOAT_AT_T`: the float torch checkpoint at ``T`` (the baseline or a reduced-T one)."""
    for a in rows:
        if a.kind == "checkpoint" and a.backend == "torch" and a.precision == "fp32" and a.T == T:
            return a.name
    return table.baseline_artifact()


def _row_name(table: Table, stage: str, o: Output, backend: str, values: dict[str, Any]) -> str:
    name = table.artifact(stage, o.role, **values)
    return name if backend == o.backends[0] else f"{name}@{backend}"


def _parent(table: Table, o: Output, rows: list[Artifact], T: int | None) -> str | None:
    if o.parent is None:
        return None
    if o.parent == FLOAT_AT_T:
        return _float_at(table, rows, T)
    stage, p = table.ref(o.parent)
    return table.artifact(stage, p.role, **({"T": T} if p.fields else {}))


def _energy_from(table: Table, stage: str, o: Output, T: int | None) -> str | None:
    """The torch artifact whose operation counts a graph row inherits (None for torch rows)."""
    if "torch" in o.backends:
        return None
    src = table.torch_source(stage, o.role)
    if src is None:
        return None
    return table.artifact(src[0], src[1].role, **({"T": T} if src[1].fields else {}))


def discover(inputs: dict[str, Path], model_T: int, device: str, input_shape: tuple[int | None, ...],
             table: Table) -> list[Artifact]:
    """Every measured output under the upstream stage folders, one row per backend, baseline first,
    in pipeline order (``table``: the stage table, ``registry.table()``).

    ``inputs``: stage name -> finished stage folder (stages not given are not listed);
    ``model_T``: ``model.T`` (outputs whose T comes from the config); ``input_shape``: the model
    input with ``None`` for the batch axis (torch runners build timing inputs from it).
    """
    rows: list[Artifact] = []
    available: dict[str, tuple[bool, str]] = {}
    chosen_T: int | None = None  # the T a stage handed on (reduce_t's chosen_T), for stages that omit it
    for s in table.stages():
        folder = inputs.get(s.name)
        if folder is None:
            continue
        outputs = [o for o in s.outputs if o.backends]
        metrics = _stage_metrics(table, s.name, folder)
        skipped = _skipped(table, s.name, folder, metrics) if any(o.optional for o in outputs) else None
        for o in outputs:
            files = _present(o, folder)
            if o.baseline and not files:
                files = [(folder / o.file, {})]  # validate says it is missing and what to do
            if o.optional and skipped is not None:
                if o.precision in _planned(s.name, metrics):
                    rows += [_skipped_row(table, s.name, o, b, rows, skipped) for b in o.backends]
                continue
            for path, values in files:
                rows += _rows_of(table, s.name, o, path, values, metrics, rows, model_T, chosen_T or model_T,
                                 device, input_shape, available)
        if metrics.get("chosen_T") is not None:  # the T this stage handed on: mark its checkpoint
            chosen_T = metrics["chosen_T"]
            for a in rows:
                if a.stage == s.name and a.kind == "checkpoint" and a.T == chosen_T:
                    a.notes.append("chosen")
    return rows


def _rows_of(table: Table, stage: str, o: Output, path: Path, values: dict[str, str], metrics: dict[str, Any],
             rows: list[Artifact], model_T: int, current_T: int, device: str, input_shape: tuple[int | None, ...],
             available: dict[str, tuple[bool, str]]) -> list[Artifact]:
    """One row per backend of one file.

    The first backend is the one the stage made the file for: if it cannot run here the row fails
    when opened (an error, and its gate with it). Further backends (OpenVINO for the ONNX graphs) are
    extra measurements: one that is not installed gives a skipped row with its reason.
    """
    if o.steps_from == "parent":  # T comes from the parent row, so the parent cannot depend on T
        parent = _parent(table, o, rows, None)
        T = next((a.T for a in rows if a.name == parent), None)
    else:
        T = _steps(o, path, values, metrics, model_T, current_T)
        parent = None if o.baseline else _parent(table, o, rows, T)
    out = []
    for backend in o.backends:
        if backend not in available:
            available[backend] = get_backend(backend).is_available()
        ok, reason = available[backend] if backend != o.backends[0] else (True, "")
        identity, identity_parent = _identity(table, stage, o, backend, values, parent)
        out.append(Artifact(
            _row_name(table, stage, o, backend, values), stage, backend, o.precision, T, path, gate=o.gate, parent=parent,
            identity=identity, identity_parent=identity_parent,
            status="ok" if ok else f"skipped: {reason}",
            opener=_opener(o.kind, backend, path, o.precision, T, device, input_shape) if ok else None,
            energy_from=_energy_from(table, stage, o, T), notes=list(o.notes), ships=o.ships, kind=o.kind))
    return out


def _identity(table: Table, stage: str, o: Output, backend: str, values: dict[str, Any],
              parent: str | None) -> tuple[str | None, str | None]:
    """(validate.changed key, the row this one must equal): a further backend of an output with a
    ``runtime_identity`` is held to the first backend's row of the same file, others to their parent."""
    if backend != o.backends[0] and o.runtime_identity is not None:
        return o.runtime_identity, _row_name(table, stage, o, o.backends[0], values)
    return (o.identity, parent) if o.identity is not None else (None, None)


def _skipped_row(table: Table, stage: str, o: Output, backend: str, rows: list[Artifact], status: str) -> Artifact:
    """An output the stage did not make (e.g. no TensorRT here): a row that says why, with its gate
    (and its parent's T, where the output takes its T from the parent)."""
    parent = _parent(table, o, rows, None)
    T = next((a.T for a in rows if a.name == parent), None) if o.steps_from == "parent" else None
    identity, identity_parent = _identity(table, stage, o, backend, {}, parent)
    return Artifact(_row_name(table, stage, o, backend, {}), stage, backend, o.precision, T, None, gate=o.gate,
                    parent=parent, identity=identity, identity_parent=identity_parent, status=status,
                    notes=list(o.notes), ships=o.ships, kind=o.kind)


def upstream_parity(inputs: dict[str, Path], table: Table) -> dict[str, dict[str, Any]]:
    """``{"<stage>/<graph>": parity metrics}`` as the upstream stages (unroll, export) reported them.

    Why copied, not recomputed: those stages already compared each graph with its source on
    real images, layer by layer (max abs diff of the logits, top-1 mismatches, spike agreement
    per neuron layer); the report repeats their numbers so that one file tells the whole story.
    """
    out: dict[str, dict[str, Any]] = {}
    for stage in table.names():
        folder = inputs.get(stage)
        if folder is None:
            continue
        for graph, value in _stage_metrics(table, stage, folder).items():
            if isinstance(value, dict) and isinstance(value.get("parity"), dict):
                out[f"{stage}/{graph}"] = dict(value["parity"])
    return out


__all__ = ["Artifact", "Loaded", "OPENVINO_SUFFIX", "RUNNER_OPTIONS", "TORCH_LOADERS", "discover",
           "upstream_parity"]
