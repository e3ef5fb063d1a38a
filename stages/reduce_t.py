"""reduce_t: fine-tune the float model at fewer time steps (optionally distilling the T-step teacher).

Outputs: ``t{T}.pt`` per reduced T (pipeline checkpoints: ``load_model`` rebuilds them),
``chosen.pt`` (a copy of the checkpoint handed to qat), metrics with the accuracy table.
The T handed on is chosen on the validation split (``selected_on: "val"``); the test split is
scored for the report only, so validate's verdict is not graded on the images that chose it.
Each T's fine-tune checkpoints into ``t{T}_fit/`` and resumes from there; a finished ``t{T}.pt``
is not redone, so an interrupted run picks up where it stopped. Training logs: ``history.csv``
(one row per epoch and T) and TensorBoard scalars in ``tb/`` (tags ``reduce_t_T{T}/...``).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch

from pipeline import registry
from pipeline.checkpoint import CheckpointError, load_model, model_payload, read_checkpoint, save_atomic
from pipeline.compress.timesteps import PairedFrames, carry_to_T, choose_T_on_val, distill_step_loss, format_table
from pipeline.console import LOG_ONLY
from pipeline.data import data_bundle, eval_loader, make_loader
from pipeline.runner import StageContext, StageError, StageResult
from pipeline.training.evaluate import agreement, evaluate
from pipeline.training.finetune import FineTune, fine_tune
from pipeline.training.history import history_rows, write_history
from pipeline.training.loop import NonFiniteLoss


def run(ctx: StageContext) -> StageResult:
    cfg, r = ctx.cfg, ctx.cfg["reduce_t"]
    if not ctx.is_main:  # one process does the (small) fine-tunes; other ranks wait at the runner's barrier
        return StageResult()
    src = ctx.input("teacher")
    teacher, ckpt = ctx.load_upstream_model("teacher")
    T0 = teacher.T
    steps = sorted({int(s) for s in r["steps"]}, reverse=True)
    bad = [s for s in steps if not 1 <= s < T0]
    if bad:
        raise StageError(f"reduce_t.steps {bad} must be between 1 and model.T - 1 = {T0 - 1} (the trained T); "
                         f"fix reduce_t.steps (e.g. --set reduce_t.steps=[{max(T0 // 2, 1)}])")
    base_bundle = data_bundle(cfg, T0)
    if not len(base_bundle.val) and r["choose"] is None:
        raise StageError("reduce_t chooses the T to ship on the validation split, and this run has none; set "
                         "data.val_fraction > 0 (e.g. --set data.val_fraction=0.1), or fix the T with reduce_t.choose")
    base = _score(ctx, teacher, base_bundle, f"T={T0}")
    ctx.log.info("baseline T=%d: val top-1 %s, test top-1 %.2f%% on %d images", T0, _pct(base["val_top1"]),
                 base["test_top1"], base["test_n"])

    rows = []
    for T in steps:
        bundle = data_bundle(cfg, T) if base_bundle.is_event else base_bundle
        rows.append(_reduce_one(ctx, teacher, ckpt, T, bundle, base_bundle, base))

    gate = float(cfg["validate"]["gates"]["reduce_t"])
    try:
        chosen, why = choose_T_on_val(rows, T0, base, gate, r["choose"])
    except ValueError as exc:
        raise StageError(str(exc)) from exc
    chosen_src = src if chosen == T0 else ctx.output("reduced", T=chosen)
    shutil.copyfile(chosen_src, ctx.output("chosen"))
    write_history(ctx.output("history"), [h for row in rows for h in history_rows(row["T"], row["history"])])
    table = format_table(rows, T0, base, chosen, ctx.input_artifact("teacher"))
    ctx.log.debug("time-step reduction:\n%s", table)  # the whole table: stage.log and metrics.json
    picked = next((r for r in rows if r["T"] == chosen), None)
    ctx.log.info("chosen T=%d (%s, on the validation split): val top-1 %s vs %s at T=%d; test top-1 %.2f%%",
                 chosen, why, _pct(picked["val_top1"] if picked else base["val_top1"]), _pct(base["val_top1"]), T0,
                 picked["after_top1"] if picked else base["test_top1"])
    return StageResult(metrics={
        "T0": T0, "selected_on": "val", "baseline_val_top1": base["val_top1"], "val_n": base["val_n"],
        "baseline_top1": base["test_top1"], "baseline_top5": base["test_top5"], "test_n": base["test_n"],
        "pe_mode": r["pe_mode"], "distill": r["distill"], "alpha": r["alpha"] if r["distill"] else 0.0,
        "temperature": r["temperature"], "epochs": r["epochs"], "gate": gate,
        "chosen_T": chosen, "chosen_file": ctx.input_artifact("teacher") if chosen == T0 else chosen_src.name,
        "choice_reason": why, "table": rows, "table_md": table,
    })


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}%"


def _score(ctx: StageContext, model: torch.nn.Module, bundle: Any, what: str) -> dict[str, Any]:
    """Validation top-1 (what chooses) and test top-1/top-5 (what is reported) of one model."""
    cfg = ctx.cfg
    out: dict[str, Any] = {"val_top1": None, "val_n": len(bundle.val)}
    if len(bundle.val):
        val = evaluate(model, eval_loader(cfg, bundle.val), ctx.device, desc=f"val {what}")
        out.update(val_top1=val["top1"], val_preds=val["preds"])
    test = evaluate(model, eval_loader(cfg, bundle.test, cfg["data"]["limit_test"]), ctx.device, desc=f"test {what}")
    out.update(test_top1=test["top1"], test_top5=test["top5"], test_n=test["n"], test_preds=test["preds"])
    return out


def _reduce_one(ctx: StageContext, teacher: torch.nn.Module, ckpt: dict[str, Any], T: int, bundle: Any,
                teacher_bundle: Any, base: dict[str, Any]) -> dict[str, Any]:
    """Carry the teacher to ``T``, score it, fine-tune it, score it again; write ``t{T}.pt``."""
    cfg, r, t = ctx.cfg, ctx.cfg["reduce_t"], ctx.cfg["train"]
    out_file = ctx.output("reduced", T=T)
    if out_file.is_file():  # finished in an earlier, interrupted run of this stage
        row = read_checkpoint(out_file).get("reduce_t")
        if row and "val_top1" in row:
            ctx.log.info("T=%d already fine-tuned in this run (%s): reusing it", T, out_file.name)
            return row
    student = carry_to_T(teacher, T, r["pe_mode"]).to(ctx.device)
    before = _score(ctx, student, bundle, f"T={T} before")
    ctx.log.info("T=%d before fine-tuning: val top-1 %s, test top-1 %.2f%%", T, _pct(before["val_top1"]),
                 before["test_top1"], extra=LOG_ONLY)  # the console gets it in the "after" line
    start = time.perf_counter()
    fit_dir = ctx.out / f"t{T}_fit"
    history: list[dict[str, Any]] = []
    if r["epochs"] > 0:
        student, history = _fine_tune(ctx, teacher, student, ckpt, T, bundle, teacher_bundle, fit_dir)
    after = _score(ctx, student, bundle, f"T={T} after")
    same_images = len(after["test_preds"]) == len(base["test_preds"])
    row = {"T": T, "val_top1": after["val_top1"], "before_val_top1": before["val_top1"],
           "before_top1": before["test_top1"], "after_top1": after["test_top1"], "after_top5": after["test_top5"],
           "agreement": agreement(after["test_preds"], base["test_preds"]) if same_images else None,
           "file": out_file.name, "fine_tune_s": round(time.perf_counter() - start, 1), "history": history}
    ctx.log.info("T=%d after fine-tuning: val top-1 %s (was %s), test top-1 %.2f%% (was %.2f%%)", T,
                 _pct(after["val_top1"]), _pct(before["val_top1"]), after["test_top1"], before["test_top1"])
    save_atomic(model_payload(student, ckpt["model_cfg"], ckpt["data_meta"], reduce_t=row,
                              pe_mode=r["pe_mode"], teacher_T=teacher.T), out_file)
    _check_reloads(out_file, student)
    shutil.rmtree(fit_dir, ignore_errors=True)
    return row


def _fine_tune(ctx: StageContext, teacher: torch.nn.Module, student: torch.nn.Module, ckpt: dict[str, Any], T: int,
               bundle: Any, teacher_bundle: Any, fit_dir: Path) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """The shared fine-tune at the new T with the task loss plus (optionally) distillation."""
    cfg, r, t = ctx.cfg, ctx.cfg["reduce_t"], ctx.cfg["train"]
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
    try:
        return fine_tune(student, ft, cfg, bundle, ctx.device, ctx.checkpoints(fit_dir), stage_dir=ctx.out,
                         payload=lambda m: model_payload(m, ckpt["model_cfg"], ckpt["data_meta"]))
    except NonFiniteLoss as exc:
        raise StageError(str(exc)) from exc


def _check_reloads(path: Path, student: torch.nn.Module) -> None:
    """``load_model(t{T}.pt)`` must rebuild exactly this student, or qat/unroll would fail later."""
    try:
        reloaded, _ = load_model(path)
    except CheckpointError as exc:
        raise StageError(
            f"{path.name} does not reload with load_model ({exc}). A T-dependent layer kept its old size when "
            f"the model was carried to T={student.T} (e.g. step attention's hidden width); the model library "
            f"must record it in the model config. Until then pick steps that keep max(T // sa_ratio, 1) equal "
            f"to the trained model's") from exc
    if reloaded.T != student.T:
        raise StageError(f"{path.name} reloads at T={reloaded.T}, expected {student.T}")
