"""STAA gates start as the identity and learn; step attention's width is fixed by the checkpoint."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.checkpoint import load_model, model_payload, read_checkpoint, save_atomic
from pipeline.models import STAA, STAALIF, GlobalContext, StepAttention, build_model, make_neuron
from pipeline.models.spec import NeuronSpec, STAASpec, step_attention_width
from pipeline.compress.timesteps import carry_to_T
from pipeline.models.staa import gate_fn
from tests.conftest import shared_file

STAA_OFF = {"pe": False, "gc": False, "sa": False, "tsrd": False}
# every STAA module configuration: parts on/off, GC fusion, SA before/after the neuron
VARIANTS = [
    dict(pe=pe, gc=gc, sa=sa, gc_fusion=fusion, sa_position=pos, tsrd=True, tsrd_p=0.5)
    for pe, gc, sa, fusion, pos in itertools.product((True, False), (True, False), (True, False), ("mul", "add"),
                                                     ("before", "after"))
    if (pe or gc or sa) and (gc or fusion == "mul") and (sa or pos == "before")
]


def _id(v: dict) -> str:
    parts = [k for k in ("pe", "gc", "sa") if v[k]]
    return "+".join(parts) + (f"-{v['gc_fusion']}" if v["gc"] else "") + (f"-sa_{v['sa_position']}" if v["sa"] else "")


# --- identity at initialisation ------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
@pytest.mark.parametrize("kind", ["alif", "lif"])
def test_staa_lif_computes_the_plain_lif_at_init(variant: dict, kind: str):
    """Spikes and input gradients of STAA-LIF equal the bare neuron's exactly (training mode, TSRD on)."""
    torch.manual_seed(0)
    T, C = 4, 6
    neuron = make_neuron(NeuronSpec(kind=kind), C)
    unit = STAALIF(neuron, STAA(STAASpec(**variant), C, T)).train()
    x = (torch.randn(T, 3, C, 5, 5) + 0.6).requires_grad_(True)
    w = torch.randn(x.shape)  # a random upstream gradient
    s_plain = neuron(x)
    (g_plain,) = torch.autograd.grad((s_plain * w).sum(), x)
    s_staa = unit(x)
    (g_staa,) = torch.autograd.grad((s_staa * w).sum(), x)
    assert 0.05 < s_plain.mean().item() < 0.95  # the comparison is not between two silent layers
    torch.testing.assert_close(s_staa, s_plain, rtol=0, atol=0)
    torch.testing.assert_close(g_staa, g_plain, rtol=0, atol=0)


def test_full_model_equals_staa_off_model_at_init():
    """Every STAA part on at T=4 vs the same backbone with STAA off, sharing every weight: same logits."""
    torch.manual_seed(0)
    base = {"arch": "resnet19", "width": 0.125, "T": 4, "num_classes": 10, "in_channels": 3}
    full = build_model(dict(base, staa={"tsrd_p": 0.5}))
    plain = build_model(dict(base, staa=STAA_OFF))
    missing, unexpected = plain.load_state_dict(full.state_dict(), strict=False)
    assert not missing and unexpected and all(".staa." in k for k in unexpected)
    x = torch.randn(4, 3, 16, 16) * 3
    full.train(), plain.train()
    a, b = full(x), plain(x)
    assert not torch.allclose(a, a[:1].expand_as(a))  # the logits depend on the input
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gate_is_one_with_slope_half_at_zero():
    z = torch.zeros(3, requires_grad=True)
    g = gate_fn(z)
    g.sum().backward()
    assert torch.equal(g, torch.ones(3)) and torch.allclose(z.grad, torch.full((3,), 0.5))
    assert torch.allclose(gate_fn(torch.tensor([2.0]), "legacy"), torch.sigmoid(torch.tensor([2.0])))


# --- the gates learn on real images --------------------------------------------------------------

