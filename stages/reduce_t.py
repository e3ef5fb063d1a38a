"""reduce_t: fine-tune the float model at fewer time steps (optionally distilling the T-step teacher).

Outputs: ``t{T}.pt`` per reduced T (pipeline checkpoints: ``load_model`` rebuilds them),
``chosen.pt`` (a copy of the checkpoint handed to qat), metrics with the accuracy table.
The T handed on is chosen on the validation split (``selected_on: "val"``); the test split is
scored for the report only, so validate's verdict is not graded on the images that chose it.
Each T's fine-tune checkpoints into ``t{T}_fit/`` and resumes from there; a finished ``t{T}.pt``
is not redone, so an interrupted run picks up where it stopped. Training logs: ``history.csv``
(one row per epoch and T) and TensorBoard scalars in ``tb/`` (tags ``reduce_t_T{T}/...``).
The recipe is ``pipeline.compress.reduce_recipe``; this module wires it.
"""
from __future__ import annotations

from pipeline.compress.reduce_recipe import ReduceError, ReducePaths, reduce_time_steps
from pipeline.runner import StageContext, StageError, StageResult
from pipeline.training.loop import NonFiniteLoss


def run(ctx: StageContext) -> StageResult:
    if not ctx.is_main:  # one process does the (small) fine-tunes; other ranks wait at the runner's barrier
        return StageResult()
    teacher, ckpt = ctx.load_upstream_model("teacher")
    paths = ReducePaths(teacher=ctx.input("teacher"), teacher_name=ctx.input_artifact("teacher"),
                        reduced=lambda T: ctx.output("reduced", T=T),
                        fit=lambda T: ctx.checkpoints(ctx.out / f"t{T}_fit"), chosen=ctx.output("chosen"),
                        history=ctx.output("history"), stage_dir=ctx.out)
    try:
        metrics = reduce_time_steps(teacher, ckpt, ctx.cfg, ctx.device, paths, ctx.log)
    except (ReduceError, NonFiniteLoss) as exc:
        raise StageError(str(exc)) from exc
    return StageResult(metrics=metrics)
