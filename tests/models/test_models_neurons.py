"""Neurons, surrogate gradients, probes, inference-mode parity and time-step changes."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.models import (LIF, PE_MODES, AdaptiveLIF, build_model, neuron_modules, record_firing_rates,
                             record_spikes, set_inference_mode)
from pipeline.models.staa import PositionEncoding, StepAttention, resample_time
from pipeline.models.surrogate import spike


def cfg(**kw) -> dict:
    base = {"arch": "resnet19", "num_classes": 10, "in_channels": 3, "width": 0.125, "T": 4}
    base.update(kw)
    return base


# --- neuron dynamics -----------------------------------------------------------------------

def test_lif_dynamics_match_the_equations():
    """Reference loop of H_t = M U_{t-1} + N I_t, S_t = H_t >= v_th, U_t = H_t (1 - S_t), U_0 = 0."""
    torch.manual_seed(0)
    x = torch.rand(5, 2, 3, 4, 4)
    lif = AdaptiveLIF(3, decay=0.25, gain=1.0)
    with torch.no_grad():
        lif.decay.copy_(torch.tensor([0.1, 0.5, 0.9]))
        lif.gain.copy_(torch.tensor([1.0, 0.7, 1.3]))
    m, n = lif.decay.view(3, 1, 1), lif.gain.view(3, 1, 1)
    u, ref = torch.zeros_like(x[0]), []
    for t in range(5):
        h = m * u + n * x[t]
        s = (h >= 0.5).float()
        u = h * (1 - s)
        ref.append(s)
    torch.testing.assert_close(lif(x), torch.stack(ref), rtol=0, atol=0)


def test_fixed_lif_has_no_parameters_and_handles_features():
    lif = LIF(decay=0.5, gain=1.0)
    assert list(lif.parameters()) == []
    x = torch.full((3, 2, 4), 0.3)  # [T, B, F]: 0.3, 0.45, 0.525 -> fires at t=2
    assert lif(x)[:, 0, 0].tolist() == [0.0, 0.0, 1.0]


def test_hard_reset_and_no_state_between_calls():
    lif = AdaptiveLIF(1)
    x = torch.full((4, 1, 1, 1, 1), 0.6)  # fires every step (reset to 0, then 0.6 again)
    assert lif(x).flatten().tolist() == [1.0] * 4
    assert lif(x).flatten().tolist() == [1.0] * 4  # second call: same, no leftover membrane


# --- surrogate gradients -------------------------------------------------------------------

def surrogate_grad(name: str, x: torch.Tensor, param: float) -> torch.Tensor:
    h = (x + 0.5).requires_grad_(True)
    spike(h, 0.5, name, param).sum().backward()
    return h.grad


def test_rect_surrogate_is_a_box_of_width_w():
    x = torch.tensor([-0.9, -0.6, -0.3, 0.0, 0.2, 0.35, 0.6, 2.0])
    g = surrogate_grad("rect", x, 0.8)  # window |x| < 0.4, height 1/0.8
    expected = torch.tensor([0, 0, 1.25, 1.25, 1.25, 1.25, 0, 0])
    torch.testing.assert_close(g, expected)


@pytest.mark.parametrize("name, formula", [
    ("tanh", lambda x, k: k / 2 * (1 - torch.tanh(k * x) ** 2)),
    ("atan", lambda x, k: (k / 2) / (1 + (math.pi / 2 * k * x) ** 2)),
])
def test_smooth_surrogates_follow_their_formula_and_have_unit_area(name, formula):
    k = 3.0
    x = torch.linspace(-20, 20, 400001)
    g = surrogate_grad(name, x, k)
    torch.testing.assert_close(g, formula(x, k))
    assert g[200000].item() == pytest.approx(k / 2)  # peak k/2 at the threshold
    area = torch.trapezoid(g.double(), x.double()).item()
    assert area == pytest.approx(1.0, abs=0.02 if name == "atan" else 1e-4)  # atan has heavy tails


def test_forward_is_exact_heaviside_for_every_surrogate():
    h = torch.tensor([0.4999, 0.5, 0.5001, -1.0, 3.0])
    for name in ("rect", "tanh", "atan"):
        assert spike(h, 0.5, name, 1.0).tolist() == [0, 1, 1, 0, 1]


# --- probes --------------------------------------------------------------------------------

def test_record_spikes_and_rates_hooks_are_removed():
    torch.manual_seed(0)
    model = build_model(cfg(T=2)).eval()
    x = torch.randn(2, 3, 16, 16)
    n_neurons = len(neuron_modules(model))
    with torch.no_grad(), record_spikes(model) as spikes:
        model(x)
    assert len(spikes) == n_neurons
    for name, s in spikes.items():
        assert s.shape[:2] == (2, 2) and not s.requires_grad
        assert set(s.unique().tolist()) <= {0.0, 1.0}, name
    with torch.no_grad(), record_firing_rates(model) as rates:
        model(x)
        first = dict(rates)
        model(torch.zeros_like(x) - 5)  # a second, different batch is accumulated
    assert set(rates) == set(spikes)
    assert all(0.0 <= r <= 1.0 for r in rates.values())
    assert any(rates[k] != first[k] for k in rates)
    name = next(iter(spikes))
    torch.testing.assert_close(torch.tensor(first[name]), spikes[name].double().mean().float())
    assert all(not m._forward_hooks for m in model.modules())
    with torch.no_grad():
        model(x)
    assert len(rates) == len(first)  # nothing recorded after the block


# --- inference-mode parity -----------------------------------------------------------------

@pytest.mark.parametrize("surrogate", ["rect", "tanh"])
def test_inference_mode_spikes_equal_training_path_spikes(surrogate):
    torch.manual_seed(0)
    model = build_model(cfg(T=3, neuron={"surrogate": surrogate})).eval()
    x = torch.randn(3, 3, 16, 16) * 2
    with torch.no_grad(), record_spikes(model) as ref:
        out_ref = model(x)
        ref = dict(ref)
    set_inference_mode(model, True)
    with torch.no_grad(), record_spikes(model) as inf:
        out_inf = model(x)
    assert ref.keys() == inf.keys() and len(ref) > 0
    for name in ref:
        assert torch.equal(ref[name], inf[name]), name
    assert torch.equal(out_ref, out_inf)


# --- time steps ----------------------------------------------------------------------------

def test_resample_time_values():
    w = torch.tensor([0.0, 1.0, 2.0, 6.0]).view(4, 1)
    assert resample_time(w, 0, 2, "truncate").flatten().tolist() == [0.0, 1.0]
    assert resample_time(w, 0, 2, "interpolate").flatten().tolist() == [0.0, 6.0]
    assert resample_time(w, 0, 3, "interpolate").flatten().tolist() == [0.0, 1.5, 6.0]
    assert resample_time(w, 0, 1, "interpolate").flatten().tolist() == [0.0]
    assert resample_time(w, 0, 2, "mean").flatten().tolist() == [2.25, 2.25]
    assert resample_time(w, 0, 7, "interpolate").flatten().tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 4.0, 6.0]
    with pytest.raises(ValueError, match="truncate"):
        resample_time(w, 0, 5, "truncate")


@pytest.mark.parametrize("mode", PE_MODES)
def test_set_time_steps_carries_position_encodings(mode):
    torch.manual_seed(0)
    model = build_model(cfg(T=4))
    pes = {n: m for n, m in model.named_modules() if isinstance(m, PositionEncoding)}
    assert pes
    with torch.no_grad():
        for m in pes.values():
            m.pe.copy_(torch.randn_like(m.pe))
    old = {n: m.pe.detach().clone() for n, m in pes.items()}
    model.set_time_steps(2, pe_mode=mode)
    assert model.T == 2 and model.spec.T == 2
    for n, m in pes.items():
        new, o = m.pe.detach(), old[n]
        assert new.shape == (2,) + o.shape[1:]
        expected = {"truncate": o[:2], "interpolate": o[[0, 3]], "mean": o.mean(0, keepdim=True).expand(2, *o.shape[1:])}[mode]
        torch.testing.assert_close(new, expected)
    for sa in (m for m in model.modules() if isinstance(m, StepAttention)):
        assert sa.fc1.in_features == 2 and sa.fc2.out_features == 2
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    model.train()
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("pe.pe"))


def test_step_attention_mean_resampling_keeps_constant_input_gate():
    """'mean' on a time-constant input: hidden unchanged, so each new gate logit = mean of the old logits."""
    torch.manual_seed(0)
    sa = StepAttention(T=4, ratio=2)
    with torch.no_grad():  # away from the identity start, distinct per step
        sa.fc2.weight.normal_(0.0, 1.0)
        sa.fc2.bias.normal_(0.0, 1.0)
    x = torch.rand(1, 2, 5, 3, 3).expand(4, 2, 5, 3, 3)  # same input every step
    logit = lambda g: torch.logit(g / 2)  # noqa: E731  (gate = 2 * sigmoid(z))
    gate_old = (sa(x) / x)[..., 0, 0]  # [4, B, C]
    sa.set_time_steps(2, "mean")
    gate_new = (sa(x[:2]) / x[:2])[..., 0, 0]
    expected = logit(gate_old).mean(0, keepdim=True).expand(2, -1, -1)
    assert logit(gate_old).std(0).min() > 0.05  # the old steps' gates differ, so the mean is a real test
    torch.testing.assert_close(logit(gate_new), expected, rtol=1e-4, atol=1e-4)


def test_set_time_steps_rejects_bad_mode_and_grows_with_interpolate():
    model = build_model(cfg(T=2))
    with pytest.raises(ValueError, match="pe_mode"):
        model.set_time_steps(1, pe_mode="nearest")
    model.set_time_steps(4, pe_mode="interpolate").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 16, 16)).shape == (1, 10)


def test_neuron_table_matches_the_schema_choices():
    """``model.neuron.kind``'s allowed values and the constructor table are one set: a kind added to
    the schema without a constructor (or the reverse) fails here, not at build time."""
    from pipeline.models.neurons import NEURONS
    from pipeline.schema import SCHEMA

    assert set(NEURONS) == set(SCHEMA["model"]["neuron"]["kind"].options)
    for kind in NEURONS:
        model = build_model(cfg(neuron={"kind": kind}))
        assert {type(m).__name__ for _, m in neuron_modules(model)} == {"AdaptiveLIF" if kind == "alif" else "LIF"}
