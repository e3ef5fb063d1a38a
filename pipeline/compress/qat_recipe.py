"""The QAT recipe: NNCF INT8 post-training quantisation of a float model, QAT fine-tuning, and the checks
that the result deploys (no quantiser inside a neuron; the reloaded Q/DQ module predicts what the QAT model
predicts). The qat stage (stages/qat.py) hands it the model, the data, its settings and the paths to write.

Resumable: a calibrated start point at ``work.ptq`` is reused, and the fine-tune resumes from ``work.fit``.
Raises :class:`~pipeline.compress.quantize.QuantizeError` for a setting or a check that fails and
:class:`~pipeline.training.loop.NonFiniteLoss` for a diverging fine-tune; the stage turns both into its error.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader, Subset

from pipeline.checkpoint import read_checkpoint, save_atomic
from pipeline.compress.quantize import (QuantizeError, load_qat_model, nncf_config, qat_payload, quantize_model,
                                        quantizer_summary, restore_on)
from pipeline.console import LOG_ONLY
from pipeline.compress.nncf_env import prepare_nncf_kernels
from pipeline.data import DataBundle, data_bundle, eval_loader
from pipeline.deploy.proofs.parity import ParityReport
from pipeline.training.evaluate import agreement, evaluate
from pipeline.training.finetune import FineTune, fine_tune
from pipeline.training.history import history_rows, write_history
from pipeline.training.loop import Checkpoints

MIN_QDQ_AGREEMENT = 99.0  # % of test images on which the Q/DQ export module must agree with the QAT model


@dataclass(frozen=True)
class QatPaths:
    """Where the recipe writes: its deliverables (``qat``, ``nncf_config``) and its resume state
    (``ptq``: the calibrated start point; ``fit``: the fine-tune's checkpoints), removed at the end."""

    qat: Path
    nncf_config: Path
    ptq: Path
    fit: Checkpoints
    history: Path  # one row per QAT epoch (history.csv)
    stage_dir: Path  # TensorBoard scalars go to its tb/


def calibration_loader(dataset: torch.utils.data.Dataset, samples: int, batch_size: int, seed: int) -> DataLoader:
    """A fixed, seeded random subset of the training set (augmented as in training), in order."""
    n = min(int(samples), len(dataset))
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return DataLoader(Subset(dataset, idx), batch_size=batch_size, shuffle=False)


def quantise(model: torch.nn.Module, ckpt: Mapping[str, Any], cfg: Mapping[str, Any], device: str, paths: QatPaths,
             log: logging.Logger) -> dict[str, Any]:
    """PTQ then QAT of the float ``model`` (its checkpoint ``ckpt``) on the run's data (``cfg``: the run's
    settings, ``qat`` and the train recipe); writes ``paths.qat`` and ``paths.nncf_config``; returns the
    stage's metrics (float, PTQ and QAT side by side, the table)."""
    q = cfg["qat"]
    kernels = prepare_nncf_kernels(device)  # on CUDA: NNCF's extension only if the toolkit matches torch
    mcfg, meta, T = ckpt["model_cfg"], ckpt["data_meta"], model.T
    bundle = data_bundle(cfg, T)
    test = eval_loader(cfg, bundle.test, cfg["data"]["limit_test"])
    fl = evaluate(model, test, device, desc="test float")
    log.info("float T=%d: test top-1 %.2f%%", T, fl["top1"])

    if paths.ptq.is_file():  # an interrupted run already calibrated: reuse it (its ranges seed the QAT state)
        ptq_ck = read_checkpoint(paths.ptq)
        qmodel, ptq = restore_on(ptq_ck, device), ptq_ck["ptq"]
    else:
        calib = calibration_loader(bundle.train, q["calibration_samples"], cfg["data"]["batch_size"], cfg["seed"])
        qmodel = quantize_model(model, calib, len(calib), q["keep_float"], q["fold_bn"], device,
                                bias_correction=q["bias_correction"])
        ev = evaluate(qmodel, test, device, desc="test PTQ")
        ptq = {"top1": ev["top1"], "agreement": agreement(ev["preds"], fl["preds"])}
        save_atomic(qat_payload(qmodel, mcfg, meta, q["fold_bn"], ptq=ptq), paths.ptq)
    log.info("PTQ INT8: test top-1 %.2f%% (float %.2f%%)", ptq["top1"], fl["top1"])

    history: list[dict[str, Any]] = []
    if q["epochs"] > 0:
        qmodel, history = _fine_tune(qmodel, cfg, bundle, device, paths, mcfg, meta)
    write_history(paths.history, history_rows(T, history))
    qat = evaluate(qmodel, test, device, desc="test QAT", keep_logits=True)
    summary = quantizer_summary(qmodel)
    if summary["neuron_internal_quantizers"]:
        raise QuantizeError(f"{summary['neuron_internal_quantizers']} quantisers ended up inside neurons; the ignored "
                            f"scope no longer matches the model's NNCF op names (pipeline/compress/quantize.py)")
    save_atomic(qat_payload(qmodel, mcfg, meta, q["fold_bn"], float_top1=fl["top1"], ptq_top1=ptq["top1"],
                            qat_top1=qat["top1"], keep_float=list(q["keep_float"])), paths.qat)
    paths.nncf_config.write_text(json.dumps(nncf_config(qmodel, plain=True), indent=1))
    # the deployment path: the reloaded, Q/DQ-exportable module must predict what the QAT model predicts
    exportable, _ = load_qat_model(paths.qat)
    exportable = exportable.to(device)
    exp = evaluate(exportable, test, device, desc="test QAT (Q/DQ module)", keep_logits=True)
    same = qdq_module_agreement(qat["logits"], exp["logits"], 2 * cfg["export"]["max_abs_diff"], log)
    if same < MIN_QDQ_AGREEMENT:
        raise QuantizeError(f"the Q/DQ export module agrees with the QAT model on only {same:.2f}% of test images "
                            f"(ties excused); see pipeline/compress/qdq.py")
    for leftover in (paths.ptq, Path(paths.fit.folder)):  # the start point and resume state are not deliverables
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    log.info("INT8 QAT: test top-1 %.2f%% vs float %.2f%% (delta %+.2f; PTQ %.2f%%)", qat["top1"], fl["top1"],
             qat["top1"] - fl["top1"], ptq["top1"])
    return {
        "T": T, "float_top1": fl["top1"], "ptq_top1": ptq["top1"], "qat_top1": qat["top1"], "qat_top5": qat["top5"],
        "delta_vs_float": qat["top1"] - fl["top1"], "agreement_vs_float": agreement(qat["preds"], fl["preds"]),
        "qdq_module_top1": exp["top1"], "qdq_module_agreement": same, "test_n": qat["n"],
        "keep_float": list(q["keep_float"]), "fold_bn": q["fold_bn"], "bias_correction": q["bias_correction"],
        "epochs": q["epochs"], "ptq_agreement_vs_float": ptq["agreement"], "nncf_kernels": kernels,
        "calibration_samples": min(q["calibration_samples"], len(bundle.train)), **summary, "history": history,
        "table_md": qat_table(T, fl["top1"], ptq["top1"], qat["top1"]),
    }


def _fine_tune(qmodel: torch.nn.Module, cfg: Mapping[str, Any], bundle: DataBundle, device: str, paths: QatPaths,
               mcfg: dict, meta: dict) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """QAT epochs with the task loss; quantiser scales train with the weights (no weight decay on them)."""
    q = cfg["qat"]
    # fp32 throughout: the quantiser-scale gradients are small, and QAT is a few epochs
    ft = FineTune(desc="qat", epochs=q["epochs"], lr=q["lr"], lr_key="qat.lr", seed=cfg["seed"],
                  max_batches=q["max_batches"], amp=False, cpu_bf16=False, no_decay=no_decay)
    return fine_tune(qmodel, ft, cfg, bundle, device, paths.fit, stage_dir=paths.stage_dir,
                     payload=lambda m: qat_payload(m, mcfg, meta, q["fold_bn"]))


def no_decay(name: str, p: torch.nn.Parameter) -> bool:
    """NNCF's quantiser parameters and biases/gains (1-D) train without weight decay."""
    return "nncf" in name or p.dim() <= 1


def qdq_module_agreement(qat_logits: torch.Tensor, exp_logits: torch.Tensor, tie_tol: float,
                         log: logging.Logger) -> float:
    """Top-1 agreement (%) of the exportable Q/DQ module with the QAT model, excusing near-ties.

    Why not raw agreement: quantised logits tie often, and the two modules' logits differ by float
    rounding (~1e-7), so a tied image's first-index top-1 may go either way (measured: 2 of 100
    N-MNIST test images, every spike identical, logits within 2.4e-7). An image counts as a
    disagreement only when the QAT model's top-2 margin exceeds ``tie_tol`` (twice ``export.max_abs_diff``).
    Reads the logits both test evaluations already kept: no extra pass over the test set.
    """
    rep = ParityReport(tie_tol=tie_tol)
    rep.update(qat_logits, exp_logits)
    log.info("Q/DQ module vs QAT model: %d test images, %d top-1 differences beyond ties (%d within), "
             "logits max |diff| %.3g", rep.n, rep.top1_mismatches_beyond_tol,
             rep.top1_mismatches - rep.top1_mismatches_beyond_tol, rep.max_abs_diff_all, extra=LOG_ONLY)
    return 100.0 * (1 - rep.top1_mismatches_beyond_tol / max(rep.n, 1))


def qat_table(T: int, float_top1: float, ptq_top1: float, qat_top1: float) -> str:
    return "\n".join([
        "| model | test top-1 | delta vs float |", "|---|---|---|",
        f"| float T={T} | {float_top1:.2f} | 0.00 |",
        f"| INT8 PTQ (calibration only) | {ptq_top1:.2f} | {ptq_top1 - float_top1:+.2f} |",
        f"| INT8 QAT | {qat_top1:.2f} | {qat_top1 - float_top1:+.2f} |",
    ])


__all__ = ["QatPaths", "calibration_loader", "no_decay", "qat_table", "qdq_module_agreement", "quantise"]
