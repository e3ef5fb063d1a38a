"""The QAT module also exports with the new exporter (dynamo=True) to Q/DQ that ONNX Runtime runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.checkpoint import save_atomic
from pipeline.compress.quantize import load_qat_model, qat_payload, quantize_model
from tests.compress.test_qat import MCFG, META, _float_model

pytestmark = pytest.mark.slow


def test_qdq_module_exports_with_dynamo(tmp_path):
    import onnx

    from pipeline.runtime import OrtRunner

    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2
    qmodel = quantize_model(_float_model(), [(images, torch.zeros(8, dtype=torch.long))], n_batches=1,
                            bias_correction=False)
    save_atomic(qat_payload(qmodel, MCFG, META, fold_bn=True), tmp_path / "qat.pt")
    module, _ = load_qat_model(tmp_path / "qat.pt")
    path = tmp_path / "int8_dynamo.onnx"
    torch.onnx.export(module, (images[:2],), str(path), opset_version=18, dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("QuantizeLinear") > 20 and ops.count("QuantizeLinear") == ops.count("DequantizeLinear")
    assert "FakeQuantize" not in ops
    # the product's session settings: Q/DQ arithmetic as written (see pipeline/runtime/backends/onnxruntime.py EXACT_QDQ)
    got = OrtRunner(path, threads=1).predict(images.numpy())
    with torch.no_grad():
        want = module(images).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
