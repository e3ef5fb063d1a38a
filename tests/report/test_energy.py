"""Energy count against a hand-computed tiny network (docs/architecture.md §6 convention)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.report.energy import E_AC_PJ, E_MAC_PJ, E_MUL_PJ, count_ops, profile_ops, summarize

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
    assert total["mults"] == total["adds"] == 0  # no element-wise module in this net


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


class OneUnit(nn.Module):
    """One spiking unit (STAA + neuron) on a batch-first input ``[B, T, C, H, W]``, as in the model."""

    def __init__(self, unit: nn.Module) -> None:
        super().__init__()
        self.unit = unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unit(x.transpose(0, 1)).sum()


def staa_unit(neuron: nn.Module, C: int, T_: int, **staa: object) -> OneUnit:
    from pipeline.models import STAA, STAALIF, STAASpec

    return OneUnit(STAALIF(neuron, STAA(STAASpec(tsrd=False, **staa), C, T_)))


@pytest.mark.parametrize("sa_position", ["before", "after"])
def test_hand_counted_elementwise_ops_of_one_staa_unit(sa_position):
    """PE, GC (mul), SA and an adaptive LIF on C=2, 3x3, T=3: every element-wise op counted per image.

    Per image and step the current has 2 x 3 x 3 = 18 elements, 54 over T=3:
    PE: 54 adds; GC: 54 gate multiplies (+ 54 MACs of the weighted sum); SA: 54 gate multiplies;
    neuron: N*I 54 multiplies, M*U 36 multiplies and 36 adds (steps 2..3).
    """
    from pipeline.models import AdaptiveLIF

    torch.manual_seed(0)
    C, T3 = 2, 3
    layers = {l.name: l for l in profile_ops(staa_unit(AdaptiveLIF(C), C, T3, sa_position=sa_position),
                                             [torch.randn(B, T3, C, 3, 3)])}
    ew = {n: (l.mults, l.adds) for n, l in layers.items() if l.kind == "elementwise"}
    assert ew == {"unit.staa.pe": (0, 54), "unit.staa.gc.gate": (54, 0), "unit.staa.sa.gate": (54, 0),
                  "unit.lif": (54 + 36, 36)}
    assert layers["unit.staa.gc.context"].macs == pytest.approx(54)
    for name, (mults, adds) in ew.items():
        assert layers[name].energy_pj == pytest.approx(mults * 3.7 + adds * 0.9)
        assert not layers[name].spike_driven and layers[name].sops == 0
    total = summarize(list(layers.values()))
    assert total["mults"] == 54 * 3 + 36 and total["adds"] == 54 + 36
    assert total["elementwise_pj"] == pytest.approx((54 * 3 + 36) * 3.7 + 90 * 0.9)
    assert total["energy_pj"] == pytest.approx(sum(l.energy_pj for l in layers.values()))
    assert total["energy_pj"] > total["elementwise_pj"] > 0  # element-wise work is in the per-image energy


def test_fixed_neuron_coefficients_that_change_nothing_are_free():
    """A plain LIF with N = 1 pays no N*I; with M = 0 no M*U and no add; GC "add" fusion is adds."""
    from pipeline.models import LIF

    x = torch.randn(B, 3, 2, 3, 3)
    (lif,) = [l for l in profile_ops(OneUnit(LIF(decay=0.25, gain=1.0)), [x]) if l.kind == "elementwise"]
    assert (lif.mults, lif.adds) == (36, 36)  # M*U and the sum on steps 2..3 only
    (lif,) = [l for l in profile_ops(OneUnit(LIF(decay=0.0, gain=0.5)), [x]) if l.kind == "elementwise"]
    assert (lif.mults, lif.adds) == (54, 0)
    layers = {l.name: l for l in profile_ops(staa_unit(LIF(), 2, 3, gc_fusion="add", pe=False, sa=False), [x])}
    assert (layers["unit.staa.gc.gate"].mults, layers["unit.staa.gc.gate"].adds) == (0, 54)


def test_elementwise_ops_on_the_real_model_match_neuron_shapes():
    """ResNet-19 with every STAA part: per image, element-wise multiplies = (GC + SA + N) x current
    elements + M x the elements of steps 2..T, summed over every neuron's input current."""
    from pipeline.models import build_model, record_spikes

    torch.manual_seed(0)
    T2 = 2
    model = build_model({"arch": "resnet19", "width": 0.0625, "T": T2, "num_classes": 10, "in_channels": 1,
                         "staa": {"tsrd": False}})
    x = torch.randn(3, 1, 8, 8)
    with record_spikes(model) as spikes, count_ops(model) as counter, torch.no_grad():
        model.eval()(x)
    per_image = sum(s[0].numel() for s in spikes.values()) / len(x)  # current elements of one step
    total = summarize(counter.layers())
    assert total["mults"] == pytest.approx(3 * per_image * T2 + per_image * (T2 - 1))
    assert total["adds"] == pytest.approx(per_image * T2 + per_image * (T2 - 1))  # PE + membrane sum
    weights = sum(l.energy_pj for l in counter.layers() if l.kind != "elementwise")
    assert total["energy_pj"] == pytest.approx(weights + total["mults"] * E_MUL_PJ + total["adds"] * E_AC_PJ)


def test_summary_lists_what_is_not_counted_and_report_renders_it():
    from pipeline.report.report_md import energy_note

    total = summarize(profile_ops(nn.Conv2d(1, 1, 1), [torch.randn(2, 1, 2, 2)]))
    excluded = total["excluded"]
    for item in ("memory access", "BatchNorm", "residual", "softmax", "LayerNorm", "pooling", "reset"):
        assert any(item in e for e in excluded), f"{item} missing from excluded"
    doc = {"energy_model": {"e_mac_pj": E_MAC_PJ, "e_ac_pj": E_AC_PJ, "convention": "estimate"},
           "rows": [{"artifact": "a", "energy": None}, {"artifact": "b", "energy": total}]}
    note = "\n".join(energy_note(doc))
    assert all(e in note for e in excluded)
