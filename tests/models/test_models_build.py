"""Model library: config resolution, shapes, gradients, parameter counts, TSRD, determinism."""
from __future__ import annotations

import pytest
import torch

from pipeline.models import (ARCHS, SpikingNet, build_model, record_firing_rates, resolve_model_cfg,
                             set_inference_mode)
from pipeline.models.resnet import scale_channels

STAA_OFF = {"pe": False, "gc": False, "sa": False, "tsrd": False}


def cfg(**kw) -> dict:
    base = {"arch": "resnet19", "num_classes": 10, "in_channels": 3, "width": 0.125, "T": 2}
    base.update(kw)
    return base


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- config --------------------------------------------------------------------------------

def test_defaults_come_from_schema():
    spec = resolve_model_cfg({"num_classes": 100, "in_channels": 3})
    assert (spec.arch, spec.width, spec.T) == ("resnet19", 1.0, 4)
    assert spec.neuron.kind == "alif" and spec.neuron.v_th == 0.5 and spec.neuron.decay == 0.25
    assert spec.staa.pe and spec.staa.gc and spec.staa.sa and spec.staa.tsrd and spec.staa.tsrd_p == 0.1
    assert spec.staa.gc_fusion == "mul" and spec.staa.sa_position == "before"


def test_unknown_arch_names_valid_ones():
    with pytest.raises(ValueError) as e:
        build_model(cfg(arch="vgg11"))
    for name in ARCHS:
        assert name in str(e.value)


@pytest.mark.parametrize("bad, needle", [
    ({"staa": {"gc_fusoin": "mul"}}, "model.staa.gc_fusoin"),
    ({"neuron": {"surrogate": "sigmoid"}}, "rect"),
    ({"staa": {"tsrd_p": 1.5}}, "tsrd_p"),
    ({"T": 0}, "model.T"),
])
def test_bad_config_is_rejected_with_the_key(bad, needle):
    with pytest.raises(ValueError, match=needle):
        resolve_model_cfg(cfg(**bad))


def test_missing_injected_key_is_explained():
    with pytest.raises(ValueError, match="num_classes"):
        resolve_model_cfg({"in_channels": 3})


# --- shapes and gradients ------------------------------------------------------------------

def test_resnet19_cifar100_full_width_forward_shape():
    torch.manual_seed(0)
    model = build_model({"num_classes": 100, "in_channels": 3, "T": 4})
    assert isinstance(model, SpikingNet) and model.T == 4
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100) and torch.isfinite(out).all()


def test_every_parameter_gets_a_finite_nonzero_gradient():
    """Width 1/4, T=4, B=2, every STAA part on (TSRD p=0 so no step bypasses it).

    The gates start as the identity (their last layer is zero), so at init only the layers behind
    that zero layer get no gradient; after one SGD step every parameter does.
    """
    torch.manual_seed(0)
    model = build_model(cfg(num_classes=100, width=0.25, T=4, staa={"tsrd": False}))
    model.train()
    names = dict(model.named_parameters())
    for part in ("decay", "gain", "staa.pe.pe", "staa.gc.attn", "staa.gc.transform", "staa.sa.fc1", "staa.sa.fc2"):
        assert any(part in n for n in names), part
    behind_zero = ("staa.gc.attn", "staa.gc.transform.0", "staa.gc.transform.1", "staa.sa.fc1")
    x = torch.randn(2, 3, 32, 32) * 2

    def backward() -> None:
        model.zero_grad()
        with record_firing_rates(model) as rates:
            out = model(x)
        assert min(rates.values()) > 0.0  # every layer fires, so the surrogate path carries gradient
        out.logsumexp(1).sum().backward()

    backward()
    for name, p in names.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert (p.grad.abs().sum() == 0) == any(k in name for k in behind_zero), name
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    backward()
    for name, p in names.items():
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_forward_steps_and_event_input():
    torch.manual_seed(0)
    model = build_model(cfg(arch="resnet20", in_channels=2, T=3)).eval()
    frames = (torch.rand(2, 3, 2, 16, 16) < 0.3).float()  # [B, T, C, H, W] from a DataLoader
    with torch.no_grad():
        steps = model.forward_steps(frames)
        out = model(frames)
    assert steps.shape == (3, 2, 10)
    torch.testing.assert_close(out, steps.mean(0))
    with pytest.raises(ValueError, match="T=3"):
        model(torch.rand(2, 4, 2, 16, 16))


