"""STAA's training kernels compute what the eval ops compute, and stay out of what a quantiser wraps.

GC and SA run hand-written backward kernels when a gradient is wanted (``staa.AttentionPool``,
``staa.SpatialMean``, GC's transform as linear layers); evaluation, tracing, export and NNCF see the eval
ops (1x1 convs, softmax, matmul, mean). In float64 both paths must give the same outputs and gradients
to rounding, on lively (non-identity) parameters, for every GC fusion and SA placement.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.models import GlobalContext, StepAttention, build_model, set_hand_backward
from pipeline.models.staa import hand_backward

MODULES = {
    "gc-mul": lambda: GlobalContext(12, ratio=4, fusion="mul"),
    "gc-add": lambda: GlobalContext(12, ratio=4, fusion="add"),
    "sa": lambda: StepAttention(5, hidden=3),
    "sa-legacy": lambda: StepAttention(5, hidden=3, gate="legacy"),
}


def _lively(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        if isinstance(module, StepAttention):  # hidden ReLU units alive on positive input: every weight learns
            module.fc1.weight.abs_()
            module.fc1.bias.abs_()
    return module.double()


def _forward_backward(module: nn.Module, x: torch.Tensor, grad_seed: int = 1):
    module.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_(True)
    y = module(xx)
    g = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(grad_seed))
    y.backward(g)
    return y.detach(), xx.grad, {k: p.grad.clone() for k, p in module.named_parameters()}


MAPS, FEATURES = (5, 3, 12, 6, 7), (5, 2, 12)  # [T, B, C, H, W] and [T, B, C] (SA also gates features)


@pytest.mark.parametrize("name,shape", [(n, MAPS) for n in MODULES] + [("sa", FEATURES)])
def test_training_kernels_equal_the_eval_ops(name, shape):
    module = _lively(MODULES[name]())
    x = torch.rand(shape, dtype=torch.float64) + 0.1
    set_hand_backward(module, True)
    assert hand_backward(module)
    fast = _forward_backward(module, x)
    set_hand_backward(module, False)
    assert not hand_backward(module)
    ref = _forward_backward(module, x)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast[1], ref[1], rtol=1e-12, atol=1e-12)
    assert fast[2].keys() == ref[2].keys() and len(ref[2]) > 0
    for k in ref[2]:
        assert float(ref[2][k].abs().max()) > 0, f"{k} has no gradient: the comparison would prove nothing"
        torch.testing.assert_close(fast[2][k], ref[2][k], rtol=1e-10, atol=1e-12, msg=lambda m: f"{k}: {m}")


def test_training_kernels_only_run_when_a_gradient_is_wanted():
    gc = GlobalContext(8)
    assert hand_backward(gc)
    with torch.no_grad():
        assert not hand_backward(gc)  # evaluation: the eval ops


def test_qat_models_train_through_the_eval_ops():
    """quantize_model (QAT's start) switches the kernels off: NNCF's quantisers hook the eval ops and learn
    only through autograd (a matmul-output quantiser inside AttentionPool would run without a gradient)."""
    from pipeline.compress.quantize import quantize_model

    torch.manual_seed(0)
    model = build_model({"arch": "resnet19", "width": 0.0625, "T": 2, "num_classes": 4, "in_channels": 1})
    staa_parts = [m for m in model.modules() if isinstance(m, (GlobalContext, StepAttention))]
    assert staa_parts and all(m.hand_backward for m in staa_parts)
    batches = [(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))]
    qmodel = quantize_model(model, batches, n_batches=1)
    wrapped = [m for m in qmodel.modules() if isinstance(m, (GlobalContext, StepAttention))]
    assert len(wrapped) == len(staa_parts)
    assert not any(m.hand_backward for m in wrapped)
    assert all(m.hand_backward for m in staa_parts), "the float model handed in must not change"


def test_attention_pool_runs_in_its_input_precision():
    """Under autocast GC's input is half precision and its attention weight fp32; backward runs without autocast,
    so the kernel must cast on its own: output and gradients in their tensors' dtypes, values as in fp32."""
    from pipeline.models.staa import AttentionPool

    torch.manual_seed(0)
    f32 = torch.rand(6, 8, 20)
    a32 = torch.randn(8)
    weights = torch.randn(6, 8)
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        f = f32.to(dtype).detach().clone().requires_grad_(True)
        a = a32.clone().requires_grad_(True)
        out = AttentionPool.apply(f, a)
        assert out.dtype == dtype
        (out.float() * weights).sum().backward()
        assert f.grad.dtype == dtype and a.grad.dtype == torch.float32
        grads[dtype] = (out.float(), f.grad.float(), a.grad)
    for ref, low in zip(grads[torch.float32], grads[torch.bfloat16]):
        torch.testing.assert_close(low, ref, rtol=5e-2, atol=5e-2)
