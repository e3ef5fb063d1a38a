"""Energy count against a hand-computed tiny network (DESIGN.md §6 convention)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.report.energy import E_AC_PJ, E_MAC_PJ, count_ops, profile_ops, summarize

T, B, H, W = 2, 3, 4, 4


class TwoConv(nn.Module):
    """Input ``[B, T, 3, H, W]``: channel 0 is an analogue image, channels 1-2 are spikes.

    ``stem`` (1 -> 2, 3x3) sees the analogue channel, ``conv`` (2 -> 4, 3x3) the spikes, both
    merged over T*B like the real model; ``grouped`` (2 -> 4, 3x3, groups 2) sees the spikes too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.grouped = nn.Conv2d(2, 4, 3, padding=1, groups=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(0, 1).flatten(0, 1)  # [T*B, 3, H, W]
        return self.stem(x[:, :1]).sum() + self.conv(x[:, 1:]).sum() + self.grouped(x[:, 1:]).sum()


def spikes_with_rate_quarter() -> torch.Tensor:
    """``[B, T, 2, H, W]`` spikes, exactly one in four is 1."""
    s = torch.zeros(B * T * 2 * H * W)
    s[::4] = 1.0
    return s.view(B, T, 2, H, W)


def test_hand_computed_macs_sops_energy():
    torch.manual_seed(0)
    analog = torch.randn(B, T, 1, H, W)
    x = torch.cat([analog, spikes_with_rate_quarter()], dim=2)
    layers = {l.name: l for l in profile_ops(TwoConv(), [x])}

    # stem: output 2 ch x 4 x 4 = 32 elements per step, 1 x 3 x 3 = 9 MACs each -> 288 per step,
    # 576 per image over T=2; real-valued input -> MACs at 4.6 pJ = 2649.6 pJ.
    stem = layers["stem"]
    assert not stem.spike_driven
    assert stem.macs == pytest.approx(576)
    assert stem.sops == 0
    assert stem.energy_pj == pytest.approx(576 * 4.6)

    # conv: 4 x 4 x 4 = 64 outputs per step x (2 x 3 x 3 = 18) = 1152 MACs per step; input
    # firing rate 0.25; SOPs = 1152 x 0.25 x T(2) = 576; energy 576 x 0.9 pJ = 518.4 pJ.
    conv = layers["conv"]
    assert conv.spike_driven
    assert conv.input_rate == pytest.approx(0.25)
    assert conv.macs == pytest.approx(1152 * T)
    assert conv.sops == pytest.approx(576)
    assert conv.energy_pj == pytest.approx(518.4)

    # grouped: 64 outputs x (2/2 x 9 = 9) = 576 MACs per step -> SOPs 576 x 0.25 x 2 = 288.
    assert layers["grouped"].sops == pytest.approx(288)
    assert layers["grouped"].energy_pj == pytest.approx(288 * 0.9)

    total = summarize(list(layers.values()))
    assert total["energy_pj"] == pytest.approx(576 * 4.6 + 518.4 + 288 * 0.9)
    assert total["energy_uj"] == pytest.approx(total["energy_pj"] * 1e-6)
    assert total["sops"] == pytest.approx(576 + 288)
    assert total["macs"] == pytest.approx(576)  # real-valued layers only
    assert (E_MAC_PJ, E_AC_PJ) == (4.6, 0.9)


def test_counts_are_per_image_and_linear_counted():
    """Batch size does not change per-image counts; a Linear on averaged spikes is a MAC layer."""
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, 2, H, W] spikes
            return self.fc(x.mean((-2, -1))).mean(1)

    torch.manual_seed(0)
    s = (torch.rand(B, T, 2, H, W) < 0.3).float()
    one = profile_ops(Head(), [s[:1]])[0]
    three = profile_ops(Head(), [s])[0]
    assert one.macs == three.macs == pytest.approx(T * 5 * 2)  # 5 outputs x 2 inputs per step
    assert not three.spike_driven  # averages of spikes are fractions, not spikes
    assert three.energy_pj == pytest.approx(T * 10 * 4.6)


def test_quantised_spikes_still_spike_driven_but_averages_are_not():
    """A quantiser maps 1 to round(1/s)*s (close to 1): still accumulate-only. A constant
    fraction (averaged spikes, e.g. all 0.25) is a real value: MACs."""
    conv = nn.Conv2d(2, 1, 1, bias=False)
    s = spikes_with_rate_quarter()[:, 0]  # [B, 2, H, W]
    (layer,) = profile_ops(conv, [s * 0.996])  # e.g. scale 1/127.5: 1 -> 127/127.5
    assert layer.spike_driven and layer.input_rate == pytest.approx(0.25)
    (layer,) = profile_ops(conv, [s * 0.25])
    assert not layer.spike_driven


def test_spiking_resnet_layers_classified():
    """On the real model: the stem sees the image (MAC), block convs see spikes (AC), fc is MAC."""
    from pipeline.models import build_model, record_firing_rates

    torch.manual_seed(0)
    model = build_model({"arch": "resnet19", "width": 0.0625, "T": 2, "num_classes": 10, "in_channels": 1,
                         "staa": {"tsrd": False}})
    model.train()  # batch statistics: an untrained net in eval mode barely spikes past the stem
    x = torch.randn(4, 1, 8, 8)
    with record_firing_rates(model) as rates, count_ops(model) as counter:
        with torch.no_grad():
            model(x)
    layers = {l.name: l for l in counter.layers()}
    assert counter.images == 4
    assert layers["fc"].input_rate > 0
    assert not layers["stem.conv.conv"].spike_driven
    assert layers["layer1.0.conv1.conv"].spike_driven
    assert not layers["fc"].spike_driven
    assert any(n.endswith(".context") for n in layers)  # GC weighted sum counted as MACs
    # the first block conv's input rate is the stem neuron's firing rate
    assert layers["layer1.0.conv1.conv"].input_rate == pytest.approx(rates["stem.sn.lif"], rel=1e-6)
    # stem conv: out 8 ch x 8 x 8 per step x (1 x 3 x 3) x T
    assert layers["stem.conv.conv"].macs == pytest.approx(8 * 64 * 9 * 2)
