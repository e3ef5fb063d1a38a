"""The time-step reduction recipe: score the T-step teacher, carry it to each smaller T, fine-tune there
(optionally distilling the teacher), check each result reloads, and choose the T to hand on on the
validation split. The reduce_t stage (stages/reduce_t.py) hands it the teacher, its settings and the paths.

A finished ``t{T}.pt`` is not redone and each fine-tune resumes from its checkpoints, so an interrupted
run picks up where it stopped. Raises :class:`ReduceError` for a setting or a check that fails and
:class:`~pipeline.training.loop.NonFiniteLoss` for a diverging fine-tune; the stage turns both into its error.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from pipeline.checkpoint import CheckpointError, load_model, model_payload, read_checkpoint, save_atomic
from pipeline.compress.timesteps import PairedFrames, carry_to_T, choose_T_on_val, distill_step_loss, format_table
from pipeline.console import LOG_ONLY
from pipeline.data import data_bundle, eval_loader, make_loader
from pipeline.training.evaluate import agreement, evaluate
from pipeline.training.finetune import FineTune, fine_tune
from pipeline.training.history import history_rows, write_history
from pipeline.training.loop import Checkpoints


class ReduceError(ValueError):
    """A time-step setting does not fit the run, or a reduced model does not reload."""


@dataclass(frozen=True)
class ReducePaths:
    """What the recipe reads and writes (the stage names every file)."""

    teacher: Path  # the T-step teacher's checkpoint (copied as ``chosen`` when its T is kept)
    teacher_name: str  # its name in tables and metrics (``train/best.pt``)
    reduced: Callable[[int], Path]  # the fine-tuned model at T (``t{T}.pt``)
    fit: Callable[[int], Checkpoints]  # the fine-tune's checkpoints at T (removed when it is done)
    chosen: Path  # a copy of the checkpoint handed on
    history: Path  # one row per epoch and T
    stage_dir: Path  # TensorBoard scalars go to its tb/


@dataclass
class _Run:
    cfg: Mapping[str, Any]
    device: str
    log: logging.Logger


def reduce_time_steps(teacher: torch.nn.Module, ckpt: Mapping[str, Any], cfg: Mapping[str, Any], device: str,
                      paths: ReducePaths, log: logging.Logger) -> dict[str, Any]:
    """Reduce the teacher to every T in ``reduce_t.steps``, choose one on validation, write ``paths.chosen``;
    returns the stage's metrics (the table of every T, the choice and why)."""
    r = cfg["reduce_t"]
    run = _Run(cfg, device, log)
    T0 = teacher.T
    steps = sorted({int(s) for s in r["steps"]}, reverse=True)
    bad = [s for s in steps if not 1 <= s < T0]
    if bad:
        raise ReduceError(f"reduce_t.steps {bad} must be between 1 and model.T - 1 = {T0 - 1} (the trained T); "
                          f"fix reduce_t.steps (e.g. --set reduce_t.steps=[{max(T0 // 2, 1)}])")
    base_bundle = data_bundle(cfg, T0)
    if not len(base_bundle.val) and r["choose"] is None:
        raise ReduceError("reduce_t chooses the T to ship on the validation split, and this run has none; set "
                          "data.val_fraction > 0 (e.g. --set data.val_fraction=0.1), or fix the T with reduce_t.choose")
    base = _score(run, teacher, base_bundle, f"T={T0}")
    log.info("baseline T=%d: val top-1 %s, test top-1 %.2f%% on %d images", T0, _pct(base["val_top1"]),
             base["test_top1"], base["test_n"])

    rows = []
    for T in steps:
        bundle = data_bundle(cfg, T) if base_bundle.is_event else base_bundle
        rows.append(_reduce_one(run, teacher, ckpt, T, bundle, base_bundle, base, paths))

    gate = float(cfg["validate"]["gates"]["reduce_t"])
    try:
        chosen, why = choose_T_on_val(rows, T0, base, gate, r["choose"])
    except ValueError as exc:
        raise ReduceError(str(exc)) from exc
    chosen_src = paths.teacher if chosen == T0 else paths.reduced(chosen)
    shutil.copyfile(chosen_src, paths.chosen)
    write_history(paths.history, [h for row in rows for h in history_rows(row["T"], row["history"])])
    table = format_table(rows, T0, base, chosen, paths.teacher_name)
    log.debug("time-step reduction:\n%s", table)  # the whole table: stage.log and metrics.json
    picked = next((r for r in rows if r["T"] == chosen), None)
    log.info("chosen T=%d (%s, on the validation split): val top-1 %s vs %s at T=%d; test top-1 %.2f%%",
             chosen, why, _pct(picked["val_top1"] if picked else base["val_top1"]), _pct(base["val_top1"]), T0,
             picked["after_top1"] if picked else base["test_top1"])
    return {
        "T0": T0, "selected_on": "val", "baseline_val_top1": base["val_top1"], "val_n": base["val_n"],
        "baseline_top1": base["test_top1"], "baseline_top5": base["test_top5"], "test_n": base["test_n"],
        "pe_mode": r["pe_mode"], "distill": r["distill"], "alpha": r["alpha"] if r["distill"] else 0.0,
        "temperature": r["temperature"], "epochs": r["epochs"], "gate": gate,
        "chosen_T": chosen, "chosen_file": paths.teacher_name if chosen == T0 else chosen_src.name,
        "choice_reason": why, "table": rows, "table_md": table,
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}%"


