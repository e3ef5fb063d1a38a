"""A stage inserted into the chain (between reduce_t and qat, qat reading its output) needs only its module,
its registry row, its schema section and a config line: the registry derives every stage's needs from the
inputs the rows declare, and the new row's ``feeds`` rewires qat's declared input ``model`` to it."""
from __future__ import annotations

import pytest

from pipeline import registry
from pipeline.config import load_config
from pipeline.registry import FLOAT_AT_T, Output, StageSpec
from pipeline.runner import StageContext, run_stage, run_store, stage_key
from pipeline.schema import SCHEMA

RELABEL = StageSpec("relabel", ("model=reduce_t.chosen",), ("relabel",), (
    Output("model", "relabelled.pt", "checkpoint", ("torch",), "fp32", parent=FLOAT_AT_T, steps_from="config"),
    Output("metrics", "metrics.json", "metrics"),
), "roll the classifier's rows (a test's stand-in for a pruning or distillation step)",
    module="tests.helpers.relabel_stage", feeds=("qat.model=model",))


@pytest.fixture
def relabel():
    before = {s.name: (s.needs, s.wiring) for s in registry.stages()}
    with registry.temporary(RELABEL, section={"shift": 1}, after="reduce_t"):
        yield RELABEL
    assert {s.name: (s.needs, s.wiring) for s in registry.stages()} == before and "relabel" not in SCHEMA


def test_the_inserted_stage_is_wired_between_reduce_t_and_qat(relabel):
    names = registry.names()
    assert names.index("reduce_t") + 1 == names.index("relabel") == names.index("qat") - 1
    qat = registry.spec("qat")
    assert qat.needs == ("relabel",) and dict(qat.wiring) == {"model": "relabel.model"}
    assert registry.spec("relabel").needs == ("reduce_t",)
    assert "relabel" in registry.spec("validate").needs  # validate reads every stage: its model is measured
    assert ("relabel", RELABEL.output("model")) in registry.measured()
    assert registry.upstream("qat") == ("train", "reduce_t", "relabel")
    assert "relabel" in registry.config_sections("export")  # graphs hash the new stage's settings too
    assert registry.check() == []


def test_qat_reads_what_its_row_declares_and_nothing_else(relabel, write_config, tmp_path):
    cfg = load_config(write_config())
    ctx = StageContext(cfg=cfg, spec=registry.spec("qat"), out=tmp_path, inputs={"relabel": tmp_path / "relabel"},
                       store=run_store(cfg), device="cpu", log=None)
    assert ctx.input("model") == tmp_path / "relabel" / "relabelled.pt"
    assert ctx.input_artifact("model") == "relabel/relabelled.pt"
    for undeclared in ("reduce_t.chosen", "train.best", "modle"):
        with pytest.raises(KeyError, match="reads no input"):
            ctx.input(undeclared)


def test_qat_cache_key_follows_the_inserted_stage_config(relabel, write_config):
    cfg = load_config(write_config({"relabel": {"shift": 1}}))
    other = load_config(write_config({"relabel": {"shift": 2}}))
    store = run_store(cfg)
    assert stage_key(cfg, registry.spec("qat"), store) != stage_key(other, registry.spec("qat"), store)
    assert stage_key(cfg, registry.spec("reduce_t"), store) == stage_key(other, registry.spec("reduce_t"), store)


@pytest.mark.slow
def test_the_chain_runs_through_the_inserted_stage(relabel, write_config):
    """train -> reduce_t -> relabel -> qat through the real runner; qat quantises relabel's model."""
    from pipeline.checkpoint import load_model
    from pipeline.data import data_bundle, eval_loader
    from pipeline.training.evaluate import evaluate

    cfg = load_config(write_config({"relabel": {"shift": 3}, "train": {"epochs": 1}, "reduce_t": {"epochs": 0},
                                    "qat": {"epochs": 0}}))
    for name in ("train", "reduce_t", "relabel", "qat"):
        assert run_stage(cfg, name) == "done", name
    store = run_store(cfg)
    assert set(store.manifest("qat").upstream) == {"relabel"}
    assert store.manifest("relabel").metrics["source"] == "reduce_t/chosen.pt"
    chosen, _ = load_model(store.stage_dir("reduce_t") / registry.file("reduce_t", "chosen"))
    relabelled, _ = load_model(store.stage_dir("relabel") / registry.file("relabel", "model"))
    test = eval_loader(cfg, data_bundle(cfg, relabelled.T).test, cfg["data"]["limit_test"])
    mine = evaluate(relabelled, test, "cpu")
    theirs = evaluate(chosen, test, "cpu")
    assert (mine["preds"] != theirs["preds"]).any()  # the two models differ, so the figure tells which qat read
    assert store.manifest("qat").metrics["float_top1"] == mine["top1"]
