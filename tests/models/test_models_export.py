"""The inference-mode model traces to a static ONNX graph with a dynamic batch axis."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from pipeline.models import build_model, fold_batchnorm
from tests.helpers import firing_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def export(model: torch.nn.Module, x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    return buf.getvalue()


ATOL = 1e-4


@pytest.mark.parametrize("arch, shape", [("resnet19", (3, 16, 16)), ("resnet20", (2, 2, 16, 16))])
def test_onnx_export_is_static_and_batch_dynamic(arch, shape):
    cfg = {"arch": arch, "width": 0.125, "T": 2, "num_classes": 10, "in_channels": shape[-3]}
    torch.manual_seed(0)
    # BN calibrated so that every layer fires: an untrained net's last layer can stay silent, and
    # then the logits are the FC bias for any input and any export would "match".
    model = firing_model(cfg, torch.randn(16, *shape)).inference_mode(True)
    fold_batchnorm(model)
    blob = export(model, torch.randn(2, *shape))
    graph = onnx.load_from_string(blob).graph
    ops = {n.op_type for n in graph.node}
    assert not ops & {"Loop", "If", "Scan", "BatchNormalization"}, ops
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, *shape)
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(None, {"x": x.numpy()})[0]
        assert got.shape == (batch, 10)
        # the outputs depend on the input (else parity proves nothing): away from the FC bias ...
        assert np.abs(ref - model.fc.bias.detach().numpy()).max() > 100 * ATOL
        np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    # ... and different for different images, by far more than the tolerance
    assert np.abs(ref - ref.mean(0)).max() > 100 * ATOL


def test_fold_batchnorm_keeps_eval_outputs():
    torch.manual_seed(0)
    model = build_model({"width": 0.125, "T": 2, "num_classes": 10, "in_channels": 3})
    model.train()
    model(torch.randn(8, 3, 16, 16))  # non-trivial running statistics
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model.forward_steps(x)
        fold_batchnorm(model)
        got = model.forward_steps(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
