"""The stage registry: the one table that names every stage, what it reads and what it makes.

The CLI (`python -m pipeline.stage NAME`), `python -m pipeline run|status`, the Makefile's
targets, the cache keys and the report all read this table, so adding a stage is one module
(``StageSpec.module``, ``stages.<name>`` unless the row says otherwise) plus one row here (plus
its schema section and config keys).

Each row declares the inputs it reads (``"model=reduce_t.chosen"``; ``needs`` is derived from
them, see :class:`StageSpec`) and its outputs (:class:`Output`): the file, what kind of thing it
is, which runtimes measure it, at which precision, what it was made from (``parent``) and which
gate guards it. Code names a file through the table (``registry.file("export", "onnx_fp32")``,
``StageContext.output``/``StageContext.input``), never as a string literal, so a file is named
in one place and the report's inventory can be derived from the table alone. Only the
orchestration imports this module; a library that reads the table is handed ``table()``.

The types live in pipeline/stage_table.py (re-exported here). Stdlib only: the Makefile imports
this module before the venv exists.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from pipeline.runtime.specs import NAMES as BACKEND_NAMES
from pipeline.schema import SCHEMA
from pipeline.stage_table import (FLOAT_AT_T, KINDS, PRECISIONS, STEPS_FROM, WILDCARD, Output,  # noqa: F401
                                  StageSpec, Table, _parse_input, _wire)

BACKENDS = BACKEND_NAMES  # the backend table's names, live (pipeline/runtime/specs.py)


def _metrics() -> Output:
    return Output("metrics", "metrics.json", "metrics", help="the stage's numbers (also in manifest.json)")


def _training_logs() -> tuple[Output, Output]:
    """What every fitting stage writes beside its metrics: per-epoch rows and TensorBoard scalars."""
    return (Output("history", "history.csv", "log", help="one row per epoch: loss, top-1, lr, seconds"),
            Output("tb", "tb/", "log", help="TensorBoard log"))


_BUILTIN: tuple[StageSpec, ...] = (
    StageSpec("train", (), ("seed", "data", "model", "train"), (
        Output("best", "best.pt", "checkpoint", ("torch",), "fp32", baseline=True, steps_from="config",
               help="the float model at model.T, best validation epoch"),
        Output("last", "last.pt", "training_state", help="weights, optimiser, scheduler and history of the last epoch"),
        _metrics(),
        *_training_logs(),
    ), "train the float STAA-SNN at model.T time steps", distributed=True, fits=True),
    StageSpec("reduce_t", ("teacher=train.best",), ("reduce_t", "validate.gates.reduce_t"), (
        Output("reduced", "t{T}.pt", "checkpoint", ("torch",), "fp32", parent="train.best", gate="reduce_t",
               steps_from="name", help="the float model fine-tuned at T, one per T in reduce_t.steps"),
        Output("chosen", "chosen.pt", "checkpoint", help="a copy of the checkpoint handed to qat (reduce_t.choose)"),
        _metrics(),
        *_training_logs(),
    ), "fine-tune at fewer time steps, optionally distilling from the T-step teacher", fits=True),
    StageSpec("qat", ("model=reduce_t.chosen",), ("qat",), (
        Output("qat", "qat.pt", "qat_checkpoint", ("torch",), "int8", parent=FLOAT_AT_T, gate="qat",
               steps_from="metrics", help="NNCF config + state dict (fake-quant: the report says so from what ran)"),
        Output("nncf_config", "nncf_config.json", "config", help="the quantiser setup, readable"),
        _metrics(),
        *_training_logs(),
    ), "NNCF INT8 quantisation-aware fine-tuning (symmetric, per-channel weights)", fits=True),
    StageSpec("unroll", ("float=reduce_t.chosen", "int8=qat.qat"), ("unroll",), (
        Output("float", "float.pt", "unrolled", ("torch",), "fp32", parent=FLOAT_AT_T, gate="unroll",
               identity="unroll", steps_from="metrics", notes=("unrolled",)),
        Output("int8", "int8.pt", "unrolled", ("torch",), "int8", parent="qat.qat", gate="unroll",
               identity="unroll", steps_from="metrics", notes=("unrolled",)),
        _metrics(),
    ), "static, stateless modules: fixed T, BN folded, hard spikes; parity gates"),
    StageSpec("export", ("float=unroll.float", "int8=unroll.int8"), ("export",), (
        Output("onnx_fp32", "model_fp32.onnx", "onnx", ("onnxruntime", "openvino"), "fp32", parent="unroll.float",
               gate="onnx_fp32", identity="onnx_fp32", ships=True, steps_from="metadata", bundled=True),
        Output("onnx_int8", "model_int8.onnx", "onnx", ("onnxruntime", "openvino"), "int8", parent="unroll.int8",
               gate="onnx_int8", identity="onnx_int8", runtime_identity="runtime_int8", ships=True,
               steps_from="metadata", bundled=True),
        Output("step_fp32", "step_fp32.onnx", "onnx", (), "fp32", parent="unroll.float", optional=True, bundled=True,
               help="one time step with explicit membranes (needs a stateful driver; absent for SA models)"),
        Output("step_int8", "step_int8.onnx", "onnx", (), "int8", parent="unroll.int8", optional=True, bundled=True,
               help="the INT8 step graph: the unrolled INT8 graph's quantisers, one time step (absent for full-SA models)"),
        Output("nir", "model.nir", "nir", (), "fp32", parent="unroll.float", optional=True,
               help="NIR graph of a plain-LIF model (snnTorch, Norse, Sinabs, Lava, ...); absent with the reason "
                    "in metrics.json nir.skipped when a part has no NIR form (STAA, adaptive LIF)"),
        Output("samples", "sample_inputs.npz", "samples", bundled=True, help="parity images, labels, float logits"),
        Output("trt_check", "trt_check.json", "check", bundled=True, help="static TensorRT check of every graph"),
        _metrics(),
    ), "ONNX FP32 and INT8 (QDQ) with dynamic batch, a streaming graph, static TensorRT check; NIR for plain-LIF models"),
    StageSpec("build", ("export.*",), ("build",), (
        Output("engine_fp16", "model_fp16.engine", "engine", ("tensorrt",), "fp16", parent="export.onnx_fp32",
               gate="engine", ships=True, steps_from="parent", optional=True),
        Output("engine_int8", "model_int8.engine", "engine", ("tensorrt",), "int8", parent="export.onnx_int8",
               gate="engine", ships=True, steps_from="parent", optional=True),
        Output("engine_fp32", "model_fp32.engine", "engine", ("tensorrt",), "fp32", parent="export.onnx_fp32",
               gate="engine", ships=True, steps_from="parent", optional=True),
        Output("step_engine", "step_{precision}.engine", "engine", (), None, parent="export.step_fp32", optional=True,
               help="streaming engines (need a stateful driver)"),
        Output("step_engine_int8", "step_int8.engine", "engine", (), "int8", parent="export.step_int8", optional=True),
        Output("bundle", "bundle.json", "config", help="engine recipes, graphs and metadata of the device bundle"),
        Output("script", "build_engines.sh", "script", help="trtexec build and timing on the target"),
        Output("guide", "JETSON.md", "doc", help="how to build, check and time on a Jetson"),
        Output("intel_guide", "INTEL.md", "doc", help="the same graphs with OpenVINO on an Intel CPU, iGPU or NPU"),
        Output("runtime", "staa_runtime/", "folder", help="the standalone runner"),
        _metrics(),
    ), "TensorRT FP16/INT8 engines, or a skipped record and a trtexec script for the target"),
    StageSpec("validate", (WILDCARD,), ("validate",), (
        Output("report_md", "report.md", "report"),
        Output("report_json", "report.json", "report"),
        Output("plot", "{plot}.png", "plot", help="accuracy vs latency, firing rates, accuracy vs T"),
        _metrics(),
    ), "accuracy, agreement, latency, firing rates and energy of every artifact; gates"),
)

_rows: list[StageSpec] = list(_BUILTIN)  # the rows as declared, in run order
_table: list[StageSpec] = _wire(_rows)[0]  # the same rows wired (needs, wiring): what everything reads
_sections: set[str] = set()  # schema sections added by register()
# snapshots of the table, refreshed on register/unregister: code that must see a stage registered
# later (tests, plugins) calls stages()/names()/spec() instead of importing these
STAGES: tuple[StageSpec, ...] = tuple(_table)
BY_NAME: dict[str, StageSpec] = {s.name: s for s in STAGES}
NAMES: tuple[str, ...] = tuple(BY_NAME)


def table() -> Table:
    """The live table as a :class:`Table` (what a stage hands a library that reads the table)."""
    return Table(_table)


def stages() -> tuple[StageSpec, ...]:
    """Every registered stage (wired: ``needs`` and ``wiring`` filled in), in run order."""
    return tuple(_table)


def names() -> tuple[str, ...]:
    return table().names()


def spec(name: str) -> StageSpec:
    return table().spec(name)


def output(stage: str, role: str) -> Output:
    """The declared output ``role`` of ``stage`` (KeyError lists the stage's outputs)."""
    return table().output(stage, role)


def file(stage: str, role: str, **values: Any) -> str:
    """The file name of an output (``file("export", "onnx_fp32")`` -> ``model_fp32.onnx``)."""
    return table().file(stage, role, **values)


def path(folder: Path, stage: str, role: str, **values: Any) -> Path:
    """Where an output lies in ``folder`` (that stage's folder: ``ctx.out``, ``ctx.inputs[stage]``)."""
    return Path(folder) / file(stage, role, **values)


def artifact(stage: str, role: str, **values: Any) -> str:
    """The output's name in reports and gate messages: ``<stage>/<file>`` (``train/best.pt``)."""
    return table().artifact(stage, role, **values)


def ref(reference: str) -> tuple[str, Output]:
    """``"stage.role"`` (as in ``Output.parent``) -> (stage, Output)."""
    return table().ref(reference)


def baseline() -> tuple[str, Output]:
    """The float reference output (``train.best``)."""
    return table().baseline()


def torch_source(stage: str, role: str) -> tuple[str, Output] | None:
    """The first torch model up the parent chain of an output (see :meth:`Table.torch_source`)."""
    return table().torch_source(stage, role)


def measured() -> list[tuple[str, Output]]:
    """(stage, output) for every output a report measures, in pipeline order."""
    return table().measured()


def upstream(name: str) -> tuple[str, ...]:
    """``name``'s upstream stages, transitively, in run order."""
    return table().upstream(name)


def config_sections(name: str) -> tuple[str, ...]:
    """The config keys that decide ``name``'s outputs (see :meth:`Table.config_sections`)."""
    return table().config_sections(name)


def check(rows: tuple[StageSpec, ...] | list[StageSpec] | None = None) -> list[str]:
    """Problems in the table (empty when sound): inputs or feeds that name no output of an earlier
    stage (dangling roles), unknown kinds/backends/precisions, repeated names or roles, parents
    that name no output, gates that are no key of ``validate.gates``."""
    rows = list(_rows if rows is None else rows)
    problems: list[str] = []
    if len({s.name for s in rows}) == len(rows):  # wiring needs unique names; a repeat is reported below
        problems += _wire(rows)[1]
    seen: dict[str, StageSpec] = {}
    gates = set(SCHEMA["validate"]["gates"])
    changed = set(SCHEMA["validate"]["changed"])
    for s in rows:
        if s.name in seen:
            problems.append(f"stage {s.name!r} is registered twice")
        roles = [o.role for o in s.outputs]
        problems += [f"{s.name}: output role {r!r} repeats" for r in sorted({r for r in roles if roles.count(r) > 1})]
        for o in s.outputs:
            where = f"{s.name}.{o.role}"
            if o.kind not in KINDS:
                problems.append(f"{where}: kind {o.kind!r} is not one of {KINDS}")
            problems += [f"{where}: backend {b!r} is not one of {BACKENDS}" for b in o.backends if b not in BACKENDS]
            if o.precision is not None and o.precision not in PRECISIONS:
                problems.append(f"{where}: precision {o.precision!r} is not one of {PRECISIONS}")
            if o.gate is not None and o.gate not in gates:
                problems.append(f"{where}: gate {o.gate!r} is no key of validate.gates in pipeline/schema.py")
            for what in ("identity", "runtime_identity"):
                if getattr(o, what) is not None and getattr(o, what) not in changed:
                    problems.append(f"{where}: {what} {getattr(o, what)!r} is no key of validate.changed in "
                                    f"pipeline/schema.py")
            if o.steps_from is not None and o.steps_from not in STEPS_FROM:
                problems.append(f"{where}: steps_from {o.steps_from!r} is not one of {STEPS_FROM}")
            if o.backends and (o.precision is None or o.steps_from is None):
                problems.append(f"{where}: a measured output needs a precision and steps_from")
            if o.parent not in (None, FLOAT_AT_T):
                stage, _, role = o.parent.partition(".")
                known = {p.role for p in (s.outputs if stage == s.name else seen[stage].outputs)} \
                    if stage == s.name or stage in seen else set()
                if role not in known:
                    problems.append(f"{where}: parent {o.parent!r} names no output of an earlier stage")
        seen[s.name] = s
    if sum(o.baseline for s in rows for o in s.outputs) != 1:
        problems.append("exactly one output must be the baseline")
    return problems


def _refresh() -> None:
    global STAGES, BY_NAME, NAMES, _table
    _table = _wire(_rows)[0]
    STAGES = tuple(_table)
    BY_NAME = {s.name: s for s in STAGES}
    NAMES = tuple(BY_NAME)


def register(stage: StageSpec, section: Mapping[str, Any] | None = None, after: str | None = None) -> None:
    """Add ``stage`` (a plugin or a test's dummy stage) after the registered ones, or right after the
    stage ``after`` (a stage inserted into the chain; its ``feeds`` rewire what the next one reads).

    ``section``: its config schema (``SCHEMA[stage.name]``, e.g. ``{"factor": 2}``), so configs may
    set it. The row is checked first: a bad row raises ValueError and changes nothing.
    """
    if section is not None and stage.name in SCHEMA:
        raise ValueError(f"config section {stage.name!r} already exists in pipeline/schema.py")
    if after is not None and after not in names():
        raise ValueError(f"cannot register stage {stage.name!r} after {after!r}: no such stage ({', '.join(names())})")
    at = len(_rows) if after is None else names().index(after) + 1
    rows = [*_rows[:at], stage, *_rows[at:]]
    problems = check(rows)
    if problems:
        raise ValueError(f"cannot register stage {stage.name!r}: " + "; ".join(problems))
    _rows.insert(at, stage)
    if section is not None:
        SCHEMA[stage.name] = dict(section)
        _sections.add(stage.name)
    _refresh()


def unregister(name: str) -> None:
    """Remove a stage added by :func:`register` (and its schema section); built-in stages stay."""
    if any(s.name == name for s in _BUILTIN):
        raise ValueError(f"stage {name!r} is built in; only registered stages can be removed")
    stage = next(s for s in _rows if s.name == spec(name).name)
    dangling = _wire([s for s in _rows if s is not stage])[1]  # a stage it feeds reads its own input again
    if dangling:
        raise ValueError(f"stage {name!r} is read by later stages ({'; '.join(dangling)}); unregister those first")
    _rows.remove(stage)
    if name in _sections:
        _sections.discard(name)
        del SCHEMA[name]
    _refresh()


@contextmanager
def temporary(stage: StageSpec, section: Mapping[str, Any] | None = None,
              after: str | None = None) -> Iterator[StageSpec]:
    """``register`` for the duration of a ``with`` block (tests): removed again on exit, even on error."""
    register(stage, section, after)
    try:
        yield stage
    finally:
        unregister(stage.name)


_problems = check()
if _problems:  # a broken table fails on import, not in the middle of a run
    raise RuntimeError("pipeline/registry.py: " + "; ".join(_problems))
