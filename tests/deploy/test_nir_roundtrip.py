"""NIR export: the graph, nir's own reader, and round-trip parity in snnTorch and Norse.

Every parity test runs a model that fires in every layer (tests.helpers.firing_model) through our
unrolled graph and through each reader's import of the NIR file, and compares spikes layer by layer
with export's flip classification (pipeline.deploy.proofs.parity): identical spikes outside numerical flips,
identical top-1. Real N-MNIST recordings where ../shared/data has them; generated events otherwise.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.deploy.graphs import nir_export as ne
from pipeline.deploy.proofs import nir_readers as nr
from pipeline.deploy.proofs.parity import compare, torch_with_spikes
from pipeline.deploy.graphs.unroll import unroll_float
from pipeline.models import build_model
from tests.conftest import REPO, shared_file
from tests.helpers import firing_model, real_images

nir = pytest.importorskip("nir")
T = 4
PLAIN = dict(arch="resnet20", width=0.25, T=T, num_classes=10, in_channels=2, neuron=dict(kind="lif"),
             staa=dict(pe=False, gc=False, sa=False, tsrd=False))


def _readers() -> list[str]:
    missing = {r: why for r, why in nr.available().items() if why}
    if missing:
        pytest.skip(f"NIR readers not installed: {missing} (pip install -r requirements-dev.txt)")
    return list(nr.READERS)


def _events(n: int = 12, seed: int = 0) -> torch.Tensor:
    """Generated event frames [B, T, 2, 34, 34]: sparse counts, as N-MNIST frames are."""
    g = torch.Generator().manual_seed(seed)
    return torch.poisson(torch.full((n, T, 2, 34, 34), 0.4), generator=g)


def _plain_model(x: torch.Tensor, **cfg) -> torch.nn.Module:
    return unroll_float(firing_model(dict(PLAIN, **cfg), x, bias=0.6))


def _parity(model, graph, reader: str, x: torch.Tensor, flip_margin: float = 1e-4):
    half = len(x) // 2  # two equal batches: a reader that kept its membranes across batches is seen
    return compare(torch_with_spikes(model), nr.reader_fn(reader, graph), [x[:half], x[half:]], tie_tol=0.0,
                   flip_margin=flip_margin)


def _assert_round_trip(model, graph, x, reader: str) -> None:
    rep = _parity(model, graph, reader, x)
    m = rep.metrics()
    assert rep.real == 0, f"{reader}: real spike mismatches {m['first_divergence']}, margin {m['worst_first_flip_margin']}"
    assert rep.clean + rep.numerical == rep.n
    assert rep.top1_mismatches == 0, f"{reader}: top-1 differs on {rep.top1_mismatches}/{rep.n}"
    assert rep.max_abs_diff < 1e-4, f"{reader}: logits differ by {rep.max_abs_diff} on identical spikes"
    assert set(rep.spike_total) == {k for k, n in graph.nodes.items() if isinstance(n, nir.LIF)}
    assert min(rep.local_spike_agreement.values()) >= 0.9999


@pytest.fixture(scope="module")
def generated():
    x = _events()
    model = _plain_model(x)
    return model, ne.to_nir(model, (2, 34, 34)), x


def test_lif_mapping_reproduces_our_neuron_under_nirs_own_equation():
    """Integrate NIR's LIF equation (Euler, the graph's dt) for one neuron: the same spikes as H = M U + N I."""
    p = ne.lif_mapping(0.25, 1.0, 0.5)
    assert p["tau"] == pytest.approx(1e-4 / 0.75) and p["v_threshold"] == pytest.approx(0.375)
    assert p["v_reset"] == 0.0 and p["v_leak"] == 0.0 and p["r"] == 1.0
    current = np.random.default_rng(0).uniform(-0.2, 1.0, 400)
    u, v, ours, theirs = 0.0, 0.0, [], []
    for i in current:
        h = 0.25 * u + 1.0 * i
        s = h >= 0.5
        u = 0.0 if s else h
        ours.append(s)
        v = v + p["dt"] / p["tau"] * ((p["v_leak"] - v) + p["r"] * i)
        z = v > p["v_threshold"]
        v = p["v_reset"] if z else v
        theirs.append(z)
    assert sum(ours) > 50 and ours == theirs
    other = ne.lif_mapping(0.5, 2.0, 1.0, dt=1e-3, r=2.0)  # the general rule: c = (1 - M) R / N
    assert other["tau"] == pytest.approx(2e-3) and other["v_threshold"] == pytest.approx(0.5)


def test_graph_structure_metadata_and_nir_reader_identity(generated, tmp_path: Path):
    model, graph, _ = generated
    lifs = [k for k, n in graph.nodes.items() if isinstance(n, nir.LIF)]
    assert len(lifs) == 19 and lifs[0] == "stem.sn.lif"
    # a residual add is two edges into the neuron after it; the downsample shortcut is its own conv
    assert {s for s, d in graph.edges if d == "layer1.0.sn2.lif"} == {"layer1.0.conv2", "stem.sn.lif"}
    assert {s for s, d in graph.edges if d == "layer2.0.sn2.lif"} == {"layer2.0.conv2", "layer2.0.downsample"}
    lif = graph.nodes["layer3.2.sn2.lif"]
    assert np.unique(lif.v_threshold).tolist() == [0.375] and np.allclose(lif.tau, 1e-4 / 0.75)
    assert graph.nodes["fc"].weight.shape == (10, 64, 5, 5)  # global pool folded into the classifier
    assert graph.metadata["dt"] == 1e-4 and graph.metadata["T"] == T and "mean over the T steps" in graph.metadata["output"]
    path = ne.write_nir(graph, tmp_path / "m.nir")
    rt = ne.check_roundtrip(path, graph, tmp_path)
    assert rt["identical"] and rt["differs"] == [] and rt["nodes"] == len(graph.nodes)
    # the comparison can fail: one weight changed is seen
    graph.nodes["stem.conv"].weight[0, 0, 0, 0] += 1.0
    try:
        assert not ne.check_roundtrip(path, graph, tmp_path)["identical"]
    finally:
        graph.nodes["stem.conv"].weight[0, 0, 0, 0] -= 1.0


@pytest.mark.parametrize("reader", nr.READERS)
def test_round_trip_parity_on_generated_events(generated, reader):
    _readers()
    model, graph, x = generated
    _assert_round_trip(model, graph, x, reader)


@pytest.mark.shared_data
@pytest.mark.parametrize("reader", nr.READERS)
def test_round_trip_parity_on_real_nmnist(reader, tmp_path: Path):
    _readers()
    events = shared_file("nmnist_small_events.npz")
    x, _, _ = real_images("nmnist", n=24, T=T, train_file=str(events))
    model = _plain_model(x)
    graph = nir.read(str(ne.write_nir(ne.to_nir(model, tuple(x.shape[-3:])), tmp_path / "n.nir")))
    _assert_round_trip(model, graph, x, reader)


def test_staa_and_adaptive_models_are_refused_with_the_part_named():
    staa = build_model(dict(PLAIN, staa=dict(pe=True, gc=True, sa=True, placement="last_k", last_k=1)))
    blockers = ne.nir_blockers(unroll_float(staa))
    text = "; ".join(blockers)
    assert "layer3.0.sn1.staa.pe" in text and "position encoding (PE)" in text
    assert "layer3.0.sn1.staa.gc" in text and "global context (GC)" in text
    assert "layer3.0.sn1.staa.sa" in text and "step attention (SA)" in text
    assert "stem.sn" not in text  # STAA only on the last stage: the stem is fine
    # the console's one-line summary: each kind once, no module names
    assert ne.blocker_kinds(unroll_float(staa)) == ["STAA global context", "STAA position encoding",
                                                    "STAA step attention"]
    with pytest.raises(ne.NirExportError, match=r"layer3\.0\.sn1\.staa\.sa.*step attention"):
        ne.to_nir(unroll_float(staa), (2, 34, 34))
    alif = ne.nir_blockers(unroll_float(build_model(dict(PLAIN, neuron=dict(kind="alif")))))
    assert len(alif) == 1 and alif[0].startswith("stem.sn.lif") and "adaptive LIF" in alif[0]
    unfolded = ne.nir_blockers(build_model(PLAIN))
    assert len(unfolded) == 1 and "stem.conv.bn" in unfolded[0] and "BatchNorm not folded" in unfolded[0]
    assert ne.nir_blockers(unroll_float(build_model(PLAIN))) == []


def test_reader_semantics_differences_are_measured(generated):
    """What each reader does differently, as numbers (docs/architecture.md §5 "NIR"): snnTorch fixes
    dt = 1e-4 whatever the graph says, Norse ignores R. A graph that relies on either is read wrongly."""
    _readers()
    model, _, x = generated
    slow = ne.to_nir(model, (2, 34, 34), dt=1e-3)  # same neuron, stated with dt = 1e-3
    norse_ok, snn_bad = _parity(model, slow, "norse", x), _parity(model, slow, "snntorch", x)
    assert norse_ok.real == 0 and norse_ok.top1_mismatches == 0
    assert snn_bad.real > 0 and snn_bad.min_spike_agreement < 0.99
    unscaled = ne.to_nir(model, (2, 34, 34), r=1 / 0.75)  # R = N / (1 - M): membrane unscaled, threshold 0.5
    snn_ok, norse_bad = _parity(model, unscaled, "snntorch", x), _parity(model, unscaled, "norse", x)
    assert snn_ok.real == 0 and snn_ok.top1_mismatches == 0
    assert norse_bad.real > 0 and norse_bad.min_spike_agreement < 0.99
    print(f"snntorch at dt=1e-3: min layer agreement {snn_bad.min_spike_agreement:.4f}, top-1 mismatches "
          f"{snn_bad.top1_mismatches}/{snn_bad.n}; norse with R=4/3: {norse_bad.min_spike_agreement:.4f}, "
          f"{norse_bad.top1_mismatches}/{norse_bad.n}")


def test_nir_info_prints_nodes_edges_and_neuron_parameters(generated, tmp_path: Path):
    _, graph, _ = generated
    path = ne.write_nir(graph, tmp_path / "m.nir")
    out = subprocess.run([sys.executable, "-m", "pipeline.runtime", "nir-info", str(path), "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    lif = next(n for n in info["nodes"] if n["name"] == "stem.sn.lif")
    assert lif["type"] == "LIF" and lif["v_threshold"] == 0.375 and lif["v_reset"] == 0.0
    assert ["layer2.0.downsample", "layer2.0.sn2.lif"] in info["edges"] and info["metadata"]["dt"] == 1e-4
    text = subprocess.run([sys.executable, "-m", "pipeline.runtime", "nir-info", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert text.returncode == 0 and "stem.sn.lif" in text.stdout and "LIF" in text.stdout
    bad = subprocess.run([sys.executable, "-m", "pipeline.runtime", "nir-info", str(tmp_path / "none.nir")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "none.nir" in bad.stderr


def test_export_stage_writes_the_nir_graph_with_reader_parity_on_static_images(tmp_path: Path):
    """The export stage on a plain-LIF model (static digits: the same frame every step) writes model.nir,
    checks it with nir's reader and records each reader's parity."""
    import copy
    import logging

    import yaml

    import stages.export
    from pipeline.config import deep_merge, load_config
    from pipeline.data import data_bundle, data_meta, model_config
    from pipeline.deploy.graphs.unroll import FLOAT_RECIPE, INT8_RECIPE, UnrolledInfo, save_unrolled, unroll_qat
    from pipeline.registry import spec
    from pipeline.runner import StageContext
    from tests.conftest import TINY
    from tests.helpers import quantize_convs

    raw = deep_merge(TINY, {"name": "tiny", "artifacts_dir": str(tmp_path / "artifacts"),
                            "model": {"neuron": {"kind": "lif"}, "staa": {"pe": False, "gc": False, "sa": False}},
                            "export": {"parity_images": 12}})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(str(tmp_path / "tiny.yaml"))
    bundle = data_bundle(cfg)
    mcfg, meta = model_config(cfg, bundle), data_meta(bundle)
    x, _, _ = real_images("digits", 12, T=mcfg["T"])
    model = firing_model(mcfg, x)
    (tmp_path / "unroll").mkdir()
    save_unrolled(tmp_path / "unroll" / "float.pt", unroll_float(model),
                  UnrolledInfo("float", mcfg["T"], mcfg, meta, True, FLOAT_RECIPE))
    save_unrolled(tmp_path / "unroll" / "int8.pt", unroll_qat(quantize_convs(copy.deepcopy(model), [x])),
                  UnrolledInfo("int8", mcfg["T"], mcfg, meta, False, INT8_RECIPE))
    out = tmp_path / "export"
    out.mkdir()
    ctx = StageContext(cfg=cfg, spec=spec("export"), out=out, inputs={"unroll": tmp_path / "unroll"}, store=None,
                       device="cpu", log=logging.getLogger("test.export"))
    result = stages.export.run(ctx)
    m = result.metrics["nir"]
    assert m["exported"] and (out / "model.nir").is_file() and m["roundtrip"]["identical"]
    assert not list(out.glob("nir-*"))  # the re-saved scratch copy is not left behind
    for reader in nr.READERS:
        r = m["readers"][reader]
        if not r["checked"]:
            pytest.skip(r["reason"])
        assert r["n"] == 12 and r["samples_real_mismatch"] == 0 and r["top1_mismatches"] == 0
    graph = nir.read(str(out / "model.nir"))
    assert json.loads(graph.metadata["deploy"])["dataset"] == "digits"


def test_report_note_names_the_graph_its_parity_or_the_blocking_parts(tmp_path: Path):
    from pipeline.report.nir_note import nir_note, nir_summary, read_nir_metrics

    assert read_nir_metrics(tmp_path / "metrics.json") is None and nir_note(None) == []
    skipped = {"exported": False, "skipped": ["layer3.0.sn1.staa.sa: STAA step attention (SA) ..."]}
    (tmp_path / "metrics.json").write_text(json.dumps({"T": 2, "nir": skipped}))
    lines = nir_note(read_nir_metrics(tmp_path / "metrics.json"))
    assert "nir: skipped; parts with no NIR form:" in lines and any("staa.sa" in line for line in lines)
    reader = {"checked": True, "n": 100, "samples_clean": 99, "samples_numerical_flip": 1, "samples_real_mismatch": 0,
              "top1_mismatches": 0, "max_abs_diff": 2e-7}
    done = {"exported": True, "roundtrip": {"identical": True}, "dt": 1e-4, "neuron_mapping": "tau = ...",
            "readers": {"snntorch": reader, "norse": {"checked": False, "reason": "not installed"}}}
    text = "\n".join(nir_note(done))
    assert "| snntorch | 100 | 99 | 1 | 0 | 0 |" in text and "| norse | not installed" in text
    assert "re-save, identical" in text and nir_summary(done)["readers"]["snntorch"]["numerical_flips"] == 1


@pytest.mark.parametrize("config, exportable", [("nmnist_nir.yaml", True), ("nmnist.yaml", False),
                                                 ("default.yaml", False)])
def test_which_configs_give_a_nir_graph(config, exportable):
    from pipeline.config import load_config

    cfg = load_config(str(REPO / "configs" / config))
    model = unroll_float(build_model(dict(cfg["model"], num_classes=10, in_channels=2)))
    blockers = ne.nir_blockers(model)
    assert (blockers == []) is exportable, blockers
    if not exportable:
        assert any("staa." in b for b in blockers)


@pytest.mark.parametrize("reader", nr.READERS)
def test_round_trip_parity_with_the_average_pool_stem_on_static_images(reader):
    """ResNet-34's stem pools spikes (AvgPool2d 3x3/2): an NIR AvgPool2d node; static images repeat every step."""
    _readers()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cfg = dict(PLAIN, arch="resnet34", width=0.125, T=2, in_channels=3)
    model = _plain_model(x, **{k: v for k, v in cfg.items() if k not in PLAIN or cfg[k] != PLAIN[k]})
    graph = ne.to_nir(model, (3, 32, 32))
    assert isinstance(graph.nodes["stem.pool"], nir.AvgPool2d)
    assert ("stem.sn.lif", "stem.pool") in graph.edges and ("stem.pool", "layer1.0.conv1") in graph.edges
    _assert_round_trip(model, graph, x, reader)


