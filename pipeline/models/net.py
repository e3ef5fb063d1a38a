"""``SpikingNet``: encoding, a spiking backbone and a per-step classifier, averaged over T."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .neurons import set_inference_mode
from .spec import ModelSpec
from .staa import PE_MODES, STAA


class SpikingNet(nn.Module):
    """A spiking classifier over ``T`` steps.

    Inputs: a static batch ``[B, C, H, W]`` (direct encoding: repeated T times, the first
    conv+BN+neuron encodes) or event frames ``[B, T, C, H, W]`` (batch-first, as a DataLoader
    yields them). Inside, tensors are ``[T, B, ...]``. Output: logits averaged over T.
    Submodules: ``stem``, ``layer1..layerN`` (in ``stage_names``), ``fc``.
    """

    def __init__(self, stem: nn.Module, stages: Sequence[tuple[str, nn.Module]], num_features: int,
                 num_classes: int, T: int, spec: ModelSpec | None = None) -> None:
        super().__init__()
        self.T = int(T)
        self.spec = spec
        self.stem = stem
        self.stage_names = [name for name, _ in stages]
        for name, module in stages:
            self.add_module(name, module)
        self.fc = nn.Linear(num_features, num_classes)

    def to_steps(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> repeated ``[T, B, C, H, W]``; ``[B, T, C, H, W]`` -> ``[T, B, ...]``."""
        if x.dim() == 4:
            return x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)
        if x.dim() == 5:
            if not torch.jit.is_tracing() and x.shape[1] != self.T:
                raise ValueError(f"event input has {x.shape[1]} frames but the model runs T={self.T}; "
                                 f"build frames with T={self.T} or call set_time_steps")
            return x.transpose(0, 1)
        raise ValueError(f"expected [B, C, H, W] or [B, T, C, H, W], got shape {tuple(x.shape)}")

    def forward_steps(self, x: Tensor) -> Tensor:
        """Per-step logits ``[T, B, num_classes]`` (e.g. for the TET loss)."""
        x = self.stem(self.to_steps(x))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.fc(x.mean((-2, -1)))  # global average pool -> [T, B, C] -> per-step FC

    def forward(self, x: Tensor) -> Tensor:
        """Logits averaged over T, ``[B, num_classes]``."""
        return self.forward_steps(x).mean(0)

    def set_time_steps(self, T_new: int, pe_mode: str = "interpolate") -> "SpikingNet":
        """Run at ``T_new`` steps from now on, carrying every T-dependent parameter over.

        ``pe_mode`` resamples each position encoding ``[T, 1, C, 1, 1]`` along T:
        "truncate" keeps the first ``T_new`` steps (shrinking only), "interpolate" interpolates
        linearly keeping the first and last step, "mean" sets every new step to the old mean.
        Step-attention Linear layers (T-sized) are resampled the same way, hidden width kept
        (``spec.staa.sa_hidden`` is unchanged, so a checkpoint of the carried model rebuilds it;
        see ``pipeline.models.staa``); causal SA keeps its leading ``[:T_new, :T_new]`` block and
        its width becomes ``T_new`` (``spec.staa.sa_hidden`` follows). Parameters are replaced: build the optimiser afterwards.
        """
        if pe_mode not in PE_MODES:
            raise ValueError(f"unknown pe_mode {pe_mode!r}; valid: {', '.join(PE_MODES)}")
        T_new = int(T_new)
        if T_new < 1:
            raise ValueError(f"T must be >= 1, got {T_new}")
        if T_new != self.T:
            for m in self.modules():
                if isinstance(m, STAA):
                    m.set_time_steps(T_new, pe_mode)
            self.T = T_new
            if self.spec is not None:
                from dataclasses import replace

                staa = self.spec.staa
                if staa.sa_mode == "causal":  # causal SA's width is T (its leading block is carried)
                    staa = replace(staa, sa_hidden=T_new)
                self.spec = replace(self.spec, T=T_new, staa=staa)
        return self

    def inference_mode(self, enabled: bool = True) -> "SpikingNet":
        """Plain-comparison spikes in every neuron (see ``neurons.set_inference_mode``)."""
        set_inference_mode(self, enabled)
        return self
