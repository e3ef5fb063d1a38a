"""One definition of the neuron dynamics (charge / fire / reset), run by every path, and its step hook.

Claims: hard and soft reset follow their equations on a hand-computed sequence; the per-step loop,
``step(x, u)`` looped (the streaming export's call) and the fused training node fire identical spikes for
both resets, and the node's hand backward equals autograd through the loop; ``model.neuron.reset`` reaches
every neuron and a checkpoint; the step hook (``recording``) gives the membranes parity used to read by
wrapping ``fire``, and runs the per-step loop so no step goes unseen.
"""
from __future__ import annotations

import pytest
import torch

from pipeline.checkpoint import load_model, model_payload
from pipeline.models import LIF, AdaptiveLIF, build_model, fold_batchnorm, neuron_modules, record_spikes, recording
from pipeline.models.neurons import RESETS
from pipeline.schema import ConfigError, node

# --- the equations, by hand ------------------------------------------------------------------
# M = 0.5, N = 1, v_th = 0.5, dyadic inputs (every value below is exact in fp32)
X = [0.25, 0.25, 0.625, 0.375]
H = {"hard": [0.25, 0.375, 0.8125, 0.375],  # t3 fires, U = 0: h4 = 0 + 0.375
     "soft": [0.25, 0.375, 0.8125, 0.53125]}  # t3 fires, U = 0.8125 - 0.5: h4 = 0.15625 + 0.375 fires too
S = {"hard": [0.0, 0.0, 1.0, 0.0], "soft": [0.0, 0.0, 1.0, 1.0]}


def _seq() -> torch.Tensor:
    return torch.tensor(X).view(4, 1, 1)  # [T, B, F]


@pytest.mark.parametrize("reset", ["hard", "soft"])
def test_reset_rules_on_a_hand_computed_sequence(reset):
    lif = LIF(decay=0.5, gain=1.0, reset=reset)
    assert lif(_seq()).flatten().tolist() == S[reset]
    u, spikes = None, []
    for x_t in _seq().unbind(0):  # the stateless step, as the streaming graph calls it
        s, u = lif.step(x_t, u)
        spikes.append(float(s))
    assert spikes == S[reset]
    with torch.no_grad(), recording(lif) as rec:
        lif(_seq())
    assert rec.membranes[""].flatten().tolist() == [h - 0.5 for h in H[reset]]
    assert rec.spikes[""].flatten().tolist() == S[reset]


def test_reset_table_is_the_schema_choices_and_hard_is_the_default():
    choice = node("model.neuron.reset")
    assert tuple(RESETS) == tuple(choice.options) and choice.default == "hard"
    assert all(m.reset_mode == "hard" for _, m in neuron_modules(build_model(_cfg())))
    with pytest.raises(ValueError, match="valid: hard, soft"):
        LIF(reset="sof")


# --- every path computes the one definition ------------------------------------------------------

