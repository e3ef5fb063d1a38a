"""NNCF 3.4 INT8 quantisation of a SpikingNet for TensorRT, its checkpoints, and the export loader.

Settings and why (docs/architecture.md section 5):
- symmetric INT8, per-channel weights, per-tensor activations, all *signed* (see
  :func:`force_signed`): TensorRT's explicit quantisation takes int8 Q/DQ with zero point 0;
- ``overflow_fix=DISABLE``: NNCF's 7-bit weight workaround is for old x86 VNNI, not GPUs;
- neuron internals are excluded by an ``IgnoredScope`` built from the model's own neuron
  module names (without it ~80 quantisers land in the membrane arithmetic and export
  breaks). NNCF still places one quantiser on each neuron's *output* (the 0/1 spikes that
  feed the next conv); those are pinned to scale 1 and frozen so spikes stay exactly 0/1;
- ``qat.keep_float``: parts kept in float, as aliases ``stem`` (first conv: the only layer
  whose input is real-valued), ``staa`` (every STAA attention op), ``fc`` (classifier), a
  module path (``layer3``, ``layer1.0.conv1``) or ``re:<regex>`` on NNCF op names;
- BN is folded into the convs before quantising (``qat.fold_bn``) so QAT trains the graph
  that is deployed (Conv + bias with per-channel weight scales) and unroll has nothing to
  fold; TSRD is switched off for the same reason (it never runs in deployment).

Measured effect of ``keep_float`` (digits default, the T=1 model reduce_t hands over, float
97.22% on 360 test images; PTQ = calibration only, no bias correction; spike flips = share of
all neuron outputs that differ from the float model):

    keep_float      quantisers  PTQ top-1  spike flips  QAT top-1 (2 epochs)
    []                  331       97.50       7.2%         98.06
    [stem]              328       97.50       7.2%         98.06
    [staa]               50       96.67       6.0%         96.94
    [stem, staa]         48       98.33       4.9%         98.06

Top-1 differences are 1-4 images (noise on this easy set); the spike flips show where the
error is: the attention carries about a sixth of it and, with it, the stem conv a further
sixth; the rest comes from the int8 weights and the per-tensor conv outputs feeding the
residual adds. Keeping the stem alone does nothing because the stem's own STAA stays
quantised. Default: quantise everything but the neurons.

Checkpoint (``qat.pt``): the usual ``model_cfg``/``data_meta`` plus the NNCF config
(``nncf.torch.get_config``, stored as plain data) and the wrapped model's state dict, so it loads
with ``torch.load(weights_only=True)``; :func:`restore_qat_model` rebuilds it with
``nncf.torch.load_from_config``, allowing only NNCF's quantiser classes. Deployment calls
:func:`load_qat_model`.
"""
from __future__ import annotations

import copy
import enum
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from pipeline.checkpoint import CheckpointError, read_checkpoint
from pipeline.compress.nncf_env import prepare_nncf_kernels
from pipeline.compress.qdq import to_qdq_module
from pipeline.console import quiet_nncf
from pipeline.models import (STAALIF, SeqConvBN, build_model, fold_batchnorm, neuron_modules, set_hand_backward,
                             set_tsrd_p)

QAT_FORMAT = "nncf-qat-v1"
# NNCF gives its (cached) C++ fake-quant extension 60 s to load and then raises; on a loaded
# shared CPU box the build-lock check alone can take longer. Allow 10 minutes unless set.
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "600")
ALIASES = ("stem", "staa", "fc")


class QuantizeError(ValueError):
    """A quantisation setting does not fit the model (e.g. a keep_float pattern matches nothing)."""


def _scope(module_name: str) -> str:
    """NNCF op names are module paths with ``/`` separators: ``layer1.0.sn1`` -> ``layer1/0/sn1``."""
    return re.escape(module_name.replace(".", "/"))


def neuron_patterns(model: nn.Module) -> list[str]:
    """Ignored-scope regexes covering every op inside every neuron module."""
    return [f"{_scope(name)}/.*" for name, _ in neuron_modules(model)]


def _child_name(parent: nn.Module, child: nn.Module) -> str:
    return next(n for n, c in parent.named_children() if c is child)


