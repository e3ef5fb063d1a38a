"""Unroll a trained STAA-SNN into a static, stateless inference module.

Why: the exporters and TensorRT need a graph with no Python state, no autograd.Function and
no training-only randomness (docs/architecture.md §5). ``SpikingNet`` already loops over a fixed T inside
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from pipeline.checkpoint import CheckpointError, load_plain, save_atomic
from pipeline.compress.qdq import FixedFakeQuant
from pipeline.compress.quantize import qdq_module
from pipeline.models import (BaseLIF, PositionEncoding, build_model, fold_batchnorm, neuron_modules, set_inference_mode,
                             set_tsrd_p)

UNROLLED_FORMAT = "staa-unrolled/2"  # /2: int8 as state + rebuild recipe, never a pickled module
# what an int8 file keeps of its QAT checkpoint: enough for load_qat_model to rebuild it
QAT_KEYS = ("format", "model", "model_cfg", "data_meta", "nncf_config", "fold_bn")
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


@dataclass(frozen=True)
class Int8Kind:
    """An int8 module that is not rebuilt from a QAT checkpoint, e.g. the tests' reference Q/DQ model
    (``tests/helpers/qdq_reference.py``): the package does not ship it, so it registers itself here.

    ``record(module)``: the plain data that rebuilds ``module``, or None when it is not of this kind;
    ``rebuild(model, record)``: that structure around a freshly built float model (in eval mode, BN
    already folded when the file says so); the stored state dict is loaded next.
    """

    record: Callable[[nn.Module], dict[str, Any] | None]
    rebuild: Callable[[nn.Module, dict[str, Any]], nn.Module]


INT8_KINDS: dict[str, Int8Kind] = {}  # stored as rebuild["from"]; "qat_checkpoint" is built in


def register_int8_kind(name: str, record: Callable[[nn.Module], dict[str, Any] | None],
                       rebuild: Callable[[nn.Module, dict[str, Any]], nn.Module]) -> None:
    """Let :func:`save_unrolled` / :func:`load_unrolled` handle another int8 module kind (see :class:`Int8Kind`)."""
    if name == "qat_checkpoint":
        raise ValueError("'qat_checkpoint' is the built-in int8 kind; register another name")
    INT8_KINDS[name] = Int8Kind(record, rebuild)


def _to_buffer(module: nn.Module, name: str) -> None:
    """Replace parameter ``module.name`` with a buffer of the same value and name (a constant)."""
    value = getattr(module, name)
    if isinstance(value, nn.Parameter):
        delattr(module, name)
        module.register_buffer(name, value.detach().clone())


def constant_time_tensors(model: nn.Module) -> nn.Module:
    """Turn the position encodings and the learnable neuron coefficients into buffers."""
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
    model.eval()
    set_inference_mode(model, True)
    set_tsrd_p(model, 0.0)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def unroll_float(model: nn.Module) -> nn.Module:
    """A static copy of a float ``SpikingNet``: BN folded, hard spikes, TSRD off, constant PE."""
    m = copy.deepcopy(model).eval()
    fold_batchnorm(m)
    constant_time_tensors(m)
    return _static(m)


def unroll_qat(model: nn.Module) -> nn.Module:
    """A static copy of the QAT model; BN stays unfolded so the quantised weights are unchanged."""
    return _static(copy.deepcopy(model).eval())


def save_unrolled(path: Path, module: nn.Module, info: UnrolledInfo) -> None:
    """Write an unrolled module as its state dict plus what rebuilds it; no pickled code.

    Float: the model config and the rewrites (:data:`FLOAT_RECIPE`). Int8: the QAT checkpoint
    it came from (``info.extra["qat_checkpoint"]``: model config, NNCF config, QAT weights),
    or the record of a registered :class:`Int8Kind` (e.g. the tests' reference Q/DQ model: its input scales).
    :func:`load_unrolled` rebuilds the module and loads the state dict strictly.
    """
    payload: dict[str, Any] = {
        "format": UNROLLED_FORMAT, "kind": info.kind, "T": int(info.T), "model_cfg": dict(info.model_cfg),
        "data_meta": dict(info.data_meta), "bn_folded": info.bn_folded, "recipe": list(info.recipe),
        "source": info.source, "extra": {k: v for k, v in info.extra.items() if k != "qat_checkpoint"},
        "build_cfg": _build_cfg(module, info), "state_dict": module.state_dict(),
    }
    if info.kind != "float":
        payload["rebuild"] = _int8_rebuild(module, info)
    save_atomic(payload, Path(path))


def _int8_rebuild(module: nn.Module, info: UnrolledInfo) -> dict[str, Any]:
    """How to rebuild an int8 module: from its QAT checkpoint (NNCF) or the record of its registered kind."""
    qat = info.extra.get("qat_checkpoint")
    if isinstance(qat, dict) and "nncf_config" in qat:
        return {"from": "qat_checkpoint", "qat": {k: qat[k] for k in QAT_KEYS if k in qat}}
    for name, kind in INT8_KINDS.items():
        record = kind.record(module)
        if record:
            return {"from": name, **record}
    raise UnrollError("the int8 module is neither of a registered kind (e.g. the reference Q/DQ model) nor given with "
                      "the QAT checkpoint it came from; pass that checkpoint as UnrolledInfo.extra['qat_checkpoint'] "
                      "(the unroll stage does)")


def load_unrolled(path: Path) -> tuple[nn.Module, UnrolledInfo]:
    """Load a file written by :func:`save_unrolled` -> (static module in eval mode, info).

    Read with ``torch.load(weights_only=True)``: a file carrying pickled code is refused unopened.
    """
    path = Path(path)
    if not path.is_file():
        raise UnrollError(f"unrolled model not found: {path}; run the unroll stage "
                          f"(python -m pipeline.stage unroll --config ...)")
    payload = load_plain(path, UnrollError, "delete it and re-run the unroll stage "
                                            "(python -m pipeline.stage unroll --config ... --force)")
    if not isinstance(payload, dict) or payload.get("format") != UNROLLED_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else None
        raise UnrollError(f"{path} is not an unrolled model ({UNROLLED_FORMAT}, found {found!r}); files of an older "
                          f"version held a pickled module: re-run the unroll stage")
    try:
        info = UnrolledInfo(kind=payload["kind"], T=payload["T"], model_cfg=payload["model_cfg"],
                            data_meta=payload["data_meta"], bn_folded=payload["bn_folded"],
                            recipe=tuple(payload["recipe"]), source=payload.get("source", ""),
                            extra=payload.get("extra", {}))
        module = _skeleton(payload, info, path)
        module.load_state_dict(payload["state_dict"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise UnrollError(f"{path}: the module cannot be rebuilt or its weights do not fit it "
                          f"({type(exc).__name__}: {exc}); re-run the unroll stage") from exc
    _sync_constants(module)
    return module.eval(), info


def _build_cfg(module: nn.Module, info: UnrolledInfo) -> dict[str, Any]:
    """The exact config ``build_model`` rebuilds this module's network from (its resolved spec when it has one)."""
    spec = getattr(module, "spec", None)
    return spec.as_dict() if spec is not None else dict(info.model_cfg, T=int(info.T))


def _skeleton(payload: dict[str, Any], info: UnrolledInfo, path: Path) -> nn.Module:
    """The unrolled module rebuilt from its recipe, with whatever weights: the state dict comes next."""
    if info.kind == "float":
        return unroll_float(build_model(payload["build_cfg"]))
    rebuild = payload.get("rebuild") or {}
    if rebuild.get("from") == "qat_checkpoint":
        return _rebuild_qat(rebuild["qat"], path)
    if rebuild.get("from") in INT8_KINDS:
        model = build_model(payload["build_cfg"]).eval()
        if info.bn_folded:
            fold_batchnorm(model)
        return _static(INT8_KINDS[rebuild["from"]].rebuild(model, rebuild))
    if rebuild.get("from"):
        raise UnrollError(f"{path} holds an int8 model of kind {rebuild['from']!r}, which no imported module has "
                          f"registered (register_int8_kind; the tests' reference Q/DQ model registers when "
                          f"tests.helpers is imported)")
    raise UnrollError(f"{path} holds an int8 model without a rebuild recipe; re-run the unroll stage")


def _rebuild_qat(ckpt: dict[str, Any], path: Path) -> nn.Module:
    """Rebuild an int8 unrolled module from its embedded QAT checkpoint (needs the quantiser, NNCF)."""
    try:
        return unroll_qat(qdq_module(ckpt))
    except ImportError as exc:
        raise UnrollError(f"{path} holds an int8 model that is rebuilt with NNCF (pipeline.compress.quantize), "
                          f"which cannot be imported ({exc})") from exc
    except CheckpointError as exc:
        raise UnrollError(f"{path}: its QAT checkpoint does not rebuild ({exc})") from exc


def _sync_constants(module: nn.Module) -> None:
    """Per-tensor fake-quant scales are also Python numbers (constants for the exporters): match the loaded buffers."""
    for m in module.modules():
        if isinstance(m, FixedFakeQuant) and m.axis is None:
            m.scale_value, m.zero_value = float(m.scale[0]), int(m.zero_point[0])


def describe(module: nn.Module) -> dict[str, Any]:
    """Facts for the metrics: neurons, trainable tensors left (0 when static), BN layers left."""
    bns = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
    return {
        "neurons": len(neuron_modules(module)),
        "trainable_tensors": sum(p.requires_grad for p in module.parameters()),
        "batchnorm_layers": bns,
        "weight_elements": sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers()),
    }