def _cifar(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(shared_file("cifar10_train_subset.npz")) as d:
        x = torch.from_numpy(d["images"][:n]).permute(0, 3, 1, 2).float() / 255
        y = torch.from_numpy(d["labels"][:n]).long()
    return (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True), y


class GateProbe:
    """Records each GC ("mul") and SA gate as ``[T, C]`` (mean over the batch) during a forward pass."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.gates: dict[str, list[torch.Tensor]] = {"gc": [], "sa": []}
        self.handles = []
        for m in model.modules():
            if isinstance(m, GlobalContext):
                self.handles.append(m.transform.register_forward_hook(self._hook("gc", m.gate, model)))
            elif isinstance(m, StepAttention):
                self.handles.append(m.fc2.register_forward_hook(self._hook("sa", m.gate, model)))

    def _hook(self, kind: str, gate: str, model: torch.nn.Module):
        def fn(_m, _inp, out: torch.Tensor) -> None:
            g = gate_fn(out.detach(), gate)
            g = g.flatten(1).unflatten(0, (model.T, -1)).mean(1) if kind == "gc" else g.mean(0).T  # [T, C]
            self.gates[kind].append(g)
        return fn

    def spread(self, kind: str) -> float:
        """Median over layers of the gates' standard deviation across channels and steps."""
        return float(torch.tensor([g.std().item() for g in self.gates[kind]]).median())

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _spreads(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    probe = GateProbe(model)
    try:
        with torch.no_grad():
            model(x)
    finally:
        probe.close()
    assert probe.gates["gc"] and probe.gates["sa"]
    return {k: probe.spread(k) for k in ("gc", "sa")}


@pytest.mark.shared_data
def test_gate_spread_grows_on_real_cifar_images():
    """From exactly 1 everywhere, GC and SA gates spread across channels and steps with each Adam step.

    32 real CIFAR-10 images pooled to 16x16 (for speed), ResNet-19 width 1/8, T=4. Measured: after
    5 steps GC about 0.02, SA about 0.008 (the bias-2 sigmoid gates barely moved from their
    random start: GC 0.035 -> 0.035, SA 0.004 -> 0.010 in 6 steps).
    """
    torch.manual_seed(0)
    x, y = _cifar(32)
    x = F.avg_pool2d(x, 2)
    model = build_model({"arch": "resnet19", "width": 0.125, "T": 4, "num_classes": 10, "in_channels": 3,
                         "staa": {"tsrd": False}})
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    spreads = [_spreads(model, x)]
    for step in range(1, 6):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in (2, 5):
            spreads.append(_spreads(model, x))
    print(f"\ngate spread (median std over channels x steps) after 0, 2, 5 steps: {spreads}")
    assert spreads[0] == {"gc": 0.0, "sa": 0.0}
    for kind, floor in (("gc", 0.01), ("sa", 0.004)):
        s0, s2, s5 = (s[kind] for s in spreads)
        assert s0 < s2 < s5 and s5 > floor, f"{kind} gate spread {s0:.4f} -> {s2:.4f} -> {s5:.4f}"


# --- step attention's hidden width ---------------------------------------------------------------

@pytest.mark.parametrize("T, ratio, width", [(1, 4, 1), (2, 4, 2), (4, 4, 4), (5, 4, 1), (8, 4, 2), (10, 4, 2),
                                             (16, 4, 4), (16, 2, 8)])
def test_step_attention_width_rule(T: int, ratio: int, width: int):
    assert step_attention_width(T, ratio) == width
    model = build_model({"arch": "resnet20", "width": 0.0625, "T": T, "num_classes": 10, "in_channels": 2,
                         "staa": {"sa_ratio": ratio, "pe": False, "gc": False}})
    assert {m.fc1.out_features for m in model.modules() if isinstance(m, StepAttention)} == {width}
    assert model.spec.staa.sa_hidden == width


def test_explicit_sa_hidden_and_carried_width_are_stored(tmp_path: Path):
    cfg = {"arch": "resnet20", "width": 0.0625, "T": 8, "num_classes": 10, "in_channels": 2,
           "staa": {"sa_hidden": 3}}
    model = build_model(cfg).set_time_steps(2)
    save_atomic(model_payload(model, cfg, {}), tmp_path / "m.pt")
    stored = read_checkpoint(tmp_path / "m.pt")["model_cfg"]
    assert stored["T"] == 2 and stored["staa"]["sa_hidden"] == 3 and stored["staa"]["gate"] == "identity"
    reloaded, _ = load_model(tmp_path / "m.pt")
    assert {m.fc1.out_features for m in reloaded.modules() if isinstance(m, StepAttention)} == {3}
    with pytest.raises(ValueError, match="sa_hidden"):
        build_model(dict(cfg, staa={"sa_hidden": 0}))


def test_checkpoint_without_sa_hidden_loads_with_the_old_rule_and_gates(tmp_path: Path):
    """A checkpoint written before sa_hidden/gate existed: width max(T // r, 1), sigmoid gates, same outputs."""
    torch.manual_seed(0)
    cfg = {"arch": "resnet19", "width": 0.125, "T": 4, "num_classes": 10, "in_channels": 3,
           "staa": {"sa_hidden": 1, "gate": "legacy"}}
    old = build_model(cfg).eval()
    payload = model_payload(old, cfg, {"dataset": "cifar10"})
    for key in ("sa_hidden", "gate"):
        del payload["model_cfg"]["staa"][key]  # what the earlier model_payload wrote
    torch.save(payload, tmp_path / "old.pt")
    reloaded, _ = load_model(tmp_path / "old.pt")
    assert {m.fc1.out_features for m in reloaded.modules() if isinstance(m, StepAttention)} == {1}
    x = torch.randn(3, 3, 16, 16) * 3
    with torch.no_grad():
        want = old(x)
        torch.testing.assert_close(reloaded(x), want, rtol=0, atol=0)
    assert not torch.allclose(want, want[:1].expand_as(want))  # gates matter: the net is not silent


# --- causal step attention (model.staa.sa_mode: causal) ------------------------------------------

@torch.no_grad()
def _randomise(sa: StepAttention, seed: int = 0) -> StepAttention:
    """Full random weights, upper triangles included: causality must come from the structure, not the init."""
    g = torch.Generator().manual_seed(seed)
    for lin in (sa.fc1, sa.fc2):
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.in_features ** 0.5)  # gates far from saturation
        lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.1)
    sa.fc1.weight.abs_()  # positive hidden units on a positive input: no ReLU is dead, every path is live
    sa.fc1.bias.abs_()
    for lin in (sa.fc1, sa.fc2):
        if lin.in_features == lin.out_features:  # a firm diagonal: each step's own input reaches its gate
            lin.weight.add_(torch.eye(lin.in_features) * 0.5)
    return sa