def keep_float_patterns(model: nn.Module, keep_float: Sequence[str]) -> list[str]:
    """NNCF op-name regexes for the ``qat.keep_float`` entries (see the module docstring)."""
    out: list[str] = []
    for entry in keep_float:
        if entry == "stem":
            first = next((n for n, m in model.named_modules() if isinstance(m, SeqConvBN)), None)
            if first is None:
                raise QuantizeError("keep_float 'stem': the model has no SeqConvBN layer")
            out.append(f"{_scope(first)}/.*")
        elif entry == "staa":
            # NNCF names STAA ops under the STAALIF scope (STAA itself is never called as a module),
            # so: every op of a STAALIF except its neuron's.
            staa = [f"{_scope(name)}/(?!{re.escape(_child_name(m, m.lif))}/).*"
                    for name, m in model.named_modules() if isinstance(m, STAALIF) and m.staa is not None]
            if not staa:
                raise QuantizeError("keep_float 'staa': the model has no STAA blocks (model.staa is off)")
            out += staa
        elif entry == "fc":
            out.append(r"fc/.*")
        elif entry.startswith("re:"):
            out.append(entry[3:])
        else:
            if entry not in dict(model.named_modules()):
                raise QuantizeError(f"qat.keep_float entry {entry!r} is not an alias ({', '.join(ALIASES)}), "
                                    f"a module path of the model (e.g. 'layer3', 'layer1.0.conv1') or 're:<regex>'")
            out.append(f"{_scope(entry)}/.*")
    return out


def quantize_model(model: nn.Module, calibration: Iterable, n_batches: int, keep_float: Sequence[str] = (),
                   fold_bn: bool = True, device: str = "cpu", bias_correction: bool = False) -> nn.Module:
    """Post-training INT8 quantisation of a float SpikingNet with NNCF (the start point of QAT).

    ``calibration`` yields ``(x, y)`` batches; the first ``n_batches`` calibrate the ranges.
    ``model`` is not modified. Returns the NNCF-wrapped model (trainable, in eval mode).
    ``bias_correction`` runs NNCF's fast bias correction: off by default, because matching mean
    conv outputs does not help thresholded neurons (measured on digits, T=1, PTQ: with the
    quantisers disabled, the corrected biases alone flip 6.5% of all spikes, and with stem +
    STAA in float it raises the spike flips from 4.9% to 6.5%).
    """
    import nncf
    from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters, OverflowFix,
                                                       QuantizationParameters)
    quiet_nncf()  # importing nncf resets its logger; every later nncf call follows this or restore_qat_model

    ensure_quant_kernels(device)
    model = copy.deepcopy(model).eval().to(device)
    set_hand_backward(model, False)  # QAT trains the ops NNCF hooks (see set_hand_backward)
    if fold_bn:
        fold_batchnorm(model)
    set_tsrd_p(model, 0.0)
    patterns = neuron_patterns(model) + keep_float_patterns(model, keep_float)
    advanced = AdvancedQuantizationParameters(
        overflow_fix=OverflowFix.DISABLE,
        disable_bias_correction=not bias_correction,
        weights_quantization_params=QuantizationParameters(num_bits=8, per_channel=True),
        activations_quantization_params=QuantizationParameters(num_bits=8, per_channel=False),
    )
    dataset = nncf.Dataset(calibration, lambda batch: batch[0].to(device))
    try:
        qmodel = nncf.quantize(model, dataset, preset=nncf.QuantizationPreset.PERFORMANCE,
                               target_device=nncf.TargetDevice.ANY, subset_size=max(int(n_batches), 1),
                               ignored_scope=nncf.IgnoredScope(patterns=patterns), advanced_parameters=advanced)
    except nncf.ValidationError as exc:
        raise QuantizeError(f"the ignored scope does not match the model's NNCF graph ({exc}); "
                            f"check qat.keep_float") from exc
    force_signed(qmodel)
    pin_spike_quantizers(qmodel)
    return qmodel.eval()


def ensure_quant_kernels(device: str) -> str:
    """Make NNCF's fake-quant kernels usable on ``device`` (see :mod:`pipeline.compress.nncf_env`:
    the CUDA extension when the toolkit matches torch's CUDA, else NNCF's reference kernels).
    Returns which kernels are in use: "cuda-extension", "reference" or "cpu".
    """
    return prepare_nncf_kernels(device)


def force_signed(qmodel: nn.Module) -> int:
    """Make every unsigned activation quantiser signed int8, keeping its range's top.

    TensorRT takes int8 Q/DQ with zero point 0 only; NNCF picks uint8 for non-negative
    activations (ReLU, sigmoid, softmax, spikes) and its HW configs refuse a forced sign,
    so the sign is switched after calibration: the positive half keeps 127 levels.
    Returns how many were switched.
    """
    switched = 0
    for *_, q in quantizer_sites(qmodel):
        if not q.signed:
            q.signed = True
            switched += 1
    return switched