def _inputs(shape, seed=0) -> torch.Tensor:
    """Around the threshold, half on a 1/32 grid (membranes land on v_th exactly: ``>=`` is exercised)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 0.6 + 0.3
    return torch.where(torch.rand(shape, generator=gen) < 0.5, torch.round(x * 32) / 32, x)


def _alif(reset: str, surrogate: str = "rect") -> AdaptiveLIF:
    lif = AdaptiveLIF(3, surrogate=surrogate, surrogate_param=1.0 if surrogate == "rect" else 2.0, reset=reset)
    with torch.no_grad():
        lif.decay.copy_(torch.tensor([0.25, 0.6, 0.9]))
        lif.gain.copy_(torch.tensor([1.0, 0.75, 1.3]))
    return lif


def _is_fused(s: torch.Tensor) -> bool:
    return "MultiStepLIF" in type(s.grad_fn).__name__


@pytest.mark.parametrize("reset", ["hard", "soft"])
@pytest.mark.parametrize("surrogate", ["rect", "atan"])
def test_loop_step_and_fused_node_agree(reset, surrogate):
    lif = _alif(reset, surrogate)
    x = _inputs((5, 2, 3, 4, 4))
    with torch.no_grad():
        loop = lif(x)
        u, steps = None, []
        for x_t in x.unbind(0):
            s, u = lif.step(x_t, u)
            steps.append(s)
    xf = x.clone().requires_grad_(True)
    fused = lif(xf)
    assert _is_fused(fused)
    assert torch.equal(loop, torch.stack(steps)) and torch.equal(loop, fused)
    assert 0.1 < float(loop.mean()) < 0.9
    # the hand backward is the derivative of the same steps: autograd through the per-step loop
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    (fused * g).sum().backward()
    fused_grads = [xf.grad.clone()] + [p.grad.clone() for p in lif.parameters()]
    lif.zero_grad()
    lif.hand_backward = False
    xr = x.clone().requires_grad_(True)
    ref = lif(xr)
    assert not _is_fused(ref) and torch.equal(ref, fused)
    (ref * g).sum().backward()
    for a, b in zip(fused_grads, [xr.grad] + [p.grad for p in lif.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_soft_and_hard_differ_only_after_a_spike():
    x = _inputs((6, 2, 3, 4, 4), seed=3)
    with torch.no_grad():
        hard, soft = _alif("hard")(x), _alif("soft")(x)
    assert not torch.equal(hard, soft)
    assert torch.equal(hard[0], soft[0])  # U_0 = 0: the first step knows no reset
    assert float(soft.sum()) > float(hard.sum())  # soft keeps the charge above the threshold


def test_a_neuron_that_overrides_a_step_trains_on_its_own_maths():
    """The fused backends run BaseLIF's steps only: an override must not be skipped silently."""
    class Leaky(LIF):
        def reset(self, h, s):
            return 0.5 * super().reset(h, s)

    x = _inputs((4, 2, 3, 4, 4)).requires_grad_(True)
    out = Leaky(decay=0.5)(x)
    assert not _is_fused(out)
    assert not torch.equal(out, LIF(decay=0.5)(x))


# --- the setting: config, checkpoint ---------------------------------------------------------------

def _cfg(**neuron) -> dict:
    return {"arch": "resnet19", "width": 0.0625, "T": 2, "num_classes": 4, "in_channels": 1,
            "neuron": neuron, "staa": {"tsrd": False}}


def test_reset_setting_reaches_every_neuron_and_the_checkpoint(tmp_path):
    model = build_model(_cfg(reset="soft"))
    assert {m.reset_mode for _, m in neuron_modules(model)} == {"soft"}
    payload = model_payload(model, {k: v for k, v in _cfg().items() if k != "neuron"}, {"dataset": "x"})
    assert payload["model_cfg"]["neuron"]["reset"] == "soft"  # from the built model, not the partial config
    torch.save(payload, tmp_path / "m.pt")
    loaded, _ = load_model(tmp_path / "m.pt")
    assert {m.reset_mode for _, m in neuron_modules(loaded)} == {"soft"}
    del payload["model_cfg"]["neuron"]["reset"]  # a checkpoint written before the setting: the hard reset
    torch.save(payload, tmp_path / "old.pt")
    assert {m.reset_mode for _, m in neuron_modules(load_model(tmp_path / "old.pt")[0])} == {"hard"}
    with pytest.raises(ConfigError, match="reset"):
        build_model(_cfg(reset="subtract"))


# --- the step hook ----------------------------------------------------------------------------------

def _fire_wrapped_membranes(model, x) -> dict[str, torch.Tensor]:
    """What parity read before the step hook: each neuron's ``fire`` wrapped on the instance."""
    steps: dict[str, list] = {}
    for name, m in neuron_modules(model):
        def fire(h, _name=name, _m=m, _fire=m.fire):
            steps.setdefault(_name, []).append((h - _m.v_th).detach())
            return _fire(h)
        m.fire = fire
    try:
        with torch.no_grad():
            model(x)
    finally:
        for _, m in neuron_modules(model):
            del m.fire
    return {k: torch.stack(v) for k, v in steps.items()}


