"""Backend managers (in the style of mmdeploy's): availability, environment, version, build, runner.

Each backend has one home, ``backends/<module>.py`` (its runner, its ``Manager`` and what reads
its executed precision; TensorRT's engine recipe sits next to it in ``tensorrt_build.py``, OpenVINO's Q/DQ adaptation in
``openvino_qdq.py``), and
one row in :mod:`..specs`. This package finds the manager from the row, so a backend added by a
spec row (``specs.register``) is reachable through :func:`get_backend` and :data:`BACKENDS` with
no list to edit here.

A missing backend is a reported state, never an import-time crash: ``is_available()`` returns
``(False, reason)`` and the caller records the reason (the build stage's "skipped" record).
"""
from __future__ import annotations

import importlib
import platform
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from .. import specs
from ..base import Runner


def dist_version(*dists: str) -> str | None:
    """The installed version of the first of ``dists`` that is installed, or None."""
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


class Backend:
    """Base manager: subclasses (each module's ``Manager``) override what applies.

    ``name`` is the spec row's, so one module can serve several rows (a renamed copy in a test).
    """

    dists: tuple[str, ...] = ()  # the distributions whose version check_env reports

    def __init__(self, spec: specs.BackendSpec) -> None:
        self.spec = spec
        self.name = spec.name

    def is_available(self) -> tuple[bool, str]:
        raise NotImplementedError

    def version(self) -> str | None:
        return dist_version(*self.dists)

    def check_env(self) -> dict[str, Any]:
        ok, reason = self.is_available()
        env = {"backend": self.name, "available": ok, "reason": reason, "python": platform.python_version(),
               "machine": platform.machine()}
        env.update(self.env_extra())
        return env

    def env_extra(self) -> dict[str, Any]:
        """Further keys of :meth:`check_env` (library versions)."""
        return {}

    def build(self, *args: Any, **kwargs: Any) -> Any:
        """Turn an exported model into what :meth:`runner` loads (identity where nothing is built)."""
        raise NotImplementedError(f"{self.name} has no build step")

    def runner(self, model: Any, **options: Any) -> Runner:
        """A loaded runner; ``options`` are checked against the spec row first (ValueError names the
        unknown or mistyped option, the backend and the allowed options)."""
        runner = self.make_runner(model, **specs.check_options(self.name, options))
        runner.name = self.name
        return runner

    def make_runner(self, model: Any, **options: Any) -> Runner:
        raise NotImplementedError


_managers: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """The manager of backend ``name`` (KeyError naming the known ones)."""
    spec = specs.spec(name)
    got = _managers.get(name)
    if got is None or got.spec is not spec:
        module = importlib.import_module(f"{__name__}.{spec.module}")
        got = _managers[name] = module.Manager(spec)
    return got


class _Managers(Mapping):
    """Name -> manager for every row of the spec table (live: a registered backend appears)."""

    def __getitem__(self, name: str) -> Backend:
        if name not in specs.SPECS:
            raise KeyError(name)
        return get_backend(name)

    def __iter__(self) -> Iterator[str]:
        return iter(specs.names())

    def __len__(self) -> int:
        return len(specs.SPECS)


BACKENDS: Mapping[str, Backend] = _Managers()


def graph_backends() -> tuple[str, ...]:
    """What can run an .onnx file."""
    return specs.loaders(".onnx")


GRAPH_BACKENDS = graph_backends()  # the built-in ones (import time)


def load_runner(path: Path | str, backend: str | None = None, **options: Any) -> Runner:
    """A runner for a file, chosen by suffix from the spec table: ``.onnx`` -> ONNX Runtime
    (``backend="openvino"``: OpenVINO), ``.engine``/``.plan`` -> TensorRT. An unavailable backend raises
    RuntimeError with the reason."""
    path = Path(path)
    name = specs.backend_for(path, backend)
    manager = get_backend(name)
    ok, reason = manager.is_available()
    if not ok:
        raise RuntimeError(f"cannot run {path.name}: {reason}")
    return manager.runner(path, **options)


__all__ = ["BACKENDS", "GRAPH_BACKENDS", "Backend", "dist_version", "get_backend", "graph_backends", "load_runner"]
