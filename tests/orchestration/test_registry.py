"""The stage registry as the one table: sound rows, declared outputs, and a stage added through a row.

A dummy stage (``tests/helpers/dummy_stage.py`` + one :class:`StageSpec` + one schema section) runs through
the real runner, is cached on the second run, re-runs when its config changes and shows in
``python -m pipeline status`` and, its model output measured like any built-in one, in the report's
inventory (which is derived from the registry alone).
"""
from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import registry
from pipeline.cli import main as cli_main
from pipeline.config import load_config
from pipeline.registry import FLOAT_AT_T, Output, StageSpec
from pipeline.runner import run_stage, run_store, stage_states
from pipeline.schema import SCHEMA, ConfigError
from tests.helpers import dummy_stage
from tests.conftest import REPO

DUMMY = StageSpec("dummy", (), ("dummy",), (
    Output("value", "value.txt", "report", help="2 x dummy.factor"),
    Output("model", "copy.pt", "checkpoint", ("torch",), "fp32", parent="train.best", steps_from="config"),
), "a stage that exists only in tests", module="tests.helpers.dummy_stage")


# --- the table ---------------------------------------------------------------------------------

def test_builtin_table_is_sound_and_its_modules_exist():
    assert registry.check() == []
    for s in registry.stages():
        assert importlib.util.find_spec(s.module) is not None, s.module
    assert registry.NAMES == registry.names() == tuple(s.name for s in registry.STAGES)


def test_outputs_name_files_and_resolve_parents():
    assert registry.file("export", "onnx_fp32") == "model_fp32.onnx"
    assert registry.path(Path("/r/unroll"), "unroll", "int8") == Path("/r/unroll/int8.pt")
    assert registry.artifact("reduce_t", "reduced", T=2) == "reduce_t/t2.pt"
    assert registry.output("reduce_t", "reduced").match("t12.pt") == {"T": "12"}
    assert registry.output("reduce_t", "reduced").match("chosen.pt") is None
    assert registry.baseline() == ("train", registry.output("train", "best"))
    stage, src = registry.torch_source("build", "engine_int8")
    assert (stage, src.file) == ("unroll", "int8.pt")
    assert registry.output("qat", "qat").parent == FLOAT_AT_T
    assert "qat.pt" in registry.spec("qat").produces
    with pytest.raises(KeyError, match="onnx_fp32 \\(model_fp32.onnx\\)"):
        registry.output("export", "fp32")  # a wrong role lists the right ones
    with pytest.raises(KeyError, match="pass T"):
        registry.file("reduce_t", "reduced")


def test_every_exported_graph_runs_on_onnxruntime_and_openvino():
    graphs = [o for s, o in registry.measured() if o.kind == "onnx"]
    assert graphs and all(set(o.backends) == {"onnxruntime", "openvino"} and o.ships for o in graphs)


def test_export_hashes_every_upstream_config_section():
    """What stages/export.py hashes into each graph's metadata: everything that shaped the model."""
    sections = registry.config_sections("export")
    assert set(sections) >= {"seed", "data", "model", "train", "reduce_t", "qat", "unroll", "export"}
    assert "build" not in sections and "validate" not in sections
    assert len(set(sections)) == len(sections)


@pytest.mark.parametrize("row, problem", [
    (StageSpec("bad", ("nope",), (), (), "x"), "input 'nope' reads 'nope', which names no output"),
    (StageSpec("bad", ("m=reduce_t.chosn",), (), (), "x"), "input 'm' reads 'reduce_t.chosn', which names no output"),
    (StageSpec("bad", ("m=later.model",), (), (), "x"), "input 'm' reads 'later.model', which names no output"),
    (StageSpec("bad", (), (), (Output("m", "m.pt", "checkpoint"),), "x", feeds=("qat.modle=m",)), "feeds 'qat.modle=m'"),
    (StageSpec("bad", (), (), (Output("a", "a.pt", "checkpoint", ("torch",), "fp32", parent="qat.nope",
                                       steps_from="config"),), "x"), "parent 'qat.nope'"),
    (StageSpec("bad", (), (), (Output("a", "a.pt", "blob"),), "x"), "kind 'blob'"),
    (StageSpec("bad", (), (), (Output("a", "a.onnx", "onnx", ("onnxruntime",), "fp32", gate="onnx_fp33",
                                       steps_from="metadata"),), "x"), "gate 'onnx_fp33'"),
    (StageSpec("train", (), (), (), "x"), "registered twice"),
])
def test_a_bad_row_is_refused_and_changes_nothing(row, problem):
    before = registry.names()
    with pytest.raises(ValueError, match=re.escape(problem)):
        registry.register(row)
    assert registry.names() == before


