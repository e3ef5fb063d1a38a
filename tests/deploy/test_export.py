"""ONNX export: the export stage on a tiny run (FP32 + INT8 parity in ONNX Runtime, metadata,
dynamic batch, static TensorRT check), the streaming graph on real digits and CIFAR-10 images."""
from __future__ import annotations

import copy
import json
import logging
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import onnx
import pytest
import torch
import yaml

from pipeline.deploy.graphs.onnx_export import export_onnx, read_metadata
from pipeline.deploy.graphs.streaming import STATE_IN, build_streaming, stream_blockers
from pipeline.deploy.graphs.unroll import FLOAT_RECIPE, INT8_RECIPE, UnrolledInfo, save_unrolled, unroll_float, unroll_qat
from pipeline.deploy.proofs.verify import Gates, export_streaming_verified, export_verified
from pipeline.runtime import OrtRunner, StepRunner
from tests.conftest import TINY, shared_file
from tests.helpers import firing_model, quantize_convs, real_images

MODEL = {"arch": "resnet19", "width": 0.125, "T": 2, "num_classes": 10, "in_channels": 1}
NO_SA = dict(MODEL, staa={"sa": False})
CAUSAL = dict(MODEL, staa={"sa_mode": "causal"})


def _ctx(cfg, name, out, inputs):
    from pipeline.registry import spec
    from pipeline.runner import StageContext

    out.mkdir(parents=True, exist_ok=True)
    return StageContext(cfg=cfg, spec=spec(name), out=out, inputs=inputs, store=None, device="cpu",
                        log=logging.getLogger(f"test.{name}"))


@pytest.fixture(scope="module")
def digits():
    x, y, _ = real_images("digits", 24, T=2)
    return x, y


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    from pipeline.config import deep_merge, load_config

    root = tmp_path_factory.mktemp("export_cfg")
    raw = deep_merge(TINY, {"name": "tiny", "artifacts_dir": str(root / "artifacts"),
                            "unroll": {"parity_images": 16}, "export": {"parity_images": 16}})
    (root / "tiny.yaml").write_text(yaml.safe_dump(raw))
    return load_config(str(root / "tiny.yaml"))


@pytest.fixture(scope="module")
def export_run(tmp_path_factory, tiny_cfg, digits):
    """The export stage run on an unroll folder made from a firing STAA model (SA on) and its Q/DQ twin."""
    import stages.export
    from pipeline.data import data_bundle, data_meta, model_config

    root = tmp_path_factory.mktemp("export_stage")
    bundle = data_bundle(tiny_cfg)
    mcfg, meta = model_config(tiny_cfg, bundle), data_meta(bundle)
    model = firing_model(mcfg, digits[0])
    flat = unroll_float(model)
    q = unroll_qat(quantize_convs(copy.deepcopy(model), [digits[0]]))
    (root / "unroll").mkdir()
    save_unrolled(root / "unroll" / "float.pt", flat, UnrolledInfo("float", 2, mcfg, meta, True, FLOAT_RECIPE))
    save_unrolled(root / "unroll" / "int8.pt", q, UnrolledInfo("int8", 2, mcfg, meta, False, INT8_RECIPE))
    real = tempfile.TemporaryDirectory

    def recorded(*args, **kwargs):  # where export puts its probe graphs
        SCRATCH.append(Path(kwargs.get("dir") or tempfile.gettempdir()))
        return real(*args, **kwargs)

    with mock.patch.object(tempfile, "TemporaryDirectory", recorded):
        result = stages.export.run(_ctx(tiny_cfg, "export", root / "export", {"unroll": root / "unroll"}))
    return result, root / "export", flat


SCRATCH: list[Path] = []


def test_probe_graphs_are_written_outside_the_committed_folder(export_run):
    """Issue 20 case 5: a killed export's probe-* folder (2.4 MB) was committed into export/."""
    _, out, _ = export_run
    assert SCRATCH and all(out not in (d, *d.parents) for d in SCRATCH), SCRATCH
    assert SCRATCH[0] == out.parent / ".export.scratch"


