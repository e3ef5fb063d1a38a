"""qat: NNCF INT8 post-training quantisation of the chosen float model, then QAT fine-tuning.

Outputs: ``qat.pt`` (NNCF config + state dict; ``pipeline.compress.quantize.load_qat_model``
turns it into a module that exports as ONNX Q/DQ), ``ptq.pt`` (the calibrated start point),
``nncf_config.json`` (where each quantiser sits, readable), metrics: float, PTQ and QAT
accuracy side by side, ``history.csv`` (one row per QAT epoch) and TensorBoard scalars in ``tb/``.
Resumable: ``ptq.pt`` is reused and the fine-tune resumes from ``qat_fit/last.pt``.
"""
from __future__ import annotations

import json
import shutil

import torch
from torch.utils.data import DataLoader, Subset

from pipeline import registry
from pipeline.checkpoint import read_checkpoint, save_atomic
from pipeline.compress.nncf_env import prepare_nncf_kernels
from pipeline.compress.quantize import (QuantizeError, load_qat_model, nncf_config, qat_payload, quantize_model,
                                        quantizer_summary, restore_on)
from pipeline.console import LOG_ONLY
from pipeline.data import data_bundle, eval_loader
from pipeline.deploy.parity import ParityReport
from pipeline.runner import StageContext, StageError, StageResult
from pipeline.training.evaluate import agreement, evaluate
from pipeline.training.finetune import FineTune, fine_tune
from pipeline.training.history import history_rows, write_history
from pipeline.training.loop import NonFiniteLoss


def calibration_loader(dataset: torch.utils.data.Dataset, samples: int, batch_size: int, seed: int) -> DataLoader:
    """A fixed, seeded random subset of the training set (augmented as in training), in order."""
    n = min(int(samples), len(dataset))
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return DataLoader(Subset(dataset, idx), batch_size=batch_size, shuffle=False)


def run(ctx: StageContext) -> StageResult:
    cfg, q, t = ctx.cfg, ctx.cfg["qat"], ctx.cfg["train"]
    if not ctx.is_main:  # one process quantises and fine-tunes; other ranks wait at the runner's barrier
        return StageResult()
    model, ckpt = ctx.load_upstream_model("model")  # the float model to quantise (reduce_t's chosen.pt)
    kernels = prepare_nncf_kernels(ctx.device)  # on CUDA: NNCF's extension only if the toolkit matches torch
    mcfg, meta, T = ckpt["model_cfg"], ckpt["data_meta"], model.T
    bundle = data_bundle(cfg, T)
    test = eval_loader(cfg, bundle.test, cfg["data"]["limit_test"])
    fl = evaluate(model, test, ctx.device, desc="test float")
    ctx.log.info("float T=%d: test top-1 %.2f%%", T, fl["top1"])

    ptq_file = ctx.out / "ptq.pt"
    if ptq_file.is_file():  # an interrupted run already calibrated: reuse it (its ranges seed the QAT state)
        ptq_ck = read_checkpoint(ptq_file)
        qmodel, ptq = restore_on(ptq_ck, ctx.device), ptq_ck["ptq"]
    else:
        calib = calibration_loader(bundle.train, q["calibration_samples"], cfg["data"]["batch_size"], cfg["seed"])
        try:
            qmodel = quantize_model(model, calib, len(calib), q["keep_float"], q["fold_bn"], ctx.device,
                                    bias_correction=q["bias_correction"])
        except QuantizeError as exc:
            raise StageError(str(exc)) from exc
        ev = evaluate(qmodel, test, ctx.device, desc="test PTQ")
        ptq = {"top1": ev["top1"], "agreement": agreement(ev["preds"], fl["preds"])}
        save_atomic(qat_payload(qmodel, mcfg, meta, q["fold_bn"], ptq=ptq), ptq_file)
    ctx.log.info("PTQ INT8: test top-1 %.2f%% (float %.2f%%)", ptq["top1"], fl["top1"])

    history = []
    if q["epochs"] > 0:
        qmodel, history = _fine_tune(ctx, qmodel, bundle, mcfg, meta)
    write_history(ctx.output("history"), history_rows(T, history))
    qat = evaluate(qmodel, test, ctx.device, desc="test QAT", keep_logits=True)
    summary = quantizer_summary(qmodel)
    if summary["neuron_internal_quantizers"]:
        raise StageError(f"{summary['neuron_internal_quantizers']} quantisers ended up inside neurons; the ignored "
                         f"scope no longer matches the model's NNCF op names (pipeline/compress/quantize.py)")
    save_atomic(qat_payload(qmodel, mcfg, meta, q["fold_bn"], float_top1=fl["top1"], ptq_top1=ptq["top1"],
                            qat_top1=qat["top1"], keep_float=list(q["keep_float"])), ctx.output("qat"))
    ctx.output("nncf_config").write_text(json.dumps(nncf_config(qmodel, plain=True), indent=1))
    # the deployment path: the reloaded, Q/DQ-exportable module must predict what the QAT model predicts
    exportable, _ = load_qat_model(ctx.output("qat"))
    exportable = exportable.to(ctx.device)
    exp = evaluate(exportable, test, ctx.device, desc="test QAT (Q/DQ module)", keep_logits=True)
    same = _qdq_module_agreement(ctx, qat["logits"], exp["logits"])
    if same < 99.0:
        raise StageError(f"the Q/DQ export module agrees with the QAT model on only {same:.2f}% of test images "
                         f"(ties excused); see pipeline/compress/qdq.py")
    for leftover in ("ptq.pt", "qat_fit"):  # the start point and resume state are not deliverables
        path = ctx.out / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    ctx.log.info("INT8 QAT: test top-1 %.2f%% vs float %.2f%% (delta %+.2f; PTQ %.2f%%)", qat["top1"], fl["top1"],
                 qat["top1"] - fl["top1"], ptq["top1"])
    return StageResult(metrics={
        "T": T, "float_top1": fl["top1"], "ptq_top1": ptq["top1"], "qat_top1": qat["top1"], "qat_top5": qat["top5"],
        "delta_vs_float": qat["top1"] - fl["top1"], "agreement_vs_float": agreement(qat["preds"], fl["preds"]),
        "qdq_module_top1": exp["top1"], "qdq_module_agreement": same, "test_n": qat["n"],
        "keep_float": list(q["keep_float"]), "fold_bn": q["fold_bn"], "bias_correction": q["bias_correction"],
        "epochs": q["epochs"], "ptq_agreement_vs_float": ptq["agreement"], "nncf_kernels": kernels,
        "calibration_samples": min(q["calibration_samples"], len(bundle.train)), **summary, "history": history,
        "table_md": _table(T, fl["top1"], ptq["top1"], qat["top1"]),
    })


