"""The stage registry: the one table that names every stage, what it reads and what it makes.

The CLI (`python -m pipeline.stage NAME`), `python -m pipeline run|status`, the Makefile's
targets, the cache keys and the report all read this table, so adding a stage is one module
(``StageSpec.module``, ``stages.<name>`` unless the row says otherwise) plus one row here (plus
its schema section and config keys).

Each row declares its outputs (:class:`Output`): the file, what kind of thing it is, which
runtimes measure it, at which precision, what it was made from (``parent``) and which gate
guards it. Code names a file through the table (``registry.file("export", "onnx_fp32")``,
``StageContext.output``/``StageContext.input``), never as a string literal, so a file is named
in one place and the report's inventory can be derived from the table alone.

Stdlib only: the Makefile imports this module before the venv exists.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from pipeline.schema import SCHEMA

# what an output is (how a runtime or a reader opens it)
KINDS = (
    "checkpoint",  # a float model checkpoint (pipeline.checkpoint.load_model)
    "training_state",  # resumable training state (optimiser, scheduler, history): not a deliverable model
    "qat_checkpoint",  # NNCF QAT model (pipeline.compress.quantize.load_qat_model)
    "unrolled",  # static, stateless torch module (pipeline.deploy.unroll.load_unrolled)
    "onnx", "engine",  # graphs for ONNX runtimes / TensorRT
    "nir",  # a NIR graph (HDF5) for neuromorphic toolchains (pipeline.deploy.nir_export)
    "samples",  # sample_inputs.npz: images, labels, float logits
    "metrics", "report", "plot", "log", "check", "config", "script", "doc", "folder",
)
BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
# where a report finds an output's time steps: model.T, the "{T}" in its file name, the stage's
# metrics.json "T", the graph's metadata "T", or its parent's T
STEPS_FROM = ("config", "name", "metrics", "metadata", "parent")
# parent: the float checkpoint at this output's T (the baseline, or reduce_t's t{T}.pt)
FLOAT_AT_T = "float@T"
_FIELD = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Output:
    """One file (or folder, or family of files) a stage writes into its folder.

    ``role`` names it in code (unique within its stage; it survives a rename of ``file``).
    ``file`` may hold ``{field}`` placeholders (``t{T}.pt``): a family, one file per value.
    An output with ``backends`` is a model the report measures, one row per backend; ``parent``
    (``"stage.role"`` or :data:`FLOAT_AT_T`) is what it is gated against, ``gate`` the key of
    ``validate.gates``; ``ships`` marks deployable graphs (also gated against the float baseline).
    ``identity`` (a key of ``validate.changed``) marks an output that must compute its parent's
    function: its rows are also gated on changed predictions. ``runtime_identity`` does the same
    for the rows of its further backends against its first backend's row of the same file (an
    INT8 file's exact Q/DQ numbers in ONNX Runtime vs the same file compiled by OpenVINO).
    """

    role: str
    file: str
    kind: str
    backends: tuple[str, ...] = ()
    precision: str | None = None
    parent: str | None = None
    gate: str | None = None
    identity: str | None = None
    runtime_identity: str | None = None
    ships: bool = False
    baseline: bool = False  # the float reference every delta is measured against (exactly one)
    steps_from: str | None = None  # one of STEPS_FROM, for measured outputs
    optional: bool = False  # may be absent in a finished stage (a skipped step: the metrics say why)
    bundled: bool = False  # copied into the device bundle (the build stage's folder)
    notes: tuple[str, ...] = ()  # shown next to the report row
    help: str = ""

    @property
    def fields(self) -> tuple[str, ...]:
        """The placeholders of a family (``("T",)`` for ``t{T}.pt``); empty for one file."""
        return tuple(_FIELD.findall(self.file))

    def filename(self, **values: Any) -> str:
        """The file name, placeholders filled (``filename(T=2)`` -> ``t2.pt``)."""
        missing = [f for f in self.fields if f not in values]
        if missing:
            raise KeyError(f"output {self.file!r} is a family: pass {', '.join(missing)} (e.g. T=2)")
        return self.file.format(**values)

    def match(self, name: str) -> dict[str, str] | None:
        """The placeholder values if ``name`` belongs to this output (``t2.pt`` -> ``{"T": "2"}``), else None."""
        pattern = "".join(f"(?P<{part}>\\d+)" if part == "T" else f"(?P<{part}>[^/]+)" if i % 2 else re.escape(part)
                          for i, part in enumerate(_FIELD.split(self.file)))
        found = re.fullmatch(pattern, name)
        return found.groupdict() if found else None


@dataclass(frozen=True)
class StageSpec:
    name: str
    needs: tuple[str, ...]  # upstream stages whose finished outputs this stage reads
    config_keys: tuple[str, ...]  # config sections in this stage's cache key (upstream keys chain in)
    outputs: tuple[Output, ...]  # what the stage writes (see Output)
    help: str
    # may run as several processes (torchrun, WORLD_SIZE > 1); the runner refuses the others before any work
    distributed: bool = False
    module: str = ""  # module with run(ctx) -> StageResult; "" means stages.<name>

    def __post_init__(self) -> None:
        if not self.module:
            object.__setattr__(self, "module", f"stages.{self.name}")

    @property
    def produces(self) -> tuple[str, ...]:
        """The output file names, for docs and ``python -m pipeline list`` (less metrics.json, which
        the runner writes for every stage)."""
        return tuple(o.file for o in self.outputs if o.kind != "metrics")

    def output(self, role: str) -> Output:
        for o in self.outputs:
            if o.role == role:
                return o
        raise KeyError(f"stage {self.name!r} has no output {role!r}; its outputs: "
                       f"{', '.join(f'{o.role} ({o.file})' for o in self.outputs)}")


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
    ), "train the float STAA-SNN at model.T time steps", distributed=True),
    StageSpec("reduce_t", ("train",), ("reduce_t", "validate.gates.reduce_t"), (
        Output("reduced", "t{T}.pt", "checkpoint", ("torch",), "fp32", parent="train.best", gate="reduce_t",
               steps_from="name", help="the float model fine-tuned at T, one per T in reduce_t.steps"),
        Output("chosen", "chosen.pt", "checkpoint", help="a copy of the checkpoint handed to qat (reduce_t.choose)"),
        _metrics(),
        *_training_logs(),
    ), "fine-tune at fewer time steps, optionally distilling from the T-step teacher"),
    StageSpec("qat", ("train", "reduce_t"), ("qat",), (
        Output("qat", "qat.pt", "qat_checkpoint", ("torch",), "int8", parent=FLOAT_AT_T, gate="qat",
               steps_from="metrics", help="NNCF config + state dict (fake-quant: the report says so from what ran)"),
        Output("nncf_config", "nncf_config.json", "config", help="the quantiser setup, readable"),
        _metrics(),
        *_training_logs(),
    ), "NNCF INT8 quantisation-aware fine-tuning (symmetric, per-channel weights)"),
    StageSpec("unroll", ("train", "reduce_t", "qat"), ("unroll",), (
        Output("float", "float.pt", "unrolled", ("torch",), "fp32", parent=FLOAT_AT_T, gate="unroll",
               identity="unroll", steps_from="metrics", notes=("unrolled",)),
        Output("int8", "int8.pt", "unrolled", ("torch",), "int8", parent="qat.qat", gate="unroll",
               identity="unroll", steps_from="metrics", notes=("unrolled",)),
        _metrics(),
    ), "static, stateless modules: fixed T, BN folded, hard spikes; parity gates"),
    StageSpec("export", ("unroll",), ("export",), (
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
    StageSpec("build", ("export",), ("build",), (
        Output("engine_fp16", "model_fp16.engine", "engine", ("tensorrt",), "fp16", parent="export.onnx_fp32",
               gate="engine", ships=True, steps_from="parent", optional=True),
        Output("engine_int8", "model_int8.engine", "engine", ("tensorrt",), "int8", parent="export.onnx_int8",
               gate="engine", ships=True, steps_from="parent", optional=True),
        Output("engine_fp32", "model_fp32.engine", "engine", ("tensorrt",), "fp32", parent="export.onnx_fp32",
               gate="engine", ships=True, steps_from="parent", optional=True),
        Output("step_engine", "step_{precision}.engine", "engine", (), None, parent="export.step_fp32", optional=True,
               help="streaming engines (need a stateful driver)"),
        Output("bundle", "bundle.json", "config", help="engine recipes, graphs and metadata of the device bundle"),
        Output("script", "build_engines.sh", "script", help="trtexec build and timing on the target"),
        Output("guide", "JETSON.md", "doc", help="how to build, check and time on a Jetson"),
        Output("intel_guide", "INTEL.md", "doc", help="the same graphs with OpenVINO on an Intel CPU, iGPU or NPU"),
        Output("runtime", "staa_runtime/", "folder", help="the standalone runner"),
        _metrics(),
    ), "TensorRT FP16/INT8 engines, or a skipped record and a trtexec script for the target"),
    StageSpec("validate", ("train", "reduce_t", "qat", "unroll", "export", "build"), ("validate",), (
        Output("report_md", "report.md", "report"),
        Output("report_json", "report.json", "report"),
        Output("plot", "{plot}.png", "plot", help="accuracy vs latency, firing rates, accuracy vs T"),
        _metrics(),
    ), "accuracy, agreement, latency, firing rates and energy of every artifact; gates"),
)

_rows: list[StageSpec] = list(_BUILTIN)
_sections: set[str] = set()  # schema sections added by register()
# snapshots of the table, refreshed on register/unregister: code that must see a stage registered
# later (tests, plugins) calls stages()/names()/spec() instead of importing these
STAGES: tuple[StageSpec, ...] = tuple(_rows)
BY_NAME: dict[str, StageSpec] = {s.name: s for s in STAGES}
NAMES: tuple[str, ...] = tuple(BY_NAME)


def stages() -> tuple[StageSpec, ...]:
    """Every registered stage, in run order."""
    return tuple(_rows)


def names() -> tuple[str, ...]:
    return tuple(s.name for s in _rows)


def spec(name: str) -> StageSpec:
    for s in _rows:
        if s.name == name:
            return s
    raise KeyError(f"unknown stage {name!r}; stages are: {', '.join(names())}")


def output(stage: str, role: str) -> Output:
    """The declared output ``role`` of ``stage`` (KeyError lists the stage's outputs)."""
    return spec(stage).output(role)


def file(stage: str, role: str, **values: Any) -> str:
    """The file name of an output (``file("export", "onnx_fp32")`` -> ``model_fp32.onnx``)."""
    return output(stage, role).filename(**values)


def path(folder: Path, stage: str, role: str, **values: Any) -> Path:
    """Where an output lies in ``folder`` (that stage's folder: ``ctx.out``, ``ctx.inputs[stage]``)."""
    return Path(folder) / file(stage, role, **values)


def artifact(stage: str, role: str, **values: Any) -> str:
    """The output's name in reports and gate messages: ``<stage>/<file>`` (``train/best.pt``)."""
    return f"{stage}/{file(stage, role, **values)}"


def ref(reference: str) -> tuple[str, Output]:
    """``"stage.role"`` (as in ``Output.parent``) -> (stage, Output)."""
    stage, _, role = reference.partition(".")
    return stage, output(stage, role)


def baseline() -> tuple[str, Output]:
    """The float reference output (``train.best``)."""
    found = [(s.name, o) for s in _rows for o in s.outputs if o.baseline]
    if len(found) != 1:
        raise RuntimeError(f"the registry needs exactly one baseline output, found {len(found)}")
    return found[0]


def torch_source(stage: str, role: str) -> tuple[str, Output] | None:
    """The first torch model up the parent chain of an output (an ONNX graph or engine inherits its
    firing rates and operation counts from it); None for an output with no torch ancestor."""
    o = output(stage, role)
    while True:
        if "torch" in o.backends:
            return stage, o
        if o.parent is None or o.parent == FLOAT_AT_T:
            return None
        stage, o = ref(o.parent)


def measured() -> list[tuple[str, Output]]:
    """(stage, output) for every output a report measures, in pipeline order."""
    return [(s.name, o) for s in _rows for o in s.outputs if o.backends]


def upstream(name: str) -> tuple[str, ...]:
    """``name``'s upstream stages, transitively, in run order."""
    seen: set[str] = set()
    todo = list(spec(name).needs)
    while todo:
        up = todo.pop()
        if up not in seen:
            seen.add(up)
            todo.extend(spec(up).needs)
    return tuple(n for n in names() if n in seen)


def config_sections(name: str) -> tuple[str, ...]:
    """The config keys that decide ``name``'s outputs: its own and every upstream stage's, in run order
    without repeats (what a graph's metadata hashes: ``slice_hash(cfg, config_sections("export"))``)."""
    out: list[str] = []
    for n in (*upstream(name), name):
        out += [k for k in spec(n).config_keys if k not in out]
    return tuple(out)


def check(rows: tuple[StageSpec, ...] | list[StageSpec] | None = None) -> list[str]:
    """Problems in the table (empty when sound): unknown needs/kinds/backends/precisions, repeated
    names or roles, parents that name no output, gates that are no key of ``validate.gates``."""
    rows = list(_rows if rows is None else rows)
    problems: list[str] = []
    seen: dict[str, StageSpec] = {}
    gates = set(SCHEMA["validate"]["gates"])
    changed = set(SCHEMA["validate"]["changed"])
    for s in rows:
        if s.name in seen:
            problems.append(f"stage {s.name!r} is registered twice")
        problems += [f"{s.name}: needs {n!r}, which is not an earlier stage" for n in s.needs if n not in seen]
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
    global STAGES, BY_NAME, NAMES
    STAGES = tuple(_rows)
    BY_NAME = {s.name: s for s in STAGES}
    NAMES = tuple(BY_NAME)


def register(stage: StageSpec, section: Mapping[str, Any] | None = None) -> None:
    """Add ``stage`` after the registered ones (a plugin or a test's dummy stage).

    ``section``: its config schema (``SCHEMA[stage.name]``, e.g. ``{"factor": 2}``), so configs may
    set it. The row is checked first: a bad row raises ValueError and changes nothing.
    """
    if section is not None and stage.name in SCHEMA:
        raise ValueError(f"config section {stage.name!r} already exists in pipeline/schema.py")
    problems = check([*_rows, stage])
    if problems:
        raise ValueError(f"cannot register stage {stage.name!r}: " + "; ".join(problems))
    _rows.append(stage)
    if section is not None:
        SCHEMA[stage.name] = dict(section)
        _sections.add(stage.name)
    _refresh()


def unregister(name: str) -> None:
    """Remove a stage added by :func:`register` (and its schema section); built-in stages stay."""
    if any(s.name == name for s in _BUILTIN):
        raise ValueError(f"stage {name!r} is built in; only registered stages can be removed")
    stage = spec(name)
    dependants = [s.name for s in _rows if name in s.needs]
    if dependants:
        raise ValueError(f"stage {name!r} is needed by {', '.join(dependants)}; unregister those first")
    _rows.remove(stage)
    if name in _sections:
        _sections.discard(name)
        del SCHEMA[name]
    _refresh()


@contextmanager
def temporary(stage: StageSpec, section: Mapping[str, Any] | None = None) -> Iterator[StageSpec]:
    """``register`` for the duration of a ``with`` block (tests): removed again on exit, even on error."""
    register(stage, section)
    try:
        yield stage
    finally:
        unregister(stage.name)


_problems = check()
if _problems:  # a broken table fails on import, not in the middle of a run
    raise RuntimeError("pipeline/registry.py: " + "; ".join(_problems))