def test_fp32_onnx_matches_torch_in_onnx_runtime(export_run):
    result, out, _ = export_run
    m = result.metrics["fp32"]
    assert m["parity"]["n"] == 16
    assert m["parity"]["max_abs_diff"] <= 1e-4
    assert m["parity"]["top1_mismatches"] == 0
    assert len(m["parity"]["spike_agreement"]) == 17 and m["parity"]["min_local_spike_agreement"] >= 0.9999
    assert m["parity"]["samples_real_mismatch"] == 0 and m["parity"]["samples_clean"] > 0
    assert m["check"]["control_flow"] == [] and m["check"]["opset"] == 18
    assert m["check"]["inputs"] == {"input": ["batch", 1, 16, 16]}
    assert m["check"]["outputs"] == {"logits": ["batch", 10]}


def test_int8_onnx_is_qdq_and_matches_its_torch_model(export_run):
    result, out, _ = export_run
    m = result.metrics["int8"]
    assert m["parity"]["max_abs_diff"] <= 1e-3
    assert m["parity"]["top1_mismatches_beyond_tol"] == 0
    assert m["parity"]["min_local_spike_agreement"] >= 0.999 and m["parity"]["samples_real_mismatch"] == 0
    assert m["check"]["op_counts"]["DequantizeLinear"] > 0 and m["check"]["op_counts"]["BatchNormalization"] == 19
    assert read_metadata(out / "model_int8.onnx")["precision"] == "int8"
    # the OpenVINO row's adapted copy was proven on this very file, with both int8 bounds reached
    ad = m["openvino_adaptation"]
    assert ad["max_abs_diff"] == 0.0 and ad["float_pairs"] >= 1 and ad["pairs_below_min"] >= 1, ad


