"""STAA-SNN model library: neurons, STAA blocks, spiking ResNets and ``build_model(cfg)``."""
from __future__ import annotations

from typing import Any, Mapping

from .layers import SeqConvBN, SeqModule, fold_batchnorm, merge_time, split_time
from .net import SpikingNet
from .neurons import LIF, AdaptiveLIF, BaseLIF, make_neuron, neuron_modules, set_inference_mode
from .probes import Recording, record_firing_rates, record_membranes, record_spikes, recording
from .resnet import ARCHS
from .spec import ModelSpec, NeuronSpec, STAASpec, resolve_model_cfg
from .staa import (PE_MODES, STAA, STAALIF, GlobalContext, PositionEncoding, StepAttention, set_hand_backward,
                   set_tsrd_p)

__all__ = [
    "ARCHS", "LIF", "PE_MODES", "STAA", "STAALIF", "AdaptiveLIF", "BaseLIF", "GlobalContext", "ModelSpec",
    "NeuronSpec", "PositionEncoding", "Recording", "STAASpec", "SeqConvBN", "SeqModule", "SpikingNet",
    "StepAttention", "build_model", "fold_batchnorm", "make_neuron", "merge_time", "neuron_modules",
    "record_firing_rates", "record_membranes", "record_spikes", "recording", "resolve_model_cfg", "set_hand_backward",
    "set_inference_mode", "set_tsrd_p", "split_time",
]


def build_model(cfg: Mapping[str, Any]) -> SpikingNet:
    """Build the ``SpikingNet`` described by ``cfg``.

    ``cfg`` is the ``model`` config section (arch, width, T, neuron{...}, staa{...}; missing
    keys take the schema defaults, ``arch`` included) plus ``num_classes`` and ``in_channels`` from
    the dataset. An unknown arch is a ConfigError (a ValueError) from the schema, naming the choices.
    """
    spec = resolve_model_cfg(cfg)
    if spec.arch not in ARCHS:  # the schema allows it but no backbone is registered under that name
        raise ValueError(f"model.arch {spec.arch!r} has no backbone in pipeline/models/resnet.py ARCHS; "
                         f"registered: {', '.join(sorted(ARCHS))}")
    return ARCHS[spec.arch](spec)
