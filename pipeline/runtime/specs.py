"""The backend table: one row per runtime backend, from which every other backend list is derived.

Why one table: a backend used to be named by hand in the stage registry, the report schema, the
plot markers, validate's runner options and ``load_runner``'s suffix dispatch. Now each of those
reads :data:`SPECS` (``registry.BACKENDS``, ``report_json.BACKENDS``, ``plots.MARKERS``,
``inventory.RUNNER_OPTIONS``, :func:`backend_for`), and a new backend is one row here plus its
module ``pipeline/runtime/backends/<module>.py`` (a ``Manager`` class: availability, version,
build, runner). Tests add one for a ``with`` block through :func:`temporary`.

Stdlib only, and importing it imports nothing else of ``pipeline.runtime``: ``pipeline/registry.py``
reads it, and the Makefile imports the registry before the venv exists.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

NONE = type(None)


@dataclass(frozen=True)
class BackendSpec:
    """One backend.

    ``module``: the file under ``pipeline/runtime/backends/`` whose ``Manager`` runs it (several rows
    may share one). ``suffixes``: the files it loads (``()``: an in-memory torch module), the first
    backend of the table listing a suffix is that suffix's default. ``graph``: what it runs
    ("module", "onnx", "engine"). ``options``: every runner option it accepts and the types allowed;
    ``defaults``: the ones validate always passes (the report measures what the graph asks for).
    """

    name: str
    module: str
    graph: str
    label: str  # how a person names it (report text, plot titles)
    marker: str  # matplotlib marker of its points in the report's plots
    suffixes: tuple[str, ...] = ()
    options: Mapping[str, tuple[type, ...]] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    needs_gpu: bool = False
    help: str = ""

    def __post_init__(self) -> None:
        bad = [k for k in self.defaults if k not in self.options]
        if bad:
            raise ValueError(f"backend {self.name!r}: defaults {bad} are not among its options {sorted(self.options)}")
        for k, v in self.defaults.items():
            _check_type(self, k, v)


def _check_type(spec: BackendSpec, key: str, value: Any) -> None:
    types = spec.options[key]
    # bool is an int to isinstance: a flag where a count belongs (threads=True) is a mistake
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        names = " or ".join("None" if t is NONE else t.__name__ for t in types)
        raise ValueError(f"runner option {key!r} of backend {spec.name!r} must be {names}, "
                         f"got {type(value).__name__} {value!r}")


_STR, _INT, _SEQ = (str,), (int,), (list, tuple)
_BUILTIN: tuple[BackendSpec, ...] = (
    BackendSpec("torch", "torch", "module", "torch", "o",
                options={"precision": _STR, "device": _STR, "input_shape": (tuple, list, NONE)},
                help="a torch module (float, QAT or unrolled), eager, strict FP32"),
    BackendSpec("onnxruntime", "onnxruntime", "onnx", "ONNX Runtime", "s", suffixes=(".onnx",),
                options={"threads": (int, NONE), "providers": (*_SEQ, NONE), "precision": (str, NONE),
                         "optimization": _STR, "disabled_optimizers": _SEQ},
                help="the exported graph on ONNX Runtime's CPU provider (exact Q/DQ arithmetic)"),
    BackendSpec("openvino", "openvino", "onnx", "OpenVINO", "D", suffixes=(".onnx",),
                options={"precision": (str, NONE), "threads": (int, NONE), "inference_precision": _STR,
                         "device": _STR, "config": (dict, NONE), "adapt_qdq": (bool,), "static_batch": (int, NONE)},
                defaults={"inference_precision": "f32"},
                help="the exported graph compiled by OpenVINO for an Intel CPU (real INT8 kernels)"),
    BackendSpec("tensorrt", "tensorrt", "engine", "TensorRT", "^", suffixes=(".engine", ".plan", ".trt"),
                options={"precision": (str, NONE), "device": _INT}, needs_gpu=True,
                help="a TensorRT 10 engine built on the target GPU"),
)
SPECS: dict[str, BackendSpec] = {s.name: s for s in _BUILTIN}


def names() -> tuple[str, ...]:
    """Every backend, in table order."""
    return tuple(SPECS)


def spec(name: str) -> BackendSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise KeyError(f"unknown backend {name!r}; known: {', '.join(SPECS)}") from None


class _Names(Sequence):
    """The backend names, read live from :data:`SPECS` (a registered backend is in it at once)."""

    def __getitem__(self, i: Any) -> Any:
        return tuple(SPECS)[i]

    def __len__(self) -> int:
        return len(SPECS)

    def __eq__(self, other: object) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, (tuple, list, _Names)) else other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(tuple(SPECS))


class _Column(Mapping):
    """Backend name -> one field of its row, read live from :data:`SPECS` (``column("marker")``)."""

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def __getitem__(self, name: str) -> Any:
        return getattr(SPECS[name], self.attr)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(SPECS))

    def __len__(self) -> int:
        return len(SPECS)

    def __repr__(self) -> str:
        return repr(dict(self))


NAMES: Sequence[str] = _Names()  # registry.BACKENDS, report_json.BACKENDS


def column(attr: str) -> Mapping[str, Any]:
    """A live view ``{backend: row.<attr>}``: plots.MARKERS is ``column("marker")``."""
    if attr not in BackendSpec.__dataclass_fields__:
        raise KeyError(f"backend rows have no field {attr!r}; fields: {', '.join(BackendSpec.__dataclass_fields__)}")
    return _Column(attr)


def markers() -> dict[str, str]:
    return {s.name: s.marker for s in SPECS.values()}


def labels() -> dict[str, str]:
    return {s.name: s.label for s in SPECS.values()}


def default_options() -> dict[str, dict[str, Any]]:
    """Backend -> the runner options validate always passes (backends without any are left out)."""
    return {s.name: dict(s.defaults) for s in SPECS.values() if s.defaults}


def check_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` checked against backend ``name``'s row: ValueError naming an unknown option or a
    wrong type, the backend and the allowed options."""
    s = spec(name)
    unknown = [k for k in options if k not in s.options]
    if unknown:
        raise ValueError(f"unknown runner option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                         f"for backend {name!r}; allowed: {', '.join(s.options) or 'none'}")
    for k, v in options.items():
        _check_type(s, k, v)
    return dict(options)


def loaders(suffix: str) -> tuple[str, ...]:
    """The backends that load files ending in ``suffix``, the default first."""
    return tuple(s.name for s in SPECS.values() if suffix in s.suffixes)


def backend_for(path: Path | str, backend: str | None = None) -> str:
    """The backend that runs ``path``: ``backend`` if it loads the file's suffix, else the suffix's default;
    ValueError when no backend loads the file or ``backend`` cannot."""
    path = Path(path)
    able = loaders(path.suffix)
    if not able:
        known = dict.fromkeys(x for s in SPECS.values() for x in s.suffixes)
        raise ValueError(f"no runner for {path.name}: expected {' or '.join(known)}")
    name = backend or able[0]
    if name not in able:
        raise ValueError(f"{path.name} ({SPECS[able[0]].graph}): backend must be one of {', '.join(able)}, got {name!r}")
    return name


def register(row: BackendSpec) -> None:
    """Add a backend (a plugin, a test's dummy); a name already taken raises ValueError."""
    if row.name in SPECS:
        raise ValueError(f"backend {row.name!r} is already registered")
    SPECS[row.name] = row


def unregister(name: str) -> None:
    """Remove a backend added by :func:`register`; built-in ones stay."""
    if any(s.name == name for s in _BUILTIN):
        raise ValueError(f"backend {name!r} is built in; only registered backends can be removed")
    del SPECS[spec(name).name]


@contextmanager
def temporary(row: BackendSpec) -> Iterator[BackendSpec]:
    """:func:`register` for a ``with`` block (tests): removed again on exit, even on error."""
    register(row)
    try:
        yield row
    finally:
        unregister(row.name)
