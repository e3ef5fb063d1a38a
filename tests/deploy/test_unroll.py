"""Unrolling: static modules, parity with their sources on real digits, save/load, the unroll stage."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

from pipeline.deploy.proofs.parity import ParityReport, compare, torch_with_spikes
from pipeline.deploy.graphs.unroll import (FLOAT_RECIPE, INT8_RECIPE, UnrollError, UnrolledInfo, describe, load_unrolled,
                                    save_unrolled, unroll_float, unroll_qat)
from pipeline.models import STAA, PositionEncoding, neuron_modules
from stages.unroll import load_qat as REAL_LOAD_QAT
from tests.helpers import QDQConv2d, firing_model, quantize_convs, real_images

MODEL = {"arch": "resnet19", "width": 0.125, "T": 2, "num_classes": 10, "in_channels": 1}


@pytest.fixture(scope="module")
def digits():
    x, y, _ = real_images("digits", 32, T=2)
    return x, y


@pytest.fixture(scope="module")
def model(digits):
    return firing_model(MODEL, digits[0])


@pytest.fixture(scope="module")
def qat(model, digits):
    """A stand-in for the QAT model: the reference symmetric Q/DQ quantisation of every conv."""
    return quantize_convs(copy.deepcopy(model), [digits[0]])


def test_unrolled_float_is_static_and_source_untouched(model):
    flat = unroll_float(model)
    facts = describe(flat)
    assert facts["batchnorm_layers"] == 0 and facts["trainable_tensors"] == 0
    assert all(m.inference for _, m in neuron_modules(flat))
    assert all(m.tsrd_p == 0 for m in flat.modules() if isinstance(m, STAA))
    pes = [m for m in flat.modules() if isinstance(m, PositionEncoding)]
    assert pes and all("pe" in dict(m.named_buffers()) for m in pes)  # constants, not parameters
    assert not flat.training
    # the source model is a different object and keeps its BN and surrogate spikes
    assert describe(model)["batchnorm_layers"] == 19
    assert not any(m.inference for _, m in neuron_modules(model))


def test_float_parity_on_real_images(model, digits):
    x, _ = digits
    flat = unroll_float(model)
    report = compare(torch_with_spikes(model), torch_with_spikes(flat), [x[:16], x[16:]], tie_tol=2e-4)
    assert report.failures(1e-4, 0.9999, "unroll") == []
    assert report.n == 32 and report.top1_mismatches == 0 and report.real == 0
    # the comparison is not vacuous: every layer fires and the logits depend on the input
    with torch.no_grad():
        _, spikes, _ = torch_with_spikes(flat)(x)
    assert all(s.mean() > 0.01 for s in spikes.values())
    assert flat(x).std(0).max() > 1e-3


def test_int8_unroll_keeps_bn_and_the_quantised_weights(qat, digits):
    x, _ = digits
    q = unroll_qat(qat)
    assert describe(q)["batchnorm_layers"] == 19  # BN is not folded into quantised weights
    assert sum(isinstance(m, QDQConv2d) for m in q.modules()) == 19
    for a, b in zip(qat.modules(), q.modules()):
        if isinstance(a, QDQConv2d):
            assert torch.equal(a.conv.weight, b.conv.weight) and torch.equal(a.w_scale, b.w_scale)
    report = compare(torch_with_spikes(qat), torch_with_spikes(q), [x], tie_tol=2e-4)
    assert report.failures(1e-4, 0.9999, "int8") == []


def test_parity_gate_catches_a_broken_unroll(model, digits):
    x, _ = digits
    broken = unroll_float(model)
    with torch.no_grad():
        broken.layer1[0].conv1.conv.bias.add_(0.5)  # a wrong BN fold
    report = compare(torch_with_spikes(model), torch_with_spikes(broken), [x], tie_tol=2e-4)
    failures = report.failures(1e-4, 0.9999, "unroll")
    assert any("real mismatch" in f for f in failures)
    assert report.real > 0 and set(report.first_divergence) == {"layer1.0.sn1.lif"}
    assert report.worst_first_flip_margin > 1e-3


def test_flips_are_classified_by_their_first_divergence():
    """A rounding-level flip cascades but passes; a flip far from the threshold is a real mismatch."""
    T, B = 2, 3
    ref = {"a": torch.zeros(T, B, 4), "b": torch.zeros(T, B, 4)}
    h = {"a": torch.full((T, B, 4), -0.4), "b": torch.full((T, B, 4), -0.4)}
    h["a"][0, 1, 0] = -1e-6  # sample 1: a membrane a hair below threshold in layer a
    cand = {k: v.clone() for k, v in ref.items()}
    cand["a"][0, 1, 0] = 1  # ... flips (rounding) ...
    cand["b"][:, 1, :] = 1  # ... and cascades into all of layer b
    cand["b"][0, 2, 3] = 1  # sample 2: layer b flips with its membrane 0.4 below threshold: a bug
    logits = torch.eye(B, 5)
    report = ParityReport(tie_tol=0.0, flip_margin=1e-4)
    report.update(logits, logits + torch.tensor([[0.0], [0.3], [0.0]]), ref, cand, h)
    assert (report.clean, report.numerical, report.real) == (1, 1, 1)
    assert report.first_divergence == {"a": 1, "b": 1}
    assert report.max_abs_diff == 0.0 and report.max_abs_diff_all == pytest.approx(0.3)
    assert report.spike_agreement["b"] == pytest.approx(1 - 9 / 24)  # raw: the cascade counts
    assert report.local_spike_agreement["b"] == pytest.approx(1 - 1 / 24)  # local: only b's own flip
    assert report.local_spike_agreement["a"] == pytest.approx(1 - 1 / 24)
    failures = report.failures(1e-4, 0.9, "t")
    assert len(failures) == 1 and "real mismatch" in failures[0]


def test_parity_report_tie_tolerance():
    report = ParityReport(tie_tol=1e-3)
    ref = torch.tensor([[1.0, 0.9995, 0.0], [2.0, 0.0, 0.0]])
    report.update(ref, torch.tensor([[0.9995, 1.0, 0.0], [2.0, 0.0, 0.0]]))
    assert report.top1_mismatches == 1 and report.top1_mismatches_beyond_tol == 0  # a near-tie may flip
    report.update(ref, torch.tensor([[1.0, 0.9995, 0.0], [0.0, 2.0, 0.0]]))
    assert report.top1_mismatches_beyond_tol == 1  # a clear winner may not


def test_save_and_load_round_trip(tmp_path, model, qat, digits):
    x, _ = digits
    flat = unroll_float(model)
    info = UnrolledInfo("float", 2, MODEL, {"dataset": "digits"}, bn_folded=True, recipe=FLOAT_RECIPE)
    save_unrolled(tmp_path / "float.pt", flat, info)
    loaded, got = load_unrolled(tmp_path / "float.pt")
    assert got.kind == "float" and got.T == 2 and got.bn_folded
    assert describe(loaded)["batchnorm_layers"] == 0 and all(m.inference for _, m in neuron_modules(loaded))
    with torch.no_grad():
        assert torch.equal(loaded(x), flat(x))

    q = unroll_qat(qat)
    save_unrolled(tmp_path / "int8.pt", q, UnrolledInfo("int8", 2, MODEL, {}, bn_folded=False, recipe=INT8_RECIPE))
    q2, info8 = load_unrolled(tmp_path / "int8.pt")
    assert info8.kind == "int8" and not info8.bn_folded
    with torch.no_grad():
        assert torch.equal(q2(x), q(x))


def test_int8_kinds_register_from_outside_the_package(tmp_path, qat, monkeypatch):
    """The reference Q/DQ model lives in tests/helpers and registers its rebuild recipe on import;
    a file of a kind nothing registered fails saying so, and the built-in kind cannot be replaced."""
    import pipeline.deploy.graphs.unroll as unroll

    assert "qdq_reference" in unroll.INT8_KINDS
    info = UnrolledInfo("int8", 2, MODEL, {}, bn_folded=False, recipe=INT8_RECIPE)
    save_unrolled(tmp_path / "int8.pt", unroll_qat(qat), info)
    assert torch.load(tmp_path / "int8.pt", weights_only=True)["rebuild"]["from"] == "qdq_reference"
    monkeypatch.setattr(unroll, "INT8_KINDS", {})
    with pytest.raises(UnrollError, match="'qdq_reference', which no imported module has registered"):
        load_unrolled(tmp_path / "int8.pt")
    with pytest.raises(UnrollError, match="neither of a registered kind"):
        save_unrolled(tmp_path / "again.pt", unroll_qat(qat), info)
    with pytest.raises(ValueError, match="built-in"):
        unroll.register_int8_kind("qat_checkpoint", lambda m: None, lambda m, r: m)


def test_load_errors_say_what_to_do(tmp_path):
    with pytest.raises(UnrollError, match="run the unroll stage"):
        load_unrolled(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(UnrollError, match="re-run the unroll stage"):
        load_unrolled(tmp_path / "junk.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(UnrollError, match="not an unrolled model"):
        load_unrolled(tmp_path / "other.pt")


# --- the stage, run directly on hand-made upstream folders -----------------------------------

def _stage_ctx(cfg, name, out, inputs):
    from pipeline.registry import spec
    from pipeline.runner import StageContext

    out.mkdir(parents=True, exist_ok=True)
    return StageContext(cfg=cfg, spec=spec(name), out=out, inputs=inputs, store=None, device="cpu",
                        log=logging.getLogger(f"test.{name}"))


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, digits, model, qat):
    """A tiny digits config, reduce_t/chosen.pt (a firing T=2 model) and the reference Q/DQ model as QAT."""
    import yaml

    import stages.unroll
    from pipeline.checkpoint import model_payload, save_atomic
    from pipeline.config import deep_merge, load_config
    from pipeline.data import data_bundle, data_meta, model_config

    from tests.conftest import TINY

    root = tmp_path_factory.mktemp("unroll_stage")
    raw = deep_merge(TINY, {"name": "tiny", "artifacts_dir": str(root / "artifacts"), "unroll": {"parity_images": 16}})
    (root / "tiny.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(str(root / "tiny.yaml"))
    bundle = data_bundle(cfg)
    mcfg = model_config(cfg, bundle)
    (root / "reduce_t").mkdir()
    (root / "qat").mkdir()
    save_atomic(model_payload(model, mcfg, data_meta(bundle)), root / "reduce_t" / "chosen.pt")
    patch = pytest.MonkeyPatch()
    patch.setattr(stages.unroll, "load_qat", lambda d: (qat, {"model_cfg": mcfg, "data_meta": data_meta(bundle)}))
    yield cfg, {"train": root / "train", "reduce_t": root / "reduce_t", "qat": root / "qat"}
    patch.undo()


def test_unroll_stage_writes_both_modules(tmp_path, upstream):
    import stages.unroll

    cfg, inputs = upstream
    result = stages.unroll.run(_stage_ctx(cfg, "unroll", tmp_path / "unroll", inputs))
    assert (tmp_path / "unroll" / "float.pt").is_file() and (tmp_path / "unroll" / "int8.pt").is_file()
    m = result.metrics
    assert m["T"] == 2 and m["float"]["source"] == "reduce_t/chosen.pt"
    for kind in ("float", "int8"):
        assert m[kind]["parity"]["max_abs_diff"] <= 1e-4
        assert m[kind]["parity"]["top1_mismatches"] == 0
        assert m[kind]["parity"]["min_local_spike_agreement"] >= 0.9999
        assert m[kind]["parity"]["samples_real_mismatch"] == 0
    assert m["float"]["batchnorm_layers"] == 0 and m["int8"]["batchnorm_layers"] == 19
    flat, info = load_unrolled(tmp_path / "unroll" / "float.pt")
    assert info.data_meta["dataset"] == "digits" and info.T == 2


def test_unroll_stage_fails_loudly_when_a_gate_fails(tmp_path, upstream, monkeypatch):
    import stages.unroll
    from pipeline.runner import StageError

    cfg, inputs = upstream

    def bad_unroll(model):
        flat = unroll_float(model)
        with torch.no_grad():
            flat.stem.conv.conv.weight.mul_(1.5)
        return flat

    monkeypatch.setattr(stages.unroll, "unroll_float", bad_unroll)
    with pytest.raises(StageError, match="unroll float"):
        stages.unroll.run(_stage_ctx(cfg, "unroll", tmp_path / "unroll", inputs))


def test_unroll_stage_names_a_missing_int8_model(tmp_path, upstream, monkeypatch):
    import stages.unroll
    from pipeline.runner import StageError

    cfg, inputs = upstream
    monkeypatch.setattr(stages.unroll, "load_qat", REAL_LOAD_QAT)  # qat/ is empty: no qat.pt
    with pytest.raises(StageError, match="qat"):
        stages.unroll.run(_stage_ctx(cfg, "unroll", tmp_path / "unroll", inputs))
