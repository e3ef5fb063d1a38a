"""Parity excuses with bounds a systematic error cannot slip under.

The defective graphs are the ones issue 18 found passing export's gates: every spike threshold
1e-4 too low in an FP32 graph (each flip lands within the flip margin, so each image alone looks
like rounding), and the last neuron layer's threshold 0.01 low in an INT8 graph (inside the INT8
margin). Both must fail; the correct exports of the same models must pass.
"""
from __future__ import annotations

import copy

import pytest
import torch

from pipeline.deploy.proofs.parity import ParityReport, torch_with_spikes
from pipeline.deploy.graphs.unroll import unroll_float, unroll_qat
from pipeline.deploy.proofs.verify import export_verified, prove_graph
from pipeline.models import neuron_modules
from pipeline.schema import SCHEMA, defaults
from stages.export import _gates
from tests.helpers import firing_model, quantize_convs, real_images

MODEL = {"arch": "resnet19", "width": 0.125, "T": 2, "num_classes": 10, "in_channels": 1}
GATES = _gates(defaults(SCHEMA["export"]))


def _mismatch(ref: list[float], cand: list[float], tie_tol: float = 0.1) -> ParityReport:
    rep = ParityReport(tie_tol=tie_tol)
    rep.update(torch.tensor([ref]), torch.tensor([cand]))
    return rep


def test_a_tie_excuses_only_a_choice_among_the_tied_classes():
    near_tie = [1.00, 0.95, -3.0, -3.0]
    assert _mismatch(near_tie, [0.90, 1.00, -3.0, -3.0]).top1_mismatches_beyond_tol == 0  # picked the tied class
    rep = _mismatch(near_tie, [-9.0, -9.0, -9.0, 9.0])  # a new, untied class: a real mismatch
    assert rep.top1_mismatches_beyond_tol == 1 and rep.top1_tie_excused == 0
    assert rep.failures(1.0, None, "t")


def test_a_flip_just_outside_the_margin_is_real():
    """2x the flip margin from the threshold is not rounding (a margin 100x looser would excuse it)."""
    margin = 1e-4
    ref = {"a": torch.zeros(1, 1, 4)}
    h = {"a": torch.full((1, 1, 4), -0.4)}
    h["a"][0, 0, 0] = -2 * margin
    cand = {"a": ref["a"].clone()}
    cand["a"][0, 0, 0] = 1
    rep = ParityReport(tie_tol=1e-3, flip_margin=margin)
    rep.update(torch.tensor([[2.0, 0.0]]), torch.tensor([[2.0, 0.0]]), ref, cand, h)
    assert rep.real == 1 and rep.numerical == 0


def test_the_share_of_numerical_images_is_capped():
    T, B = 1, 4
    ref = {"a": torch.zeros(T, B, 8)}
    h = {"a": torch.full((T, B, 8), -0.4)}
    cand = {"a": ref["a"].clone()}
    for b in range(3):  # three of four images flip one spike 1e-6 below the threshold
        h["a"][0, b, b] = -1e-6
        cand["a"][0, b, b] = 1
    logits = torch.tensor([[2.0, 0.0]] * B)
    rep = ParityReport(tie_tol=1e-3, flip_margin=1e-4, max_numerical_share=0.5)
    rep.update(logits, logits, ref, cand, h)
    assert rep.numerical == 3 and rep.real == 0
    assert any("systematic" in f for f in rep.failures(1e-4, None, "t"))
    assert rep.metrics()["numerical_share"] == 0.75 and rep.metrics()["max_numerical_share"] == 0.5
    loose = ParityReport(tie_tol=1e-3, flip_margin=1e-4, max_numerical_share=0.8)
    loose.update(logits, logits, ref, cand, h)
    assert loose.failures(1e-4, None, "t") == []


@pytest.fixture(scope="module")
def digits():
    x, _, _ = real_images("digits", 24, T=2)
    return x


@pytest.fixture(scope="module")
def models(digits):
    model = firing_model(MODEL, digits)
    return unroll_float(model), unroll_qat(quantize_convs(copy.deepcopy(model), [digits]))


def _shift(module: torch.nn.Module, delta: float, last_only: bool = False) -> torch.nn.Module:
    bad = copy.deepcopy(module)
    neurons = neuron_modules(bad)
    for _, m in neurons[-1:] if last_only else neurons:
        m.v_th = m.v_th + delta
    return bad


def _gate(reference: torch.nn.Module, shipped: torch.nn.Module, x: torch.Tensor, key: str, tmp_path) -> tuple:
    """Export ``shipped`` as export does, then run export's parity gates against ``reference``."""
    path = tmp_path / f"model_{key}.onnx"
    export_verified(shipped, x, path, opset=18, dynamo=False, metadata={}, gates=GATES[key], what=key,
                    work_dir=tmp_path)
    return prove_graph(torch_with_spikes(reference), path, tmp_path / f"{path.stem}.probe.onnx", x, GATES[key], key)


@pytest.mark.slow  # two exports with parity (about 30 s each on an idle core)
def test_correct_fp32_export_passes_and_every_threshold_1e4_low_fails(models, digits, tmp_path):
    flat, _ = models
    ok, failures = _gate(flat, flat, digits, "fp32", tmp_path / "ok")
    assert failures == [] and ok.numerical_share <= GATES["fp32"].max_numerical_share
    bad, failures = _gate(flat, _shift(flat, -1e-4), digits, "fp32", tmp_path / "bad")
    assert bad.real == 0  # every flip is within the flip margin: each image alone looks like rounding
    assert any("systematic" in f for f in failures), (bad.metrics(), failures)


@pytest.mark.slow
def test_correct_int8_export_passes_and_its_last_threshold_001_low_fails(models, digits, tmp_path):
    _, q = models
    ok, failures = _gate(q, q, digits, "int8", tmp_path / "ok")
    assert failures == []
    bad, failures = _gate(q, _shift(q, -0.01, last_only=True), digits, "int8", tmp_path / "bad")
    assert failures, bad.metrics()
