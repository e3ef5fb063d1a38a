"""deploy/ is cut by job and depends one way (docs/architecture.md §2): graphs/ imports neither proofs/ nor
packaging/, packaging/ does not import proofs/, and pipeline/runtime/ (copied into the device bundle as a
standalone package) imports nothing else from the pipeline."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO


def imported_modules(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``path``, relative imports resolved."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found += [(node.lineno, f"{module}.{a.name}") for a in node.names] if not node.module else [(node.lineno, module)]
    return found


def offenders(folder: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = (), root: Path = REPO) -> list[str]:
    out = []
    for path in sorted((root / folder).rglob("*.py")):
        for line, module in imported_modules(path, root):
            if any(module == f or module.startswith(f + ".") for f in forbidden) and not any(
                    module == a or module.startswith(a + ".") for a in allowed):
                out.append(f"{path.relative_to(root).as_posix()}:{line} imports {module}")
    return out


def test_graphs_import_neither_proofs_nor_packaging():
    assert offenders("pipeline/deploy/graphs", ("pipeline.deploy.proofs", "pipeline.deploy.packaging")) == []


def test_packaging_does_not_import_proofs():
    assert offenders("pipeline/deploy/packaging", ("pipeline.deploy.proofs",)) == []


def test_runtime_imports_nothing_else_from_the_pipeline():
    assert offenders("pipeline/runtime", ("pipeline",), allowed=("pipeline.runtime",)) == []


def test_the_rule_sees_relative_and_absolute_imports(tmp_path):
    """The checker itself: a relative import two levels up and an absolute one are both resolved."""
    pkg = tmp_path / "pipeline" / "deploy" / "graphs"
    pkg.mkdir(parents=True)
    (pkg / "probe.py").write_text("from ..proofs.parity import compare\nimport pipeline.deploy.packaging.bundle\n"
                                  "from .compact import prune_unused\n")
    found = offenders("pipeline/deploy/graphs", ("pipeline.deploy.proofs", "pipeline.deploy.packaging"), root=tmp_path)
    assert [f.split(" imports ")[1] for f in found] == ["pipeline.deploy.proofs.parity", "pipeline.deploy.packaging.bundle"]
