"""unroll: static, stateless float and INT8 modules with parity gates against their sources.

Float: the reduce_t stage's chosen checkpoint (the deployment T), BN folded. INT8: the QAT
model as the quantiser left it (BN already folded by qat when ``qat.fold_bn``; never folded
here, see ``pipeline.deploy.graphs.unroll``). Each is compared with the model it
came from on real test images: logits max abs diff, identical top-1, per-layer spike agreement.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint import CheckpointError, load_model
from pipeline.compress.quantize import load_qat_model
from pipeline.data import data_bundle, eval_loader
from pipeline.deploy.proofs.parity import compare, torch_with_spikes
from pipeline.deploy.graphs.unroll import (FLOAT_RECIPE, INT8_RECIPE, UnrolledInfo, describe, save_unrolled, unroll_float,
                                    unroll_qat)
from pipeline.runner import StageContext, StageError, StageResult


def load_qat(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The INT8 model at ``path`` (the stage's input ``int8``: ``<stage folder>/<file>``)."""
    if not path.is_file():
        raise StageError(f"the INT8 model {path} is missing; re-run the {path.parent.name} stage "
                         f"(python -m pipeline.stage {path.parent.name} --config ... --force)")
    try:
        return load_qat_model(path)
    except ImportError as exc:  # NNCF, imported when the model is rebuilt
        raise StageError(f"cannot load the INT8 model: pipeline.compress.quantize cannot import NNCF ({exc}); "
                         f"the qat stage's library must be installed") from exc


def _log(ctx: StageContext, what: str, rep: Any) -> None:
    ctx.log.info("%s: %d images, %d with identical spikes (max |diff| %.3g), %d numerical flips, %d real; "
                 "top-1 mismatches %d; min local spike agreement %s", what, rep.n, rep.clean, rep.max_abs_diff,
                 rep.numerical, rep.real, rep.top1_mismatches, rep.min_local_spike_agreement)


def _on(device: str, fn):
    return lambda x: fn(x.to(device))


def run(ctx: StageContext) -> StageResult:
    cfg, u = ctx.cfg, ctx.cfg["unroll"]
    tie_tol = 2 * u["max_abs_diff"]
    src = ctx.input("float")  # the float checkpoint at the deployment T (reduce_t's chosen.pt)
    if not src.is_file():
        raise StageError(f"the float checkpoint {src} is missing; re-run the {src.parent.name} stage "
                         f"(python -m pipeline.stage {src.parent.name} --config ... --force)")
    try:
        model, ckpt = load_model(src)
    except CheckpointError as exc:
        raise StageError(str(exc)) from exc
    T = model.T
    bundle = data_bundle(cfg, T=T)
    loader = eval_loader(cfg, bundle.test, u["parity_images"])
    dev = ctx.device

    failures: list[str] = []
    metrics: dict[str, Any] = {"T": T, "tie_tol": tie_tol, "parity_images": min(u["parity_images"], len(bundle.test))}

    flat = unroll_float(model)
    rep = compare(_on(dev, torch_with_spikes(model.to(dev))),
                  _on(dev, torch_with_spikes(flat.to(dev), membranes=False)), loader, tie_tol, u["flip_margin"],
                   max_numerical_share=u["max_numerical_share"])
    failures += rep.failures(u["max_abs_diff"], u["min_spike_agreement"], "unroll float")
    metrics["float"] = {"source": ctx.input_artifact("float"), "parity": rep.metrics(), **describe(flat)}
    _log(ctx, "float", rep)
    save_unrolled(ctx.output("float"), flat.cpu(), UnrolledInfo(
        "float", T, ckpt["model_cfg"], ckpt["data_meta"], bn_folded=True, recipe=FLOAT_RECIPE,
        source=metrics["float"]["source"]))

    qat, qckpt = load_qat(ctx.input("int8"))
    q = unroll_qat(qat)
    qT = getattr(q, "T", T)
    if qT != T:
        raise StageError(f"the QAT model runs T={qT} but the chosen float model runs T={T}; re-run qat from the "
                         f"chosen reduce_t checkpoint")
    rep8 = compare(_on(dev, torch_with_spikes(qat.to(dev))),
                   _on(dev, torch_with_spikes(q.to(dev), membranes=False)), loader, tie_tol, u["flip_margin"],
                   max_numerical_share=u["max_numerical_share"])
    failures += rep8.failures(u["max_abs_diff"], u["min_spike_agreement"], "unroll int8 (vs QAT model)")
    qat_source = ctx.input_artifact("int8")
    metrics["int8"] = {"source": qat_source, "parity": rep8.metrics(), **describe(q)}
    _log(ctx, "int8", rep8)
    save_unrolled(ctx.output("int8"), q.cpu(), UnrolledInfo(
        "int8", T, qckpt.get("model_cfg", ckpt["model_cfg"]), qckpt.get("data_meta", ckpt["data_meta"]),
        bn_folded=bool(qckpt.get("fold_bn", False)), recipe=INT8_RECIPE, source=qat_source,
        extra={"qat_checkpoint": qckpt}))

    if failures:
        raise StageError("unroll parity gates failed: " + "; ".join(failures) +
                         ". The unrolled module does not reproduce its source: check that every neuron switched "
                         "to inference mode and that BN folding used eval statistics (see unroll/stage.log)")
    return StageResult(metrics=metrics)