def _gates(sa: StepAttention, x: torch.Tensor) -> torch.Tensor:
    """The gate SA multiplies each (step, sample, channel) by: ``sa(x) / x`` on an all-nonzero input."""
    with torch.no_grad():
        return sa(x) / x


@pytest.mark.parametrize("mode", ["causal", "full"])
@pytest.mark.parametrize("T", [2, 4, 6])
def test_causal_step_attention_never_reads_a_later_step(mode: str, T: int):
    """Perturb step t+1 (and later): the gates of steps <= t are unchanged in causal mode and change in full mode."""
    torch.manual_seed(T)
    sa = _randomise(StepAttention(T, ratio=2, mode=mode)).eval()
    x = torch.rand(T, 3, 5, 4, 4) + 0.5  # nonzero, so the gate is x's ratio
    for t in range(T - 1):
        y = x.clone()
        y[t + 1:] += 3.0 + torch.rand_like(y[t + 1:])  # moves every later step's pooled mean by >= 3
        g_x, g_y = _gates(sa, x), _gates(sa, y)
        if mode == "causal":
            torch.testing.assert_close(g_y[:t + 1], g_x[:t + 1], rtol=0, atol=0)
        else:  # the paper's SA mixes every step: this is the test that must fail on it
            assert (g_y[:t + 1] - g_x[:t + 1]).abs().max() > 1e-3
        assert (g_y[t + 1:] - g_x[t + 1:]).abs().max() > 1e-3  # later gates do read their own steps


def test_causal_step_attention_is_lower_triangular_and_starts_as_the_identity():
    T = 5
    sa = StepAttention(T, ratio=4, mode="causal")
    assert sa.fc1.out_features == T and sa.fc2.in_features == T  # T -> T -> T, whatever sa_ratio says
    w1, w2 = sa.weights()
    assert torch.equal(w1, w1.tril()) and torch.equal(w2, w2.tril()) and (w1.diagonal() > 0).all()
    x = torch.randn(T, 2, 3, 4, 4)
    torch.testing.assert_close(sa(x), x, rtol=0, atol=0)  # 2 * sigmoid(0) = 1 at every step
    with pytest.raises(ValueError, match="sa_mode"):
        StepAttention(T, mode="sideways")


@pytest.mark.parametrize("variant", [dict(pe=True, gc=True, sa=True, sa_mode="causal", sa_position=pos, tsrd=True,
                                          tsrd_p=0.5) for pos in ("before", "after")], ids=["before", "after"])
def test_causal_staa_lif_computes_the_plain_lif_at_init(variant: dict):
    torch.manual_seed(0)
    T, C = 4, 6
    neuron = make_neuron(NeuronSpec(kind="alif"), C)
    unit = STAALIF(neuron, STAA(STAASpec(**variant), C, T)).train()
    x = (torch.randn(T, 3, C, 5, 5) + 0.6).requires_grad_(True)
    s_plain, s_staa = neuron(x), unit(x)
    assert 0.05 < s_plain.mean().item() < 0.95
    torch.testing.assert_close(s_staa, s_plain, rtol=0, atol=0)