# --- a stage added through its row, module and schema section ---------------------------------

@pytest.fixture
def dummy():
    dummy_stage.RUNS.clear()
    with registry.temporary(DUMMY, section={"factor": 2}):
        yield DUMMY
    assert "dummy" not in registry.names() and "dummy" not in SCHEMA


def test_dummy_stage_runs_caches_and_reruns_on_config_change(dummy, write_config):
    path = write_config({"dummy": {"factor": 3}})
    cfg = load_config(path)
    assert run_stage(cfg, "dummy") == "done"
    store = run_store(cfg)
    assert (store.stage_dir("dummy") / "value.txt").read_text() == "6"
    assert store.manifest("dummy").metrics["value"] == 6
    assert run_stage(cfg, "dummy") == "cached" and dummy_stage.RUNS == [3]  # not executed again
    assert run_stage(load_config(path, ["dummy.factor=4"]), "dummy") == "done" and dummy_stage.RUNS == [3, 4]
    assert [r[:2] for r in stage_states(cfg) if r[0] == "dummy"] == [("dummy", "stale")]


def test_dummy_stage_section_is_validated_like_any_other(dummy, write_config):
    with pytest.raises(ConfigError, match="dummy.factr.*did you mean 'dummy.factor'"):
        load_config(write_config({"dummy": {"factr": 3}}))
    assert load_config(write_config())["dummy"] == {"factor": 2}  # the section's default


def test_dummy_stage_shows_in_status(dummy, write_config):
    path = write_config({"dummy": {"factor": 3}})
    run_stage(load_config(path), "dummy")
    res = CliRunner().invoke(cli_main, ["status", "--config", str(path)])
    assert res.exit_code == 0, res.output
    line = next(l for l in res.output.splitlines() if l.startswith("dummy"))
    assert line.split()[1] == "done", res.output
    assert re.search(r"^train\s+missing", res.output, re.M)
    # the CLI's stage choices are the registry's at call time: the dummy is listed, cleaned, forced
    assert CliRunner().invoke(cli_main, ["list", "--names"]).output.split()[-1] == "dummy"
    res = CliRunner().invoke(cli_main, ["clean", "--config", str(path), "dummy"])
    assert res.exit_code == 0 and "removed dummy" in res.output, res.output


def test_dummy_stage_output_appears_in_the_report_inventory(dummy, tmp_path):
    import torch

    from pipeline.checkpoint import model_payload, save_atomic
    from pipeline.models import build_model
    from pipeline.report.inventory import discover

    mcfg = {"arch": "resnet19", "width": 0.125, "T": 2, "num_classes": 10, "in_channels": 1}
    folder = tmp_path / "dummy"
    folder.mkdir()
    torch.manual_seed(0)
    save_atomic(model_payload(build_model(mcfg), mcfg, {"num_classes": 10}), folder / "copy.pt")
    rows = {a.name: a for a in discover({"dummy": folder}, model_T=2, device="cpu", input_shape=(None, 1, 16, 16),
                                          table=registry.table())}
    row = rows["dummy/copy.pt"]
    assert (row.stage, row.backend, row.precision, row.T, row.parent, row.status) == (
        "dummy", "torch", "fp32", 2, "train/best.pt", "ok")
    loaded = row.opener()  # the checkpoint loader of its kind, the torch backend's runner
    try:
        assert loaded.T == 2 and loaded.runner.predict(torch.zeros(3, 1, 16, 16).numpy()).shape == (3, 10)
    finally:
        loaded.runner.close()


# --- file names live in the registry only -------------------------------------------------------

def _file_literals() -> list[str]:
    """``path:line: 'literal'`` for every string constant in pipeline/ and stages/ that is exactly a
    declared output file (or ``<stage>/<file>``). pipeline/runtime is exempt: it ships alone to the
    device as staa_runtime and imports nothing from the pipeline."""
    names = {o.file for s in registry.stages() for o in s.outputs if not o.fields and o.kind != "metrics"}
    names |= {f"{s.name}/{o.file}" for s in registry.stages() for o in s.outputs if not o.fields}
    found = []
    files = [*sorted((REPO / "pipeline").rglob("*.py")), *sorted((REPO / "stages").glob("*.py"))]
    for path in files:
        rel = path.relative_to(REPO)
        if rel.parts[:2] == ("pipeline", "runtime") or rel == Path("pipeline/registry.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                found.append(f"{rel}:{node.lineno}: {node.value!r}")
    return found


def test_output_file_names_are_written_only_in_the_registry():
    found = _file_literals()
    assert not found, "name these files through pipeline.registry (file/path/artifact, ctx.output/ctx.input):\n" \
        + "\n".join(found)
