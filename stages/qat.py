"""qat: NNCF INT8 post-training quantisation of the chosen float model, then QAT fine-tuning.

Outputs: ``qat.pt`` (NNCF config + state dict; ``pipeline.compress.quantize.load_qat_model``
turns it into a module that exports as ONNX Q/DQ), ``nncf_config.json`` (where each quantiser
sits, readable), metrics: float, PTQ and QAT accuracy side by side, ``history.csv`` (one row per
QAT epoch) and TensorBoard scalars in ``tb/``. The recipe is ``pipeline.compress.qat_recipe``;
this module wires it. Resumable: ``ptq.pt`` (the calibrated start point) is reused and the
fine-tune resumes from ``qat_fit/last.pt``.
"""
from __future__ import annotations

from pipeline.compress.qat_recipe import QatPaths, quantise
from pipeline.compress.quantize import QuantizeError
from pipeline.runner import StageContext, StageError, StageResult
from pipeline.training.loop import NonFiniteLoss


def run(ctx: StageContext) -> StageResult:
    if not ctx.is_main:  # one process quantises and fine-tunes; other ranks wait at the runner's barrier
        return StageResult()
    model, ckpt = ctx.load_upstream_model("model")  # the float model to quantise (reduce_t's chosen.pt)
    paths = QatPaths(qat=ctx.output("qat"), nncf_config=ctx.output("nncf_config"), ptq=ctx.out / "ptq.pt",
                     fit=ctx.checkpoints(ctx.out / "qat_fit"), history=ctx.output("history"), stage_dir=ctx.out)
    try:
        metrics = quantise(model, ckpt, ctx.cfg, ctx.device, paths, ctx.log)
    except (QuantizeError, NonFiniteLoss) as exc:
        raise StageError(str(exc)) from exc
    return StageResult(metrics=metrics)