def test_causal_sa_hidden_is_T_and_a_conflicting_width_is_refused():
    cfg = {"arch": "resnet20", "width": 0.0625, "T": 8, "num_classes": 10, "in_channels": 2,
           "staa": {"sa_mode": "causal", "pe": False, "gc": False}}
    model = build_model(cfg)
    assert {m.fc1.out_features for m in model.modules() if isinstance(m, StepAttention)} == {8}
    assert model.spec.staa.sa_hidden == 8
    with pytest.raises(ValueError, match="sa_hidden=3 with sa_mode 'causal'"):
        build_model(dict(cfg, staa=dict(cfg["staa"], sa_hidden=3)))


@pytest.mark.parametrize("pe_mode", ["interpolate", "truncate", "mean"])
def test_causal_sa_carries_its_leading_block_to_every_smaller_T_and_reloads_strictly(pe_mode: str, tmp_path: Path):
    """At every T_new < T: the carried gates of steps < T_new are exactly the old ones (leading [:T, :T] block,
    whatever pe_mode), and the checkpoint of the carried model reloads strictly with the same outputs."""
    torch.manual_seed(0)
    T = 6
    cfg = {"arch": "resnet20", "width": 0.0625, "T": T, "num_classes": 10, "in_channels": 2,
           "staa": {"sa_mode": "causal", "pe": False, "gc": True}}
    model = build_model(cfg).eval()
    for i, m in enumerate(model.modules()):
        if isinstance(m, StepAttention):
            _randomise(m, i)
    sa = next(m for m in model.modules() if isinstance(m, StepAttention))
    x = torch.rand(T, 2, 4, 3, 3) + 0.5
    events = (torch.rand(2, T, 2, 16, 16) < 0.3).float()
    for T_new in range(1, T):
        small = carry_to_T(model, T_new, pe_mode).eval()
        small_sa = next(m for m in small.modules() if isinstance(m, StepAttention))
        # equal up to float summation order (a [T_new, T_new] product against a [T, T] one)
        torch.testing.assert_close(_gates(small_sa, x[:T_new]), _gates(sa, x)[:T_new], rtol=0, atol=1e-6)
        assert small.spec.staa.sa_hidden == T_new and small.spec.staa.sa_mode == "causal"
        save_atomic(model_payload(small, cfg, {}), tmp_path / f"t{T_new}.pt")
        reloaded, ckpt = load_model(tmp_path / f"t{T_new}.pt")  # strict
        assert ckpt["model_cfg"]["staa"]["sa_mode"] == "causal"
        with torch.no_grad():
            want = small(events[:, :T_new])
            torch.testing.assert_close(reloaded(events[:, :T_new]), want, rtol=0, atol=0)


def test_checkpoint_without_sa_mode_reloads_as_full_sa(tmp_path: Path):
    """A checkpoint written before sa_mode existed was the paper's SA: it reloads as "full" whatever the default."""
    cfg = {"arch": "resnet20", "width": 0.0625, "T": 4, "num_classes": 10, "in_channels": 2, "staa": {"sa_hidden": 2}}
    payload = model_payload(build_model(cfg), cfg, {})
    del payload["model_cfg"]["staa"]["sa_mode"]
    torch.save(payload, tmp_path / "old.pt")
    from pipeline.models.spec import checkpoint_model_cfg

    assert checkpoint_model_cfg(payload["model_cfg"])["staa"]["sa_mode"] == "full"
    reloaded, _ = load_model(tmp_path / "old.pt")
    assert not any(m.causal for m in reloaded.modules() if isinstance(m, StepAttention))


def test_causal_sa_trains_only_its_lower_triangle():
    """Training (hand-written pooling backward on): the masked entries get no gradient, the causal ones do."""
    torch.manual_seed(0)
    cfg = {"arch": "resnet19", "width": 0.125, "T": 4, "num_classes": 10, "in_channels": 3,
           "staa": {"sa_mode": "causal", "tsrd": False}}
    model = build_model(cfg).train()
    sas = [m for m in model.modules() if isinstance(m, StepAttention)]
    for m in sas:
        _randomise(m)
    F.cross_entropy(model(torch.randn(4, 3, 16, 16) * 2), torch.arange(4)).backward()
    for m in sas:
        for w in (m.fc1.weight, m.fc2.weight):
            assert w.grad is not None and torch.equal(w.grad.triu(1), torch.zeros_like(w.grad))
    assert any(m.fc2.weight.grad.tril().abs().sum() > 0 for m in sas)
