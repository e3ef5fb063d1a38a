"""The stage table's types: :class:`Output`, :class:`StageSpec` and :class:`Table` (reads over a list of rows).

Why apart from pipeline/registry.py: a library module that works on the table (the report's inventory)
is handed a :class:`Table` by its stage and imports only these types, never the registry's live rows.
Stdlib only (the Makefile imports the registry, which imports this, before the venv exists).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

# what an output is (how a runtime or a reader opens it)
KINDS = (
    "checkpoint",  # a float model checkpoint (pipeline.checkpoint.load_model)
    "training_state",  # resumable training state (optimiser, scheduler, history): not a deliverable model
    "qat_checkpoint",  # NNCF QAT model (pipeline.compress.quantize.load_qat_model)
    "unrolled",  # static, stateless torch module (pipeline.deploy.graphs.unroll.load_unrolled)
    "onnx", "engine",  # graphs for ONNX runtimes / TensorRT
    "nir",  # a NIR graph (HDF5) for neuromorphic toolchains (pipeline.deploy.graphs.nir_export)
    "samples",  # sample_inputs.npz: images, labels, float logits
    "metrics", "report", "plot", "log", "check", "config", "script", "doc", "folder",
)
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


WILDCARD = "*"  # an input that reads every earlier stage (validate measures whatever the table declares)


@dataclass(frozen=True)
class StageSpec:
    """One stage: what it reads (``inputs``), which config decides it, what it writes.

    ``inputs``: ``"name=stage.role"`` (the stage asks ``ctx.input("name")``, so the row, not the
    code, says which upstream output it is), ``"stage.role"`` (name = the reference itself),
    ``"stage.*"`` (the whole folder of ``stage``: a stage that packages or measures all of it) or
    ``"*"`` (every earlier stage). ``needs`` is derived from them by the registry, never written.
    ``feeds``: ``"stage.name=role"``: this stage's output ``role`` replaces the input ``name`` of the
    later ``stage`` (how a stage inserted into the chain takes over what the next one reads,
    without that stage's row or code changing).
    """

    name: str
    inputs: tuple[str, ...]  # what the stage reads (see above); needs follows from it
    config_keys: tuple[str, ...]  # config sections in this stage's cache key (upstream keys chain in)
    outputs: tuple[Output, ...]  # what the stage writes (see Output)
    help: str
    # may run as several processes (torchrun, WORLD_SIZE > 1); the runner refuses the others before any work
    distributed: bool = False
    module: str = ""  # module with run(ctx) -> StageResult; "" means stages.<name>
    fits: bool = False  # trains (fits weights): the Makefile runs it with tcmalloc (FIT_STAGES)
    feeds: tuple[str, ...] = ()
    # derived by the registry from inputs and every row's feeds (see _wire): set on the table's rows only
    needs: tuple[str, ...] = field(default=(), init=False, compare=False)
    wiring: tuple[tuple[str, str], ...] = field(default=(), init=False, compare=False)  # (input name, reference)

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

    def reference(self, name: str) -> str:
        """What input ``name`` resolves to on this (wired) row: ``"stage.role"`` or ``"stage.*"``;
        a ``"stage.role"`` of a stage read whole (``stage.*``, ``*``) resolves to itself."""
        wired = dict(self.wiring)
        if name in wired:
            return wired[name]
        stage, dot, _ = name.partition(".")
        if dot and (f"{stage}.*" in wired.values() or (WILDCARD in wired.values() and stage in self.needs)):
            return name
        raise KeyError(f"stage {self.name!r} reads no input {name!r}: declare it in its row's inputs in "
                       f"pipeline/registry.py; it reads {', '.join(f'{n} ({r})' for n, r in self.wiring) or 'nothing'}")


def _parse_input(text: str) -> tuple[str, str]:
    """``"model=reduce_t.chosen"`` -> ``("model", "reduce_t.chosen")``; ``"x.y"`` -> ``("x.y", "x.y")``."""
    name, eq, ref = text.partition("=")
    return (name.strip(), ref.strip()) if eq else (text.strip(), text.strip())


def _wire(rows: list[StageSpec]) -> tuple[list[StageSpec], list[str]]:
    """The rows with ``wiring`` (input name -> reference, feeds applied) and ``needs`` (the stages the
    references name, in run order) filled in, and the problems found on the way (dangling roles)."""
    problems: list[str] = []
    wiring = {s.name: dict(_parse_input(i) for i in s.inputs) for s in rows}
    order = [s.name for s in rows]
    for i, s in enumerate(rows):
        for feed in s.feeds:
            target, eq, role = feed.partition("=")
            stage, _, name = target.partition(".")
            if not eq or stage not in wiring or name not in wiring[stage] or order.index(stage) <= i:
                problems.append(f"{s.name}: feeds {feed!r}: name a later stage's input as 'stage.input=role'")
            elif role not in {o.role for o in s.outputs}:
                problems.append(f"{s.name}: feeds {feed!r}: {role!r} is no output of {s.name}")
            else:
                wiring[stage][name] = f"{s.name}.{role}"
    out: list[StageSpec] = []
    for i, s in enumerate(rows):
        earlier = {r.name: r for r in rows[:i]}
        needs: set[str] = set()
        for name, ref in wiring[s.name].items():
            if ref == WILDCARD:
                needs |= set(earlier)
                continue
            stage, dot, role = ref.partition(".")
            if not dot or stage not in earlier:
                problems.append(f"{s.name}: input {name!r} reads {ref!r}, which names no output of an earlier stage")
            elif role != "*" and role not in {o.role for o in earlier[stage].outputs}:
                problems.append(f"{s.name}: input {name!r} reads {ref!r}, which names no output of an earlier stage "
                                f"(its outputs: {', '.join(o.role for o in earlier[stage].outputs)})")
            else:
                needs.add(stage)
        wired = replace(s)
        object.__setattr__(wired, "wiring", tuple(wiring[s.name].items()))
        object.__setattr__(wired, "needs", tuple(n for n in order if n in needs))
        out.append(wired)
    return out, problems


class Table:
    """Reads over wired rows (what :func:`pipeline.registry.table` hands out): names, files, parents."""

    def __init__(self, rows: tuple[StageSpec, ...] | list[StageSpec]) -> None:
        self.rows = tuple(rows)

    def stages(self) -> tuple[StageSpec, ...]:
        return self.rows

    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.rows)

    def spec(self, name: str) -> StageSpec:
        for s in self.rows:
            if s.name == name:
                return s
        raise KeyError(f"unknown stage {name!r}; stages are: {', '.join(self.names())}")

    def output(self, stage: str, role: str) -> Output:
        """The declared output ``role`` of ``stage`` (KeyError lists the stage's outputs)."""
        return self.spec(stage).output(role)

    def file(self, stage: str, role: str, **values: Any) -> str:
        """The file name of an output (``file("export", "onnx_fp32")`` -> ``model_fp32.onnx``)."""
        return self.output(stage, role).filename(**values)

    def artifact(self, stage: str, role: str, **values: Any) -> str:
        """The output's name in reports and gate messages: ``<stage>/<file>`` (``train/best.pt``)."""
        return f"{stage}/{self.file(stage, role, **values)}"

    def ref(self, reference: str) -> tuple[str, Output]:
        """``"stage.role"`` (as in ``Output.parent``) -> (stage, Output)."""
        stage, _, role = reference.partition(".")
        return stage, self.output(stage, role)

    def baseline(self) -> tuple[str, Output]:
        """The float reference output (``train.best``)."""
        found = [(s.name, o) for s in self.rows for o in s.outputs if o.baseline]
        if len(found) != 1:
            raise RuntimeError(f"the registry needs exactly one baseline output, found {len(found)}")
        return found[0]

    def baseline_artifact(self) -> str:
        """The baseline's row name in the report (``train/best.pt``)."""
        stage, o = self.baseline()
        return self.artifact(stage, o.role)

    def torch_source(self, stage: str, role: str) -> tuple[str, Output] | None:
        """The first torch model up the parent chain of an output (an ONNX graph or engine inherits its
        firing rates and operation counts from it); None for an output with no torch ancestor."""
        o = self.output(stage, role)
        while True:
            if "torch" in o.backends:
                return stage, o
            if o.parent is None or o.parent == FLOAT_AT_T:
                return None
            stage, o = self.ref(o.parent)

    def measured(self) -> list[tuple[str, Output]]:
        """(stage, output) for every output a report measures, in pipeline order."""
        return [(s.name, o) for s in self.rows for o in s.outputs if o.backends]

    def upstream(self, name: str) -> tuple[str, ...]:
        """``name``'s upstream stages, transitively, in run order."""
        seen: set[str] = set()
        todo = list(self.spec(name).needs)
        while todo:
            up = todo.pop()
            if up not in seen:
                seen.add(up)
                todo.extend(self.spec(up).needs)
        return tuple(n for n in self.names() if n in seen)

    def config_sections(self, name: str) -> tuple[str, ...]:
        """The config keys that decide ``name``'s outputs: its own and every upstream stage's, in run order
        without repeats (what a graph's metadata hashes: ``slice_hash(cfg, config_sections("export"))``)."""
        out: list[str] = []
        for n in (*self.upstream(name), name):
            out += [k for k in self.spec(n).config_keys if k not in out]
        return tuple(out)
