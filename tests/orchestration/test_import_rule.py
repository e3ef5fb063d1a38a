"""Libraries take paths: only the orchestration (registry, runner, cli, stage, stages/) imports the stage
registry. A library module is handed the paths, names and tables it works on, so it knows nothing of the
pipeline's shape and a new stage or a renamed file changes no library (issue 19, step 2)."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

ORCHESTRATION = {"pipeline/registry.py", "pipeline/runner.py", "pipeline/cli.py", "pipeline/stage.py"}


def registry_imports(path: Path) -> list[int]:
    """Line numbers where ``path`` imports pipeline.registry (any form: import, from-import, relative)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name == "pipeline.registry" or a.name.startswith("pipeline.registry.")
                                                for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level and path.parent.name == "pipeline" and module == "registry":
                lines.append(node.lineno)  # from .registry import ...
            elif module == "pipeline.registry" or (module == "pipeline" and any(a.name == "registry"
                                                                                for a in node.names)):
                lines.append(node.lineno)
            elif node.level and (not module or module == "registry") and any(a.name == "registry" for a in node.names):
                lines.append(node.lineno)  # from .. import registry
    return lines


def offenders() -> list[str]:
    found = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel in ORCHESTRATION:
            continue
        found += [f"{rel}:{line}" for line in registry_imports(path)]
    return found


def test_no_library_module_imports_the_registry():
    found = offenders()
    assert not found, ("these library modules import pipeline.registry; hand them the paths/names/tables "
                       "from the stage instead:\n" + "\n".join(found))


def test_the_rule_sees_every_import_form(tmp_path):
    forms = ["from pipeline import registry", "import pipeline.registry", "from pipeline.registry import file",
             "from pipeline import config, registry", "import pipeline.registry as r"]
    for i, form in enumerate(forms):
        path = tmp_path / f"m{i}.py"
        path.write_text(f"{form}\n")
        assert registry_imports(path) == [1], form
    (tmp_path / "ok.py").write_text("from pipeline import config\nimport pipeline.registryx\n")
    assert registry_imports(tmp_path / "ok.py") == []
