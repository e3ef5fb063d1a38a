"""`pip install .` alone must give a working pipeline: pyproject declares what the code imports.

Two lists name the dependencies (requirements*.txt for `make install`, pyproject.toml for pip);
these tests hold them equal, and hold pyproject to what `pipeline/` and `stages/` import.
"""
from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tests.conftest import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

_NAME = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _parse(lines: list[str]) -> dict[str, str]:
    """``{"torch": "==2.14.1", ...}`` from requirement lines (comments, blanks and ``-r`` skipped)."""
    out: dict[str, str] = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name, spec = _NAME.match(line).groups()
        out[_norm(name)] = spec.replace(" ", "")
    return out


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_requirements_and_pyproject_agree():
    project = _pyproject()
    runtime = _parse((REPO / "requirements.txt").read_text().splitlines())
    assert _parse(project["dependencies"]) == runtime, "requirements.txt and pyproject [project.dependencies] differ"
    dev = _parse((REPO / "requirements-dev.txt").read_text().splitlines())
    assert _parse(project["optional-dependencies"]["dev"]) == dev, \
        "requirements-dev.txt and pyproject's dev extra differ"


def _imported_top_levels(*folders: Path) -> set[str]:
    names: set[str] = set()
    for folder in folders:
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names


def _closure(dists: set[str]) -> set[str]:
    """The declared distributions and everything they require, as installed here."""
    seen: set[str] = set()
    todo = list(dists)
    while todo:
        d = todo.pop()
        if d in seen:
            continue
        seen.add(d)
        try:
            reqs = metadata.requires(d) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_norm(_NAME.match(r).group(1)) for r in reqs if "extra ==" not in r]
    return seen


def test_every_import_of_the_product_is_declared():
    """An import of `pipeline/` or `stages/` that no declared dependency provides breaks `pip install .`
    (the trap found in 0.4.0: onnxslim and openvino were only in requirements.txt)."""
    project = _pyproject()
    declared = set(_parse(project["dependencies"]))
    extras = project["optional-dependencies"]
    optional = {d for extra in ("trt", "nir") for d in _parse(extras[extra])}
    provided = _closure(declared)
    owners = metadata.packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    missing = []
    for name in sorted(_imported_top_levels(REPO / "pipeline", REPO / "stages")):
        if name in stdlib or name in ("pipeline", "stages", "__future__"):
            continue
        dists = {_norm(d) for d in owners.get(name, [])}
        if name in optional or dists & optional:
            continue  # TensorRT, the NIR readers: extras, imported only where they exist
        if not dists & provided:
            missing.append(f"{name} (from {', '.join(sorted(dists)) or 'no installed distribution'})")
    assert not missing, "imported but not declared in pyproject [project.dependencies]: " + "; ".join(missing)