def _score(run: _Run, model: torch.nn.Module, bundle: Any, what: str) -> dict[str, Any]:
    """Validation top-1 (what chooses) and test top-1/top-5 (what is reported) of one model."""
    cfg = run.cfg
    out: dict[str, Any] = {"val_top1": None, "val_n": len(bundle.val)}
    if len(bundle.val):
        val = evaluate(model, eval_loader(cfg, bundle.val), run.device, desc=f"val {what}")
        out.update(val_top1=val["top1"], val_preds=val["preds"])
    test = evaluate(model, eval_loader(cfg, bundle.test, cfg["data"]["limit_test"]), run.device, desc=f"test {what}")
    out.update(test_top1=test["top1"], test_top5=test["top5"], test_n=test["n"], test_preds=test["preds"])
    return out


def _reduce_one(run: _Run, teacher: torch.nn.Module, ckpt: Mapping[str, Any], T: int, bundle: Any,
                teacher_bundle: Any, base: dict[str, Any], paths: ReducePaths) -> dict[str, Any]:
    """Carry the teacher to ``T``, score it, fine-tune it, score it again; write ``t{T}.pt``."""
    r, log = run.cfg["reduce_t"], run.log
    out_file = paths.reduced(T)
    if out_file.is_file():  # finished in an earlier, interrupted run of this stage
        row = read_checkpoint(out_file).get("reduce_t")
        if row and "val_top1" in row:
            log.info("T=%d already fine-tuned in this run (%s): reusing it", T, out_file.name)
            return row
    student = carry_to_T(teacher, T, r["pe_mode"]).to(run.device)
    before = _score(run, student, bundle, f"T={T} before")
    log.info("T=%d before fine-tuning: val top-1 %s, test top-1 %.2f%%", T, _pct(before["val_top1"]),
             before["test_top1"], extra=LOG_ONLY)  # the console gets it in the "after" line
    start = time.perf_counter()
    fit = paths.fit(T)
    history: list[dict[str, Any]] = []
    if r["epochs"] > 0:
        student, history = _fine_tune(run, teacher, student, ckpt, T, bundle, teacher_bundle, fit, paths.stage_dir)
    after = _score(run, student, bundle, f"T={T} after")
    same_images = len(after["test_preds"]) == len(base["test_preds"])
    row = {"T": T, "val_top1": after["val_top1"], "before_val_top1": before["val_top1"],
           "before_top1": before["test_top1"], "after_top1": after["test_top1"], "after_top5": after["test_top5"],
           "agreement": agreement(after["test_preds"], base["test_preds"]) if same_images else None,
           "file": out_file.name, "fine_tune_s": round(time.perf_counter() - start, 1), "history": history}
    log.info("T=%d after fine-tuning: val top-1 %s (was %s), test top-1 %.2f%% (was %.2f%%)", T,
             _pct(after["val_top1"]), _pct(before["val_top1"]), after["test_top1"], before["test_top1"])
    save_atomic(model_payload(student, ckpt["model_cfg"], ckpt["data_meta"], reduce_t=row,
                              pe_mode=r["pe_mode"], teacher_T=teacher.T), out_file)
    check_reloads(out_file, student)
    shutil.rmtree(fit.folder, ignore_errors=True)
    return row


def _fine_tune(run: _Run, teacher: torch.nn.Module, student: torch.nn.Module, ckpt: Mapping[str, Any], T: int,
               bundle: Any, teacher_bundle: Any, fit: Checkpoints,
               stage_dir: Path) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """The shared fine-tune at the new T with the task loss plus (optionally) distillation."""
    cfg = run.cfg
    r, t = cfg["reduce_t"], cfg["train"]
    distill = bool(r["distill"]) and r["alpha"] > 0
    teacher_frames, loader = 0, None
    if distill and bundle.is_event:  # the teacher needs its own T-frame view of each recording
        teacher_frames = teacher.T
        loader = make_loader(PairedFrames(bundle.train, teacher_bundle.train), cfg["data"]["batch_size"], train=True,
                             workers=cfg["data"]["workers"], seed=cfg["seed"])
    ft = FineTune(desc=f"reduce_t T={T}", epochs=r["epochs"], lr=r["lr"], lr_key="reduce_t.lr", seed=cfg["seed"] + T,
                  max_batches=r["max_batches"], amp=t["amp"], cpu_bf16=t["cpu_bf16"], loader=loader,
                  step_loss=distill_step_loss(teacher if distill else None, r["alpha"], r["temperature"], t["loss"],
                                              t["label_smoothing"], teacher_frames))
    return fine_tune(student, ft, cfg, bundle, run.device, fit, stage_dir=stage_dir,
                     payload=lambda m: model_payload(m, ckpt["model_cfg"], ckpt["data_meta"]))


def check_reloads(path: Path, student: torch.nn.Module) -> None:
    """``load_model(t{T}.pt)`` must rebuild exactly this student, or qat/unroll would fail later."""
    try:
        reloaded, _ = load_model(path)
    except CheckpointError as exc:
        raise ReduceError(
            f"{path.name} does not reload with load_model ({exc}). A T-dependent layer kept its old size when "
            f"the model was carried to T={student.T} (e.g. step attention's hidden width); the model library "
            f"must record it in the model config. Until then pick steps that keep max(T // sa_ratio, 1) equal "
            f"to the trained model's") from exc
    if reloaded.T != student.T:
        raise ReduceError(f"{path.name} reloads at T={reloaded.T}, expected {student.T}")


__all__ = ["ReduceError", "ReducePaths", "check_reloads", "reduce_time_steps"]