def test_resnet34_small_forward():
    torch.manual_seed(0)
    model = build_model(cfg(arch="resnet34", num_classes=1000, T=2)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_static_input_is_repeated_over_time():
    """Direct encoding: with every STAA part off and T steps, the stem sees the same image each step."""
    torch.manual_seed(0)
    model = build_model(cfg(T=3, staa=STAA_OFF)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a = model.forward_steps(x)
        b = model.forward_steps(x.unsqueeze(1).repeat(1, 3, 1, 1, 1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- parameter count by hand ---------------------------------------------------------------

def hand_count(arch: str, width: float, in_ch: int, classes: int, adaptive: bool) -> int:
    """Convs (no bias), BNs (2C), neuron M and N (2C each, adaptive only), FC, from the architecture."""
    table = {
        "resnet19": (128, 3, [(128, 3, 1), (256, 3, 2), (512, 2, 2)]),
        "resnet34": (64, 7, [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]),
        "resnet20": (64, 3, [(64, 3, 1), (128, 3, 2), (256, 3, 2)]),
    }
    stem, k, stages = table[arch]
    c = lambda n: max(8, round(n * width))  # noqa: E731
    neuron = (lambda ch: 2 * ch) if adaptive else (lambda ch: 0)
    cin = c(stem)
    total = in_ch * cin * k * k + 2 * cin + neuron(cin)
    for ch, blocks, stride in stages:
        cout = c(ch)
        for b in range(blocks):
            bin_, s = (cin, stride) if b == 0 else (cout, 1)
            total += bin_ * cout * 9 + 2 * cout + neuron(cout)  # conv1, bn1, sn1
            total += cout * cout * 9 + 2 * cout + neuron(cout)  # conv2, bn2, sn2
            if s != 1 or bin_ != cout:
                total += bin_ * cout + 2 * cout  # 1x1 shortcut + bn
        cin = cout
    return total + cin * classes + classes


@pytest.mark.parametrize("arch, width, in_ch, classes, kind", [
    ("resnet19", 1.0, 3, 100, "alif"),
    ("resnet19", 0.125, 3, 10, "lif"),
    ("resnet34", 0.25, 3, 1000, "alif"),
    ("resnet20", 0.5, 2, 10, "alif"),
])
def test_parameter_count_matches_hand_count_with_staa_off(arch, width, in_ch, classes, kind):
    model = build_model({"arch": arch, "width": width, "num_classes": classes, "in_channels": in_ch,
                         "neuron": {"kind": kind}, "staa": STAA_OFF})
    assert n_params(model) == hand_count(arch, width, in_ch, classes, kind == "alif")
    assert scale_channels(128, width) == max(8, round(128 * width))


def test_staa_parts_add_parameters_and_placement_last_k():
    base = n_params(build_model(cfg(staa=STAA_OFF)))
    full = n_params(build_model(cfg()))
    last = build_model(cfg(staa={"placement": "last_k", "last_k": 1}))
    assert base < n_params(last) < full
    with_staa = {n.split(".")[0] for n, m in last.named_modules() if n.endswith(".staa") and m is not None}
    assert with_staa == {"layer3"}


# --- TSRD, determinism, inference mode -----------------------------------------------------

@torch.no_grad()
def perturb_staa(model: torch.nn.Module, std: float = 0.5) -> torch.nn.Module:
    """Random PE and gate weights: at init STAA is the identity, so bypassing it would change nothing."""
    for name, p in model.named_parameters():
        if ".staa." in name:
            p.add_(torch.randn_like(p) * std)
    return model


def test_tsrd_changes_training_output_never_eval():
    torch.manual_seed(0)
    on = perturb_staa(build_model(cfg(staa={"tsrd_p": 0.5})))
    off = build_model(cfg(staa={"tsrd": False}))
    off.load_state_dict(on.state_dict())
    x = torch.randn(4, 3, 16, 16)
    on.train(), off.train()
    torch.manual_seed(1)
    a = on(x)
    torch.manual_seed(1)
    b = off(x)
    assert not torch.allclose(a, b)
    torch.manual_seed(1)
    a2 = on(x)
    torch.testing.assert_close(a, a2, rtol=0, atol=0)  # fixed seed -> same TSRD draw
    off.load_state_dict(on.state_dict())  # same BN running statistics
    on.eval(), off.eval()
    with torch.no_grad():
        e1, e2, e3 = on(x), on(x), off(x)
    torch.testing.assert_close(e1, e2, rtol=0, atol=0)  # eval is deterministic
    torch.testing.assert_close(e1, e3, rtol=0, atol=0)  # TSRD never acts in eval


def test_inference_mode_switches_every_neuron_and_back():
    model = build_model(cfg())
    set_inference_mode(model, True)
    flags = [m.inference for n, m in model.named_modules() if n.endswith("lif")]
    assert flags and all(flags)
    model.inference_mode(False)
    assert not any(m.inference for n, m in model.named_modules() if n.endswith("lif"))


@pytest.mark.parametrize("fusion, position", [("add", "after"), ("mul", "after")])
def test_staa_variants_build_and_train(fusion, position):
    torch.manual_seed(0)
    model = build_model(cfg(neuron={"surrogate": "atan"}, staa={"gc_fusion": fusion, "sa_position": position}))
    out = model(torch.randn(2, 3, 16, 16))
    out.sum().backward()
    assert out.shape == (2, 10) and torch.isfinite(out).all()
