"""Unroll a trained STAA-SNN into a static, stateless inference module.

Why: the exporters and TensorRT need a graph with no Python state, no autograd.Function and
no training-only randomness (DESIGN.md §5). ``SpikingNet`` already loops over a fixed T inside
``forward`` with the membrane created there, so "unrolling" is a set of in-place rewrites of a
copy of the model:

- BN folded into the preceding conv (float model only, see below);
- every neuron in inference mode: the spike is a plain ``(h >= v_th)`` comparison;
- TSRD off (``tsrd_p = 0``) and eval mode, so no step is ever bypassed at random;
- the position encoding and the neuron coefficients become buffers (constants): nothing in
  the unrolled module is trainable, and each becomes an initializer in ONNX.

BN and the QAT model: unrolling never folds BN into a quantised conv. Folding after QAT would
rescale the weights QAT has already quantised (``W * gamma / sigma``): the int8 weights in the
graph would no longer be the ones QAT trained, and the int8 parity gate (against the QAT model)
would compare two different networks. So BN is handled before or by the target instead:

- the qat stage folds BN before quantising (``qat.fold_bn``, its default), so QAT trains the
  deployed Conv + bias and there is nothing left to fold here;
- with ``qat.fold_bn: false`` the int8 graph keeps ``DQ(W) -> Conv -> BatchNormalization``;
  TensorRT folds a BN that follows a per-channel Q/DQ conv into the per-channel output scale
  at build time (exact for symmetric per-channel weights), so nothing is lost on the target.
"""
from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

UNROLLED_FORMAT = "staa-unrolled/1"
FLOAT_RECIPE = ("eval", "fold_bn", "inference_neurons", "tsrd_off", "constant_pe", "frozen")
INT8_RECIPE = ("eval", "inference_neurons", "tsrd_off", "frozen")


class UnrollError(RuntimeError):
    """An unrolled file is missing, damaged or cannot be rebuilt; the message says what to do."""


@dataclass
class UnrolledInfo:
    """What a deployed graph must know about its unrolled module (stored next to the weights)."""

    kind: str  # "float" or "int8"
    T: int
    model_cfg: dict[str, Any]
    data_meta: dict[str, Any]
    bn_folded: bool
    recipe: tuple[str, ...]
    source: str = ""  # the upstream checkpoint it came from (for the report)
    extra: dict[str, Any] = field(default_factory=dict)


def _to_buffer(module: nn.Module, name: str) -> None:
    """Replace parameter ``module.name`` with a buffer of the same value and name (a constant)."""
    value = getattr(module, name)
    if isinstance(value, nn.Parameter):
        delattr(module, name)
        module.register_buffer(name, value.detach().clone())


def constant_time_tensors(model: nn.Module) -> nn.Module:
    """Turn the position encodings and the learnable neuron coefficients into buffers."""
    from pipeline.models import BaseLIF, PositionEncoding

    for m in model.modules():
        if isinstance(m, PositionEncoding):
            _to_buffer(m, "pe")
        elif isinstance(m, BaseLIF):
            for name in ("decay", "gain"):
                if isinstance(getattr(m, name, None), nn.Parameter):
                    _to_buffer(m, name)
    return model


def _static(model: nn.Module) -> nn.Module:
    """The rewrites both kinds share: eval, plain-comparison spikes, TSRD off, frozen weights."""
    from pipeline.models import set_inference_mode, set_tsrd_p

    model.eval()
    set_inference_mode(model, True)
    set_tsrd_p(model, 0.0)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def unroll_float(model: nn.Module) -> nn.Module:
    """A static copy of a float ``SpikingNet``: BN folded, hard spikes, TSRD off, constant PE."""
    from pipeline.models import fold_batchnorm

    m = copy.deepcopy(model).eval()
    fold_batchnorm(m)
    constant_time_tensors(m)
    return _static(m)


def unroll_qat(model: nn.Module) -> nn.Module:
    """A static copy of the QAT model; BN stays unfolded so the quantised weights are unchanged."""
    return _static(copy.deepcopy(model).eval())