def quantizer_sites(qmodel: nn.Module) -> list[tuple[str, str, int, nn.Module]]:
    """``(hook kind 'pre_hooks'/'post_hooks', NNCF op name, port, quantiser)`` for every quantiser."""
    from nncf.torch.function_hook.hook_storage import decode_hook_name
    from nncf.torch.function_hook.wrapper import get_hook_storage

    sites = []
    for name, hook in get_hook_storage(qmodel).named_hooks():
        kind, op, port = decode_hook_name(name)
        sites.append((kind, op, port, hook))
    return sites


def _in_neuron(op: str, neuron_scopes: Sequence[str]) -> bool:
    return any(op.startswith(s + "/") for s in neuron_scopes)


def _neuron_scopes(qmodel: nn.Module) -> list[str]:
    return [name.replace(".", "/") for name, _ in neuron_modules(qmodel)]


def spike_quantizers(qmodel: nn.Module) -> list[nn.Module]:
    """Quantisers on a neuron's output (post-hooks inside a neuron scope).

    With the neuron scope ignored, NNCF only puts a post-hook there when the value leaves
    the neuron for a quantised consumer: that value is the spike train itself.
    """
    scopes = _neuron_scopes(qmodel)
    return [q for kind, op, _, q in quantizer_sites(qmodel) if kind == "post_hooks" and _in_neuron(op, scopes)]


def neuron_internal_quantizers(qmodel: nn.Module) -> list[str]:
    """Quantisers reading inside a neuron (membrane, decay/gain arithmetic): must be empty."""
    scopes = _neuron_scopes(qmodel)
    return [f"{kind}:{op}:{port}" for kind, op, port, _ in quantizer_sites(qmodel)
            if kind == "pre_hooks" and _in_neuron(op, scopes)]


@torch.no_grad()
def pin_spike_quantizers(qmodel: nn.Module) -> int:
    """Fix every spike quantiser to the range [-1, 1] (scale 1), frozen: 0 and 1 stay exact.

    QAT would otherwise learn the scale; below 1 it would clip every spike. Returns the count.
    """
    quantizers = spike_quantizers(qmodel)
    for q in quantizers:
        q.scale.fill_(1.0)  # SymmetricQuantizer: the range is [-scale * 128/127, scale]; 1 -> level 127
        q.disable_gradients()
    return len(quantizers)


def _plain(value: Any) -> Any:
    """JSON-friendly copy of an NNCF config (enums -> values, tuples -> lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


def nncf_config(qmodel: nn.Module, plain: bool = False) -> dict[str, Any]:
    """Where every quantiser sits and its spec (``nncf.torch.get_config``); ``plain`` for JSON."""
    import nncf.torch

    cfg = nncf.torch.get_config(qmodel)
    return _plain(cfg) if plain else cfg


# the only quantiser classes a QAT checkpoint may name: NNCF's load_from_config imports and builds what the
# config names, so anything else is refused before it is imported
QUANTIZER_MODULE = "nncf.torch.quantization.layers"
QUANTIZER_CLASSES = ("SymmetricQuantizer", "AsymmetricQuantizer")


def _stored_nncf_config(cfg: Any) -> Any:
    """The NNCF config as plain data (enums -> values, tuples kept) so qat.pt loads with weights_only=True."""
    if isinstance(cfg, dict):
        return {k: _stored_nncf_config(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return type(cfg)(_stored_nncf_config(v) for v in cfg)
    return cfg.value if isinstance(cfg, enum.Enum) else cfg


def _loadable_nncf_config(cfg: Any) -> dict[str, Any]:
    """A stored NNCF config checked (known quantiser classes only) and with its enums restored."""
    from nncf.common.quantization.structs import QuantizationScheme

    commands = cfg.get("compression_state") if isinstance(cfg, dict) else None
    if not isinstance(commands, list):
        raise CheckpointError("the QAT checkpoint's nncf_config has no compression_state list; re-run the qat stage")
    out = []
    for cmd in commands:
        path, cls = cmd.get("module_path", QUANTIZER_MODULE), cmd.get("module_cls_name")
        if path != QUANTIZER_MODULE or cls not in QUANTIZER_CLASSES:
            raise CheckpointError(f"the QAT checkpoint's nncf_config names {path}.{cls}, not one of NNCF's quantisers "
                                  f"({', '.join(QUANTIZER_CLASSES)}); refusing to build it: re-run the qat stage")
        module_cfg = dict(cmd["module_config"])
        if "mode" in module_cfg:
            module_cfg["mode"] = QuantizationScheme(module_cfg["mode"])
        out.append(dict(cmd, module_path=QUANTIZER_MODULE, module_config=module_cfg))
    return {"compression_state": out}


def qat_payload(qmodel: nn.Module, model_cfg: dict[str, Any], data_meta: dict[str, Any], fold_bn: bool,
                **extra: Any) -> dict[str, Any]:
    """A self-describing QAT checkpoint (reload with :func:`restore_qat_model` / :func:`load_qat_model`).

    Plain data only (the NNCF config with its enums as values), so it loads with weights_only=True.
    """
    return {"format": QAT_FORMAT, "model": qmodel.state_dict(), "model_cfg": dict(model_cfg, T=qmodel.T),
            "data_meta": data_meta, "nncf_config": _stored_nncf_config(nncf_config(qmodel)), "fold_bn": bool(fold_bn),
            **extra}


def restore_qat_model(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the NNCF-quantised model of a QAT checkpoint (eval mode, trainable, on CPU)."""
    import nncf.torch
    quiet_nncf()

    if ckpt.get("format") != QAT_FORMAT or "nncf_config" not in ckpt:
        raise CheckpointError(f"not a QAT checkpoint (format {ckpt.get('format')!r}, expected {QAT_FORMAT!r}); "
                              f"pass the QAT checkpoint the qat stage writes (float checkpoints load with load_model)")
    model = set_hand_backward(build_model(ckpt["model_cfg"]).eval(), False)
    if ckpt.get("fold_bn"):
        fold_batchnorm(model)
    set_tsrd_p(model, 0.0)
    qmodel = nncf.torch.load_from_config(model, _loadable_nncf_config(ckpt["nncf_config"]),
                                         allowed_modules=(QUANTIZER_MODULE,))
    try:
        qmodel.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"QAT weights do not fit the stored model/NNCF config ({exc}); the file was written "
                              f"by another version: re-run the qat stage") from exc
    for q in spike_quantizers(qmodel):
        q.disable_gradients()
    return qmodel.eval()


