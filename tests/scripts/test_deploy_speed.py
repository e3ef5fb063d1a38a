"""bench/deploy_speed.py's quick path end to end on a tiny width: every backend timed, ratios computed."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.conftest import REPO


def load_bench():
    spec = importlib.util.spec_from_file_location("deploy_speed", REPO / "bench" / "deploy_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_bench_times_every_backend_on_the_shipped_graphs(tmp_path, capsys):
    pytest.importorskip("openvino", reason="openvino is not installed")
    bench = load_bench()
    out = tmp_path / "results.json"
    results = bench.main(["--quick", "--widths", "1/16", "--threads", "1", "--batches", "1,2", "--iters", "1",
                          "--warmup", "0", "--images", "8", "--out", str(out)])
    rows = results["rows"]
    assert [(r["backend"], r["precision"]) for r in rows] == list(bench.BACKENDS)
    assert all(r["p50_ms"]["b1_t1"] > 0 and r["p50_ms"]["b2_t1"] > 0 for r in rows)
    ov_int8 = next(r for r in rows if r["backend"] == "openvino" and r["precision"] == "int8")
    assert ov_int8["int8_mac_share"] and ov_int8["int8_mac_share"] > 0.5  # compiled to integer kernels
    model = results["models"][0]
    assert model["compact"]["int8"]["folded_weight_quantizers"] > 0 and model["export_notes"] == []
    # at width 1/16 the graph structure outweighs the weights, so compare the weights, not the files
    assert model["compact"]["int8"]["after"]["initializer_bytes"] < model["compact"]["fp32"]["after"]["initializer_bytes"]
    assert set(results["ratios"]["ort_fp32_over_torch_b1"]) == {"w0.0625_T2_b1_t1"}
    assert json.loads(out.read_text())["settings"]["quick"] is True
    printed = capsys.readouterr().out
    assert "openvino" in printed and "INT8/FP32 ONNX file size" in printed