def _fine_tune(ctx: StageContext, qmodel: torch.nn.Module, bundle, mcfg: dict, meta: dict):
    """QAT epochs with the task loss; quantiser scales train with the weights (no weight decay on them)."""
    cfg, q, t = ctx.cfg, ctx.cfg["qat"], ctx.cfg["train"]
    # fp32 throughout: the quantiser-scale gradients are small, and QAT is a few epochs
    ft = FineTune(desc="qat", epochs=q["epochs"], lr=q["lr"], lr_key="qat.lr", seed=cfg["seed"],
                  max_batches=q["max_batches"], amp=False, cpu_bf16=False, no_decay=_no_decay)
    try:
        return fine_tune(qmodel, ft, cfg, bundle, ctx.device, ctx.checkpoints(ctx.out / "qat_fit"), stage_dir=ctx.out,
                         payload=lambda m: qat_payload(m, mcfg, meta, q["fold_bn"]))
    except NonFiniteLoss as exc:
        raise StageError(str(exc)) from exc


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    """NNCF's quantiser parameters and biases/gains (1-D) train without weight decay."""
    return "nncf" in name or p.dim() <= 1


def _qdq_module_agreement(ctx: StageContext, qat_logits: torch.Tensor, exp_logits: torch.Tensor) -> float:
    """Top-1 agreement (%) of the exportable Q/DQ module with the QAT model, excusing near-ties.

    Why not raw agreement: quantised logits tie often, and the two modules' logits differ by float
    rounding (~1e-7), so a tied image's first-index top-1 may go either way (measured: 2 of 100
    N-MNIST test images, every spike identical, logits within 2.4e-7). An image counts as a
    disagreement only when the QAT model's top-2 margin exceeds twice ``export.max_abs_diff``.
    Reads the logits both test evaluations already kept: no extra pass over the test set.
    """
    rep = ParityReport(tie_tol=2 * ctx.cfg["export"]["max_abs_diff"])
    rep.update(qat_logits, exp_logits)
    ctx.log.info("Q/DQ module vs QAT model: %d test images, %d top-1 differences beyond ties (%d within), "
                 "logits max |diff| %.3g", rep.n, rep.top1_mismatches_beyond_tol,
                 rep.top1_mismatches - rep.top1_mismatches_beyond_tol, rep.max_abs_diff_all, extra=LOG_ONLY)
    return 100.0 * (1 - rep.top1_mismatches_beyond_tol / max(rep.n, 1))


def _table(T: int, float_top1: float, ptq_top1: float, qat_top1: float) -> str:
    return "\n".join([
        "| model | test top-1 | delta vs float |", "|---|---|---|",
        f"| float T={T} | {float_top1:.2f} | 0.00 |",
        f"| INT8 PTQ (calibration only) | {ptq_top1:.2f} | {ptq_top1 - float_top1:+.2f} |",
        f"| INT8 QAT | {qat_top1:.2f} | {qat_top1 - float_top1:+.2f} |",
    ])