def restore_on(ckpt: dict[str, Any], device: str) -> nn.Module:
    """:func:`restore_qat_model` then move to ``device`` (with usable fake-quant kernels there)."""
    ensure_quant_kernels(device)
    return restore_qat_model(ckpt).to(device)


def example_input(model_cfg: dict[str, Any], data_meta: dict[str, Any], batch: int = 1) -> Tensor:
    """A zero input of the model's shape: ``[B, C, H, W]`` (static) or ``[B, T, C, H, W]`` (events)."""
    c, (h, w) = int(data_meta["in_channels"]), data_meta["image_size"]
    if data_meta.get("is_event"):
        return torch.zeros(batch, int(model_cfg["T"]), c, int(h), int(w))
    return torch.zeros(batch, c, int(h), int(w))


def load_qat_model(path: Path | str) -> tuple[nn.Module, dict[str, Any]]:
    """Load ``qat.pt`` as a torch module ready to export: ``(module in eval mode, checkpoint dict)``.

    The module computes exactly what the QAT model computes, with neurons in inference mode
    and every quantiser a constant fake-quant that ``torch.onnx.export`` writes as
    QuantizeLinear/DequantizeLinear (opset >= 13; both exporters). It is NNCF-wrapped: call
    it as a whole (``module(x)``), not its submodules, or the quantisers are bypassed.
    BN is already folded when ``ckpt["fold_bn"]``; TSRD is off.
    """
    ckpt = read_checkpoint(Path(path))
    return qdq_module(ckpt), ckpt


def qdq_module(ckpt: dict[str, Any]) -> nn.Module:
    """The exportable Q/DQ module of a loaded QAT checkpoint dict (what :func:`load_qat_model` returns)."""
    return to_qdq_module(restore_qat_model(ckpt), example_input(ckpt["model_cfg"], ckpt["data_meta"]))


def quantizer_summary(qmodel: nn.Module) -> dict[str, int]:
    """Counts for the metrics: weight (per-channel) and activation (per-tensor) quantisers, spike ones."""
    sites = quantizer_sites(qmodel)
    weights = sum(1 for kind, _, port, _ in sites if kind == "pre_hooks" and port >= 1)  # conv/linear/LN params
    return {"quantizers": len(sites), "weight_quantizers": weights, "activation_quantizers": len(sites) - weights,
            "spike_quantizers": len(spike_quantizers(qmodel)), "neuron_internal_quantizers":
            len(neuron_internal_quantizers(qmodel))}