def test_graphs_are_compacted_before_every_check(export_run):
    """INT8 weights are int8 initializers feeding DequantizeLinear, both graphs are simplified, and
    metrics.json records the before/after counts and bytes; parity above ran on these final files."""
    from pipeline.deploy.graphs.compact import qdq_coverage

    result, out, _ = export_run
    for key in ("fp32", "int8"):
        c = result.metrics[key]["compact"]
        assert c["simplified"] and c["after"]["nodes"] < 0.7 * c["before"]["nodes"], c
        assert "Constant" in c["before"]["top_ops"] and "Constant" not in c["after"]["top_ops"]
        assert c["after"]["file_bytes"] == (out / f"model_{key}.onnx").stat().st_size
    c8 = result.metrics["int8"]["compact"]
    assert c8["folded_weight_quantizers"] == 19  # one per backbone conv of the reference Q/DQ model
    assert c8["qdq"]["conv_weight_dq"] == c8["qdq"]["conv_input_dq"] == 19
    assert c8["after"]["initializer_bytes"] < 0.5 * c8["before"]["initializer_bytes"]
    model = onnx.load(str(out / "model_int8.onnx"))
    assert qdq_coverage(model) == c8["qdq"]
    inits = {i.name: i.data_type for i in model.graph.initializer}
    quantized_inputs = [n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert not [i for i in quantized_inputs if i in inits]  # no float weight left behind a QuantizeLinear
    assert sum(t == onnx.TensorProto.INT8 and n.startswith("onnx::") is False for n, t in inits.items()) >= 19
    ratio = result.metrics["int8_over_fp32_initializer_bytes"]
    fp32_bytes = result.metrics["fp32"]["compact"]["after"]["initializer_bytes"]
    assert ratio == round(c8["after"]["initializer_bytes"] / fp32_bytes, 4) and ratio < 0.6
    assert 0 < result.metrics["int8_over_fp32_file_bytes"] < 1


def test_dynamic_batch_and_metadata(export_run, digits):
    _, out, flat = export_run
    x = digits[0]
    runner = OrtRunner(out / "model_fp32.onnx")
    with torch.no_grad():
        for n in (1, 5):
            assert np.abs(runner.predict(x[:n].numpy()) - flat(x[:n]).numpy()).max() <= 1e-4
    meta = read_metadata(out / "model_fp32.onnx")
    assert meta["T"] == "2" and meta["precision"] == "fp32" and meta["num_classes"] == "10"
    assert len(json.loads(meta["class_names"])) == 10
    assert len(json.loads(meta["mean"])) == 1 and len(json.loads(meta["std"])) == 1
    assert meta["input_layout"].startswith("NCHW") and meta["pipeline_version"] and len(meta["config_hash"]) == 64
    assert json.loads(meta["neuron_scopes"]) == ["/lif/"]


def test_streaming_skipped_for_step_attention_with_reason(export_run):
    result, out, _ = export_run
    assert result.metrics["streaming"]["exported"] is False
    assert "step attention" in result.metrics["streaming"]["reason"]
    assert not (out / "step_fp32.onnx").exists()


def test_nir_skipped_for_staa_with_the_blocking_parts(export_run):
    result, out, _ = export_run
    nir = result.metrics["nir"]
    assert nir["exported"] is False and not (out / "model.nir").exists()
    assert any("staa.sa" in line and "step attention" in line for line in nir["skipped"])


def test_trt_check_and_sample_inputs(export_run):
    result, out, _ = export_run
    report = json.loads((out / "trt_check.json").read_text())
    assert report["ok"] and set(report["graphs"]) == {"model_fp32.onnx", "model_int8.onnx"}
    samples = np.load(out / "sample_inputs.npz")
    assert samples["x"].shape == (16, 1, 16, 16) and samples["y"].shape == (16,) and samples["logits"].shape == (16, 10)
    assert not list(out.glob("probe-*"))  # scratch probe graphs are not left in the artifact


def test_export_stage_names_a_missing_unrolled_model(tmp_path, tiny_cfg):
    import stages.export
    from pipeline.runner import StageError

    (tmp_path / "unroll").mkdir()
    with pytest.raises(StageError, match="unroll stage"):
        stages.export.run(_ctx(tiny_cfg, "export", tmp_path / "export", {"unroll": tmp_path / "unroll"}))


def test_streaming_graph_equals_unrolled_graph_on_digits(tmp_path, digits):
    x, _ = digits
    flat = unroll_float(firing_model(NO_SA, x))
    assert stream_blockers(flat) == []
    export_onnx(flat, (x[:2],), tmp_path / "full.onnx")
    metrics, failures, trt = export_streaming_verified(
        flat, x, tmp_path / "step.onnx", opset=18, dynamo=False, metadata={}, gates=Gates(1e-4, None, 2e-4),
        reference=tmp_path / "full.onnx")
    assert failures == [], failures
    assert metrics["parity_vs_onnx"]["max_abs_diff"] <= 1e-4 and metrics["parity_vs_torch"]["top1_mismatches"] == 0
    assert metrics["state_tensors"] == 17 and trt.ok, trt.summary()
    graph = onnx.load(str(tmp_path / "step.onnx")).graph
    assert [i.name for i in graph.input][:2] == ["input", "step"]
    meta = read_metadata(tmp_path / "step.onnx")
    assert len(json.loads(meta["state_layers"])) == 17


def test_streaming_needs_the_carried_state(digits):
    """Feeding zero membranes at every step (no state) must give different logits: the state is real."""
    x, _ = digits
    flat = unroll_float(firing_model(NO_SA, x))
    net = build_streaming(flat, x)
    with torch.no_grad():
        stateless = sum(net(x, torch.tensor([t]), *net.zero_state(len(x)))[0] for t in range(net.T)) / net.T
        assert (stateless - flat(x)).abs().max() > 1e-3
        assert (net.run_clip(x) - flat(x)).abs().max() <= 1e-5


def test_step_runner_refuses_steps_past_T(tmp_path, digits):
    x, _ = digits
    flat = unroll_float(firing_model(dict(NO_SA, T=1), x))
    net = build_streaming(flat, x)
    export_onnx(net, net.example_inputs(x[:2]), tmp_path / "step.onnx", input_names=net.input_names,
                output_names=net.output_names, static_inputs=("step",))
    stepper = StepRunner(OrtRunner(tmp_path / "step.onnx"),
                         {f"{STATE_IN}{i}": list(s) for i, s in enumerate(net.state_shapes)}, net.T)
    stepper.step(x[:2].numpy())
    with pytest.raises(RuntimeError, match="reset"):
        stepper.step(x[:2].numpy())


def test_streaming_graph_on_cifar10(tmp_path):
    path = shared_file("cifar10_test.npz")
    x, _, _ = real_images("cifar10", 8, T=2, root=str(path.parent), format="npz", limit_train=16)
    flat = unroll_float(firing_model(dict(NO_SA, in_channels=3), x))
    metrics, failures, _ = export_streaming_verified(flat, x, tmp_path / "step.onnx", opset=18, dynamo=False,
                                                     metadata={}, gates=Gates(1e-4, None, 2e-4), reference=None)
    assert failures == [], failures
    assert metrics["parity_vs_torch"]["max_abs_diff"] <= 1e-4 and metrics["parity_vs_torch"]["n"] == 8


@pytest.mark.slow
def test_dynamo_exporter_gives_a_static_graph_with_parity(tmp_path, digits):
    x, _ = digits
    flat = unroll_float(firing_model(NO_SA, x))
    metrics, failures, trt = export_verified(flat, x[:8], tmp_path / "dyn.onnx", opset=18, dynamo=True, metadata={},
                                             gates=Gates(1e-4, 0.9999, 2e-4), what="dynamo", work_dir=tmp_path)
    assert failures == [] and trt.ok, (failures, trt.summary())
    assert metrics["check"]["control_flow"] == []
    names = [n.name for n in onnx.load(str(tmp_path / "dyn.onnx")).graph.node]
    assert any("/lif/" in n for n in names)  # scoped like the legacy exporter's, for FP32 pinning


@pytest.mark.slow
def test_nncf_qat_model_exports_as_qdq_with_exact_onnx_runtime_parity(tmp_path, digits):
    """The real quantiser's output (NNCF PTQ, Q/DQ module): unrolled, exported, checked, ORT parity."""
    pytest.importorskip("nncf", reason="NNCF is not installed")
    from pipeline.checkpoint import save_atomic
    from pipeline.compress.quantize import load_qat_model, qat_payload, quantize_model

    x, y = digits
    meta = {"dataset": "digits", "in_channels": 1, "image_size": [16, 16], "is_event": False}
    qmodel = quantize_model(firing_model(MODEL, x), [(x[:16], y[:16])], 1, bias_correction=False)
    save_atomic(qat_payload(qmodel, MODEL, meta, fold_bn=True), tmp_path / "qat.pt")
    qat, _ = load_qat_model(tmp_path / "qat.pt")
    q = unroll_qat(qat)
    metrics, failures, trt = export_verified(q, x, tmp_path / "model_int8.onnx", opset=18, dynamo=False, metadata={},
                                             gates=Gates(1e-3, 0.999, 2e-3, flip_margin=0.05), what="nncf int8",
                                             work_dir=tmp_path)
    assert failures == [], failures
    assert trt.ok, trt.summary()
    p = metrics["parity"]
    assert p["max_abs_diff"] <= 1e-3 and p["min_local_spike_agreement"] >= 0.999 and p["samples_real_mismatch"] == 0
    assert "parity_ort_defaults" in metrics  # ORT's bias quantisation, recorded for information


def test_streaming_event_frames_in_torch():
    """Event input [B, T, C, H, W]: step t is fed frame t; T steps equal the unrolled model."""
    torch.manual_seed(0)
    events = torch.rand(3, 2, 2, 16, 16).round()  # 0/1 event counts, 2 polarities
    flat = unroll_float(firing_model(dict(NO_SA, in_channels=2), events))
    net = build_streaming(flat, events)
    with torch.no_grad():
        assert (net.run_clip(events) - flat(events)).abs().max() <= 1e-5
        static = torch.stack([events[:, 0]] * 2, 1)  # a clip whose frames differ must not equal frame 0 repeated
        assert (net.run_clip(static) - net.run_clip(events)).abs().max() > 1e-4


def test_export_fails_when_the_openvino_adaptation_changes_the_files_numbers(export_run, digits, monkeypatch):
    """The gate behind metrics["int8"]["openvino_adaptation"]: any difference is a failure (here forced)."""
    import types

    import stages.export

    _, out, _ = export_run
    ctx = types.SimpleNamespace(output=lambda role: out / "model_int8.onnx", log=logging.getLogger("test.export"))
    failures: list[str] = []
    res = stages.export._adaptation_exact(ctx, digits[0][:4].numpy(), failures)
    assert res["max_abs_diff"] == 0.0 and failures == []
    real = stages.export.adaptation_exactness
    monkeypatch.setattr(stages.export, "adaptation_exactness", lambda m, x: dict(real(m, x), max_abs_diff=0.5))
    stages.export._adaptation_exact(ctx, digits[0][:4].numpy(), failures)
    assert len(failures) == 1 and "changes its numbers" in failures[0]


# --- causal step attention streams (model.staa.sa_mode: causal) ----------------------------------

@torch.no_grad()
def _open_sa_gates(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random gate layers (SA's fc2, GC's last conv): at init every gate is 1 and a lost SA state would not show."""
    from pipeline.models import GlobalContext, StepAttention

    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        last = m.fc2 if isinstance(m, StepAttention) else m.transform[-1] if isinstance(m, GlobalContext) else None
        if last is not None:
            last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 0.5)
            last.bias.copy_(torch.randn(last.bias.shape, generator=g) * 0.5)
    return model


def _causal_model(x, cfg=CAUSAL):
    return _open_sa_gates(firing_model(cfg, x))


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_causal_sa_step_graph_equals_the_unrolled_graph_on_ort_and_openvino(tmp_path, digits, precision):
    """T calls of the step graph give the unrolled graph's spikes (every element) and logits, in ONNX Runtime and
    OpenVINO; INT8: the step graph of the same Q/DQ module keeps every quantiser of the unrolled INT8 graph."""
    pytest.importorskip("openvino", reason="openvino is not installed")
    x = digits[0][:8]  # 8 images x 2 steps x 17 layers: every spike compared (CI time)
    model = _causal_model(digits[0])
    module = unroll_float(model) if precision == "fp32" else unroll_qat(quantize_convs(copy.deepcopy(model), [x]))
    assert stream_blockers(module) == []
    _, f, _ = export_verified(module, x, tmp_path / "full.onnx", opset=18, dynamo=False, metadata={},
                              gates=Gates(1e-3, None, 2e-3), what="full", work_dir=tmp_path)
    assert f == [], f
    metrics, failures, trt = export_streaming_verified(
        module, x, tmp_path / "step.onnx", opset=18, dynamo=False, metadata={}, gates=Gates(1e-4, None, 2e-4),
        reference=tmp_path / "full.onnx", work_dir=tmp_path)
    assert failures == [], failures
    for runtime in ("onnxruntime", "openvino"):
        res = metrics["parity_runtimes"][runtime]
        assert res["checked"] and res["n"] == len(x), res
        assert res["spikes_differing"] == 0 and res["spike_elements"] > 0 and res["max_abs_diff"] <= 1e-4, res
    assert metrics["sa_state_tensors"] == 17 and metrics["state_tensors"] == 17 and trt.ok, trt.summary()
    ops = metrics["check"]["op_counts"]
    full_ops = onnx.load(str(tmp_path / "full.onnx")).graph.node
    assert ops.get("QuantizeLinear", 0) == sum(n.op_type == "QuantizeLinear" for n in full_ops)
    assert (ops.get("QuantizeLinear", 0) > 0) == (precision == "int8")
    graph = onnx.load(str(tmp_path / "step.onnx")).graph
    names = [i.name for i in graph.input]
    assert names[:2] == ["input", "step"] and names[-1] == "sa_in.16" and graph.output[-1].name == "sa_out.16"
    meta = read_metadata(tmp_path / "step.onnx")
    assert len(json.loads(meta["sa_state_layers"])) == 17 and json.loads(meta["sa_state_shapes"])[0][1] == 2


def test_causal_sa_streaming_needs_the_carried_history(digits):
    """Zero SA histories at every step (membranes carried) give other logits: the SA state is real."""
    x, _ = digits
    flat = unroll_float(_causal_model(x))
    net = build_streaming(flat, x)
    n = len(net.state_shapes)
    with torch.no_grad():
        assert (net.run_clip(x) - flat(x)).abs().max() <= 1e-6
        state, total = net.zero_state(len(x)), 0
        for t in range(net.T):
            logits, *state = net(x, torch.tensor([t]), *state)
            state = state[:n] + net.zero_state(len(x))[n:]  # drop the SA histories
            total = total + logits
        assert (total / net.T - flat(x)).abs().max() > 1e-3


def test_streaming_event_frames_with_causal_sa_in_torch():
    torch.manual_seed(0)
    events = torch.rand(3, 2, 2, 16, 16).round()
    flat = unroll_float(_causal_model(events, dict(CAUSAL, in_channels=2)))
    net = build_streaming(flat, events)
    with torch.no_grad():
        assert (net.run_clip(events) - flat(events)).abs().max() <= 1e-6


def test_full_sa_model_still_gets_the_skip_reason(digits):
    x, _ = digits
    flat = unroll_float(firing_model(MODEL, x))
    (reason,) = stream_blockers(flat)
    assert "step attention (SA) mixes all T steps in 17 STAA blocks" in reason and "sa_mode: causal" in reason
    with pytest.raises(ValueError, match="mixes all T steps"):
        build_streaming(flat, x)


@pytest.mark.slow
def test_nncf_int8_step_graph_keeps_the_unrolled_quantisers_and_parity(tmp_path, digits):
    """The real quantiser (NNCF PTQ -> Q/DQ module): its step graph has the unrolled INT8 graph's Q/DQ pairs and
    T steps reproduce its spikes and logits in ONNX Runtime and OpenVINO."""
    pytest.importorskip("nncf", reason="NNCF is not installed")
    pytest.importorskip("openvino", reason="openvino is not installed")
    from pipeline.checkpoint import save_atomic
    from pipeline.compress.quantize import load_qat_model, qat_payload, quantize_model

    x, y = digits
    meta = {"dataset": "digits", "in_channels": 1, "image_size": [16, 16], "is_event": False}
    qmodel = quantize_model(_causal_model(x), [(x[:16], y[:16])], 1, bias_correction=False)
    save_atomic(qat_payload(qmodel, CAUSAL, meta, fold_bn=True), tmp_path / "qat.pt")
    q = unroll_qat(load_qat_model(tmp_path / "qat.pt")[0])
    m, f, _ = export_verified(q, x, tmp_path / "full.onnx", opset=18, dynamo=False, metadata={},
                              gates=Gates(1e-3, None, 2e-3, flip_margin=0.05), what="nncf int8", work_dir=tmp_path)
    assert f == [], f
    metrics, failures, trt = export_streaming_verified(q, x, tmp_path / "step.onnx", opset=18, dynamo=False,
                                                       metadata={}, gates=Gates(1e-4, None, 2e-4),
                                                       reference=tmp_path / "full.onnx", work_dir=tmp_path)
    assert failures == [] and trt.ok, (failures, trt.summary())
    assert metrics["check"]["op_counts"]["QuantizeLinear"] == m["check"]["op_counts"]["QuantizeLinear"] > 17
    for runtime in ("onnxruntime", "openvino"):
        res = metrics["parity_runtimes"][runtime]
        assert res["checked"] and res["spikes_differing"] == 0 and res["max_abs_diff"] <= 1e-4, res


def test_export_fails_clearly_when_the_step_graph_loses_the_sa_history(tmp_path, digits, monkeypatch):
    """A step module that forgets earlier steps' pooled means: export names the differing spikes and logits."""
    from pipeline.deploy.graphs import streaming

    x = digits[0][:4]
    flat = unroll_float(_causal_model(digits[0]))
    export_onnx(flat, (x[:2],), tmp_path / "full.onnx")
    real = streaming._StepSA.forward

    def forgetful(self, inp):
        self.hist = torch.zeros_like(self.hist)
        return real(self, inp)

    monkeypatch.setattr(streaming._StepSA, "forward", forgetful)
    _, failures, _ = export_streaming_verified(flat, x, tmp_path / "step.onnx", opset=18, dynamo=False, metadata={},
                                               gates=Gates(1e-4, None, 2e-4), reference=tmp_path / "full.onnx",
                                               work_dir=tmp_path, runtimes=("onnxruntime",))
    assert any("spikes differ from the unrolled graph's" in f and "onnxruntime" in f for f in failures), failures
    assert any("T steps give logits" in f for f in failures), failures