@pytest.mark.slow
@pytest.mark.shared_data
def test_nmnist_nir_config_through_export_writes_the_nir_graph(tmp_path: Path):
    """configs/nmnist_nir.yaml on real N-MNIST (the CPU schedule of test_nmnist_e2e) up to export: model.nir,
    read back identical, both readers at 0 real mismatches and identical top-1 on the trained model."""
    import os

    from tests.e2e.test_nmnist_e2e import SCHEDULE

    events = shared_file("nmnist_small_events.npz")
    sets = SCHEDULE + [f"artifacts_dir={tmp_path / 'artifacts'}", f"data.train_file={events}",
                       f"data.cache_dir={tmp_path / 'frames'}", "reduce_t.steps=[4]"]
    cmd = [sys.executable, "-m", "pipeline", "run", "--config", str(REPO / "configs" / "nmnist_nir.yaml"),
           "--until", "export"]
    for item in sets:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    export = tmp_path / "artifacts" / "nmnist_nir" / "export"
    m = json.loads((export / "metrics.json").read_text())["nir"]
    assert m["exported"] and m["roundtrip"]["identical"] and (export / "model.nir").is_file()
    for reader in nr.READERS:
        r = m["readers"][reader]
        assert r["checked"], r
        assert r["n"] == 32 and r["samples_real_mismatch"] == 0 and r["top1_mismatches_beyond_tol"] == 0, r
