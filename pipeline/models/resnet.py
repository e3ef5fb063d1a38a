"""Spiking ResNet backbones and the architecture registry ``ARCHS``.

- ``resnet19`` (CIFAR): stem conv3x3 128 + BN + neuron; BasicBlocks [3, 3, 2] at 128/256/512,
  strides 1/2/2; global average pool; per-step FC.
- ``resnet34`` (ImageNet 224): stem conv7x7/2 64 + BN + neuron, 3x3/2 *average* pool (spikes);
  BasicBlocks [3, 4, 6, 3] at 64/128/256/512, strides 1/2/2/2.
- ``resnet20`` (event frames, e.g. 2 polarity channels): stem conv3x3/2 64 + BN + neuron
  (halves 64x64 / 128x128 frames once, cheap on sparse input); BasicBlocks [3, 3, 3] at
  64/128/256, strides 1/2/2 (1 stem + 18 convs + FC = 20 weight layers).

BasicBlock: conv3x3-BN-neuron-conv3x3-BN, plus the shortcut (identity, or conv1x1/stride + BN
when the shape changes), then the neuron *after* the add. Each neuron is an ``STAALIF``
(``sn``, ``sn1``, ``sn2``); its neuron is ``.lif``. ``width`` scales every channel count
(rounded, at least 8).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from torch import Tensor, nn

from .layers import SeqConvBN, SeqModule
from .net import SpikingNet
from .neurons import make_neuron
from .spec import ModelSpec
from .staa import STAA, STAALIF, staa_on_stage

UnitFactory = Callable[[int, int], nn.Module]  # (channels, stage index) -> spiking unit
MIN_CHANNELS = 8


def scale_channels(channels: int, width: float, minimum: int = MIN_CHANNELS) -> int:
    """``round(channels * width)``, at least ``minimum``."""
    return max(minimum, int(round(channels * width)))


def unit_factory(spec: ModelSpec, num_stages: int) -> UnitFactory:
    """Make spiking units for ``spec``: STAA on the stages its placement selects."""

    def make(channels: int, stage: int) -> nn.Module:
        staa = STAA(spec.staa, channels, spec.T) if staa_on_stage(spec.staa, stage, num_stages) else None
        return STAALIF(make_neuron(spec.neuron, channels), staa)

    return make


class BasicBlock(nn.Module):
    """Spiking BasicBlock with the neuron after the residual add."""

    def __init__(self, cin: int, cout: int, stride: int, unit: UnitFactory, stage: int) -> None:
        super().__init__()
        self.conv1 = SeqConvBN(cin, cout, 3, stride)
        self.sn1 = unit(cout, stage)
        self.conv2 = SeqConvBN(cout, cout, 3, 1)
        self.downsample = SeqConvBN(cin, cout, 1, stride, padding=0) if stride != 1 or cin != cout else None
        self.sn2 = unit(cout, stage)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.sn1(self.conv1(x)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.sn2(out + shortcut)


def _resnet(spec: ModelSpec, stem_channels: int, stem_kernel: int, stem_stride: int, stem_pool: bool,
            stages: list[tuple[int, int, int]]) -> SpikingNet:
    """Generic spiking ResNet: ``stages`` = [(channels, blocks, stride), ...]."""
    unit = unit_factory(spec, num_stages=len(stages) + 1)  # stage 0 = stem
    c0 = scale_channels(stem_channels, spec.width)
    stem = OrderedDict(conv=SeqConvBN(spec.in_channels, c0, stem_kernel, stem_stride), sn=unit(c0, 0))
    if stem_pool:
        stem["pool"] = SeqModule(nn.AvgPool2d(3, stride=2, padding=1))
    layers, cin = [], c0
    for i, (channels, blocks, stride) in enumerate(stages, start=1):
        cout = scale_channels(channels, spec.width)
        seq = [BasicBlock(cin if b == 0 else cout, cout, stride if b == 0 else 1, unit, i) for b in range(blocks)]
        layers.append((f"layer{i}", nn.Sequential(*seq)))
        cin = cout
    return SpikingNet(nn.Sequential(stem), layers, cin, spec.num_classes, spec.T, spec)


def resnet19(spec: ModelSpec) -> SpikingNet:
    """CIFAR ResNet-19."""
    return _resnet(spec, 128, 3, 1, False, [(128, 3, 1), (256, 3, 2), (512, 2, 2)])


def resnet34(spec: ModelSpec) -> SpikingNet:
    """ImageNet ResNet-34 with an average-pooling stem."""
    return _resnet(spec, 64, 7, 2, True, [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)])


def resnet20(spec: ModelSpec) -> SpikingNet:
    """ResNet-20-style net for event frames (stride-2 stem, three stages of three blocks)."""
    return _resnet(spec, 64, 3, 2, False, [(64, 3, 1), (128, 3, 2), (256, 3, 2)])


ARCHS: dict[str, Callable[[ModelSpec], SpikingNet]] = {
    "resnet19": resnet19,
    "resnet34": resnet34,
    "resnet20": resnet20,
}