@pytest.mark.parametrize("reset", ["hard", "soft"])
def test_parity_reference_records_the_membranes_fire_wrapping_did(reset):
    from pipeline.deploy.proofs.parity import torch_with_spikes

    torch.manual_seed(0)
    model = build_model(_cfg(reset=reset)).eval()
    x = torch.randn(3, 1, 8, 8)
    want = _fire_wrapped_membranes(model, x)
    with record_spikes(model) as emitted:  # what each neuron returned to the next layer (a forward hook)
        model(x)
    logits, spikes, membranes = torch_with_spikes(model)(x)
    assert list(membranes) == [n for n, _ in neuron_modules(model)] == list(want)
    for name, h in want.items():
        assert torch.equal(membranes[name], h), name
        assert torch.equal(spikes[name], (h >= 0).float()), name
        assert torch.equal(spikes[name], emitted[name]), name  # the step hook's spikes are the neuron's output
    assert torch.equal(logits, model(x))
    _, _, none = torch_with_spikes(model, membranes=False)(x)
    assert none is None


def test_step_hook_sees_every_step_and_leaves_nothing_behind():
    lif = _alif("hard")
    x = _inputs((4, 2, 3, 4, 4)).requires_grad_(True)
    seen = []
    handle = lif.register_step_hook(lambda m, h, s, u: seen.append((h.clone(), s.clone(), u.clone())))
    out = lif(x)  # a gradient is wanted, yet the hook forces the per-step loop: every step is seen
    assert len(seen) == 4 and not _is_fused(out)
    assert torch.equal(torch.stack([s for _, s, _ in seen]), out)
    h, s, u = seen[2]
    assert torch.equal(u, h * (1 - s))  # u is the membrane after reset
    handle.remove()
    assert _is_fused(lif(x)) and len(seen) == 4
    with recording(lif) as rec:  # one recording per forward pass: the second replaces the first
        lif(x)
        lif(x[:2])
    assert rec.spikes[""].shape[0] == 2
    assert not lif._step_hooks and not lif._forward_pre_hooks


def test_nir_export_names_soft_reset_as_a_blocker():
    from pipeline.deploy.graphs.nir_export import nir_blockers

    plain = {"pe": False, "gc": False, "sa": False, "tsrd": False}
    hard = fold_batchnorm(build_model(dict(_cfg(kind="lif"), staa=plain)).eval())
    soft = fold_batchnorm(build_model(dict(_cfg(kind="lif", reset="soft"), staa=plain)).eval())
    assert nir_blockers(hard) == []
    soft_blockers = nir_blockers(soft)
    assert len(soft_blockers) == 1 and all("model.neuron.reset: hard" in b for b in soft_blockers)


def test_soft_reset_exports_to_onnx_and_runs_the_same():
    """The per-step ops of the soft rule are plain ONNX ops: ONNX Runtime computes what torch computes."""
    import io

    import numpy as np
    ort = pytest.importorskip("onnxruntime")
    from tests.helpers import firing_model

    torch.manual_seed(0)
    cfg = dict(_cfg(reset="soft"), in_channels=3)
    model = fold_batchnorm(firing_model(cfg, torch.randn(16, 3, 12, 12)).inference_mode(True))
    hard = fold_batchnorm(firing_model(dict(cfg, neuron={}), torch.randn(16, 3, 12, 12)).inference_mode(True))
    hard.load_state_dict(model.state_dict())
    buf = io.BytesIO()
    torch.onnx.export(model, (torch.randn(2, 3, 12, 12),), buf, dynamo=False, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        ref, other = model(x).numpy(), hard(x).numpy()
    np.testing.assert_allclose(sess.run(None, {"x": x.numpy()})[0], ref, atol=1e-4, rtol=0)
    assert np.abs(ref - other).max() > 1e-2  # the graph runs the soft rule, not the hard one
