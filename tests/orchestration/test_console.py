"""The console filter and the training-log helpers, on real loggers (no subprocess: fast)."""
from __future__ import annotations

import logging
import sys
import warnings

import pytest
import torch

import pipeline.console as console_module
from pipeline.checkpoint import model_payload
from pipeline.config import load_config
from pipeline.console import LOG_ONLY, ConsoleFilter, quiet_nncf, route_torch_logs
from pipeline.data import data_bundle, data_meta, model_config
from pipeline.models import build_model
from pipeline.report.plots import TRAINING_CURVES, draw_training_curves
from pipeline.training.finetune import FineTune, fine_tune
from pipeline.training.loop import Checkpoints
from pipeline.training.history import history_rows, read_history, write_history
from pipeline.training.loop import on_console


def _record(name: str, level: int, msg: str = "m", **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord(name, level, __file__, 1, msg, None, None)
    rec.__dict__.update(extra)
    return rec


def test_console_keeps_project_lines_and_holds_library_warnings():
    console = ConsoleFilter()
    assert console.filter(_record("pipeline.train", logging.INFO))
    assert not console.filter(_record("pipeline.train", logging.INFO, **LOG_ONLY))  # stage.log only
    assert console.filter(_record("pipeline.train", logging.WARNING, **LOG_ONLY))  # a warning always shows
    assert not console.filter(_record("torch.utils.cpp_extension", logging.WARNING))
    assert not console.filter(_record("py.warnings", logging.WARNING, "/site-packages/x.py:3: UserWarning: u"))
    assert console.held_warnings == 2
    assert console.filter(_record("onnxruntime", logging.ERROR))
    # a warnings.warn from the project's own code is the project's: it shows
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("mine")
    own = warnings.formatwarning(str(caught[0].message), caught[0].category, caught[0].filename, caught[0].lineno)
    assert "tests" in own  # this file is not under pipeline/ or stages/
    assert not console.filter(_record("py.warnings", logging.WARNING, own))
    project_file = console_module.__file__
    assert console.filter(_record("py.warnings", logging.WARNING, f"{project_file}:9: UserWarning: mine"))
    verbose = ConsoleFilter(verbose=True)
    assert verbose.filter(_record("nncf", logging.DEBUG)) and verbose.filter(_record("pipeline", logging.INFO, **LOG_ONLY))


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_torch_warnings_reach_the_root_logger():
    torch_log = logging.getLogger("torch")
    route_torch_logs()
    assert torch_log.propagate
    assert not [h for h in torch_log.handlers if type(h).__name__ == "_StderrHandler"]
    keep = _Keep()  # stands for stage.log's handler on the root logger
    logging.getLogger().addHandler(keep)
    try:
        logging.getLogger("torch.utils.cpp_extension").warning("no CUDA runtime")
    finally:
        logging.getLogger().removeHandler(keep)
    assert [r.getMessage() for r in keep.records] == ["no CUDA runtime"]


def test_nncf_rich_bars_are_off_off_a_terminal():
    import nncf  # noqa: F401
    import rich

    assert not sys.stdout.isatty()  # pytest captures stdout
    quiet_nncf()
    assert rich.get_console().quiet


@pytest.mark.parametrize("epochs, shown", [(15, [1, 8, 15]), (4, [1, 2, 4]), (2, [1, 2]), (1, [1]), (200, [1, 100, 200])])
def test_a_few_epoch_lines_reach_the_console(epochs, shown):
    assert [e for e in range(1, epochs + 1) if on_console(e, epochs)] == shown
    assert not any(on_console(e, epochs, lines=0) for e in range(1, epochs + 1))


def _fit_history(epochs: int, val: bool = True) -> list[dict]:
    return [{"epoch": e, "train_loss": 2.0 / e, "train_top1": 10.0 * e, "images_per_s": 100.0, "lr": 0.1 / e,
             "epoch_s": 1.5, **({"val_top1": 9.0 * e, "val_top5": 50.0, "val_loss": 2.1 / e} if val else {})}
            for e in range(1, epochs + 1)]


def test_history_csv_round_trip_and_training_curves(tmp_path):
    up = {s: tmp_path / s for s in ("train", "reduce_t", "qat", "export")}
    for d in up.values():
        d.mkdir()
    write_history(up["train"] / "history.csv", history_rows(4, _fit_history(3)))
    write_history(up["reduce_t"] / "history.csv",
                  history_rows(3, _fit_history(2)) + history_rows(2, _fit_history(2, val=False)))
    write_history(up["qat"] / "history.csv", history_rows(2, []))  # header only: drawn as nothing
    rows = read_history(up["reduce_t"] / "history.csv")
    assert [(r["epoch"], r["T"]) for r in rows] == [(1, 3), (2, 3), (1, 2), (2, 2)]
    assert rows[0] == {"epoch": 1, "T": 3, "train_loss": 2.0, "train_top1": 10.0, "val_top1": 9.0, "val_loss": 2.1,
                       "lr": 0.1, "seconds": 1.5}
    assert rows[2]["val_top1"] is None and rows[2]["val_loss"] is None  # no validation split
    out = tmp_path / "plots"
    out.mkdir()
    png = f"{TRAINING_CURVES}.png"
    assert draw_training_curves({s: d / "history.csv" for s, d in up.items()}, out / png) == png
    assert (out / png).stat().st_size > 10_000
    assert draw_training_curves({s: up[s] / "history.csv" for s in ("qat", "export")}, tmp_path / png) is None
    assert not (tmp_path / png).exists()


def test_fine_tune_history_has_one_row_per_epoch(write_config, tmp_path):
    """The shared fine-tune on a real tiny model: history rows equal the epochs run, TensorBoard written."""
    cfg = load_config(write_config())
    bundle = data_bundle(cfg)
    mcfg = model_config(cfg, bundle)
    torch.manual_seed(0)
    net = build_model(mcfg)
    ft = FineTune(desc="reduce_t T=2", epochs=2, lr=1e-3, lr_key="reduce_t.lr", seed=0, max_batches=1, amp=False)
    model, history = fine_tune(net, ft, cfg, bundle, "cpu", Checkpoints(tmp_path / "fit", "best.pt", "last.pt"),
                               stage_dir=tmp_path,
                               payload=lambda m: model_payload(m, mcfg, data_meta(bundle)))
    assert model is net and not model.training
    assert [h["epoch"] for h in history] == [1, 2] and all("val_top1" in h for h in history)
    assert len(history_rows(2, history)) == 2
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert (tmp_path / "fit" / "best.pt").is_file()