def save_unrolled(path: Path, module: nn.Module, info: UnrolledInfo) -> None:
    """Write an unrolled module.

    Float: the weights plus a rebuild recipe (model config + the rewrites), robust to code
    moving around. Int8: the whole module pickled (its structure belongs to the quantiser);
    when it does not pickle, ``info.extra["qat_checkpoint"]`` must carry the QAT checkpoint
    so that :func:`load_unrolled` can rebuild it through ``load_qat_model``.
    """
    from pipeline.checkpoint import save_atomic

    payload: dict[str, Any] = {
        "format": UNROLLED_FORMAT, "kind": info.kind, "T": int(info.T), "model_cfg": dict(info.model_cfg),
        "data_meta": dict(info.data_meta), "bn_folded": info.bn_folded, "recipe": list(info.recipe),
        "source": info.source, "extra": {k: v for k, v in info.extra.items() if k != "qat_checkpoint"},
    }
    if info.kind == "float":
        payload["state_dict"] = module.state_dict()
    else:
        try:
            buf = io.BytesIO()
            torch.save(module, buf)
            payload["module_bytes"] = buf.getvalue()
        except Exception as exc:  # NNCF wrappers may hold unpicklable hooks
            if "qat_checkpoint" not in info.extra:
                raise UnrollError(f"the int8 module does not pickle ({type(exc).__name__}: {exc}) and no "
                                  f"QAT checkpoint was given to rebuild it from") from exc
            payload["qat_checkpoint"] = info.extra["qat_checkpoint"]
            payload["state_dict"] = module.state_dict()
    save_atomic(payload, Path(path))


def load_unrolled(path: Path) -> tuple[nn.Module, UnrolledInfo]:
    """Load a file written by :func:`save_unrolled` -> (static module in eval mode, info)."""
    path = Path(path)
    if not path.is_file():
        raise UnrollError(f"unrolled model not found: {path}; run the unroll stage "
                          f"(python -m pipeline.stage unroll --config ...)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UnrollError(f"{path} cannot be read ({type(exc).__name__}: {exc}); re-run the unroll stage") from exc
    if not isinstance(payload, dict) or payload.get("format") != UNROLLED_FORMAT:
        raise UnrollError(f"{path} is not an unrolled model ({UNROLLED_FORMAT}); re-run the unroll stage")
    info = UnrolledInfo(kind=payload["kind"], T=payload["T"], model_cfg=payload["model_cfg"],
                        data_meta=payload["data_meta"], bn_folded=payload["bn_folded"],
                        recipe=tuple(payload["recipe"]), source=payload.get("source", ""),
                        extra=payload.get("extra", {}))
    if "module_bytes" in payload:
        module = torch.load(io.BytesIO(payload["module_bytes"]), map_location="cpu", weights_only=False)
        return _static(module), info
    if info.kind == "float":
        from pipeline.models import build_model

        skeleton = build_model(dict(info.model_cfg, T=info.T))
        module = unroll_float(skeleton)
    else:
        module = _rebuild_qat(payload["qat_checkpoint"], path)
    try:
        module.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise UnrollError(f"{path}: weights do not fit the rebuilt module ({exc}); re-run the unroll stage") from exc
    return module, info


def _rebuild_qat(ckpt: dict[str, Any], path: Path) -> nn.Module:
    """Rebuild an int8 unrolled module from its embedded QAT checkpoint (needs the quantiser)."""
    import tempfile

    try:
        from pipeline.compress.quantize import load_qat_model
    except ImportError as exc:
        raise UnrollError(f"{path} holds an int8 model that is rebuilt with pipeline.compress.quantize, "
                          f"which cannot be imported ({exc})") from exc
    with tempfile.TemporaryDirectory() as tmp:
        ck = Path(tmp) / "qat.pt"
        torch.save(ckpt, ck)
        model, _ = load_qat_model(ck)
    return unroll_qat(model)


def describe(module: nn.Module) -> dict[str, Any]:
    """Facts for the metrics: neurons, trainable tensors left (0 when static), BN layers left."""
    from pipeline.models import neuron_modules

    bns = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
    return {
        "neurons": len(neuron_modules(module)),
        "trainable_tensors": sum(p.requires_grad for p in module.parameters()),
        "batchnorm_layers": bns,
        "weight_elements": sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers()),
    }
