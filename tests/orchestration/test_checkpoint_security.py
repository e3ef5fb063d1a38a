"""Checkpoints never run code: every load path refuses a malicious pickle, every payload loads weights-only.

A checkpoint can come from elsewhere (a shared artifacts folder, a download); the pipeline reads
every file with ``torch.load(weights_only=True)`` and writes only plain data, so a file that
carries code is refused with an error naming it, and the code never runs.
"""
from __future__ import annotations

import dataclasses
import enum
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pipeline.checkpoint import CheckpointError, load_model, model_payload, read_checkpoint, save_atomic
from pipeline.deploy.graphs.unroll import INT8_RECIPE, UNROLLED_FORMAT, UnrollError, UnrolledInfo, load_unrolled

MCFG = {"arch": "resnet19", "width": 0.125, "T": 2, "num_classes": 10, "in_channels": 1,
        "staa": {"placement": "last_k", "last_k": 1}}
META = {"dataset": "digits", "num_classes": 10, "in_channels": 1, "image_size": [8, 8], "mean": [0.0],
        "std": [1.0], "is_event": False, "class_names": [str(i) for i in range(10)]}


class Evil:
    """Unpickling this runs code: it creates ``marker`` (what an attacker's payload would do instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _qat_loader(path: Path):
    from pipeline.compress.quantize import load_qat_model

    return load_qat_model(path)


def _payloads(evil: Evil) -> dict[str, dict]:
    """Well-formed payloads of each kind with the malicious object where a plain value belongs."""
    return {
        "read_checkpoint": {"model": {}, "model_cfg": MCFG, "data_meta": evil},
        "load_model": {"model": {}, "model_cfg": MCFG, "data_meta": META, "history": [evil]},
        "load_qat_model": {"format": "nncf-qat-v1", "model": {}, "model_cfg": MCFG, "data_meta": META,
                           "nncf_config": evil, "fold_bn": True},
        "load_unrolled": {"format": UNROLLED_FORMAT, "kind": "int8", "T": 2, "model_cfg": MCFG, "data_meta": META,
                          "bn_folded": True, "recipe": list(INT8_RECIPE), "source": "", "extra": {},
                          "build_cfg": MCFG, "state_dict": {}, "rebuild": {"from": "qat_checkpoint",
                                                                            "qat": {"nncf_config": evil}}},
    }


LOADERS = {"read_checkpoint": (read_checkpoint, CheckpointError), "load_model": (load_model, CheckpointError),
           "load_qat_model": (_qat_loader, CheckpointError), "load_unrolled": (load_unrolled, UnrollError)}


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_malicious_pickle_is_refused_and_never_runs(name, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / f"{name}.pt"
    torch.save(_payloads(Evil(marker))[name], path)
    load, error = LOADERS[name]
    with pytest.raises(error) as info:
        load(path)
    message = str(info.value)
    assert str(path) in message and "GLOBAL exec" in message and "weights_only=True" in message
    assert "re-run" in message  # the fix
    assert not marker.exists(), "the checkpoint's code ran"
    # the payload is live: an unrestricted load runs it (so the check above is not vacuous)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_old_pickled_int8_module_is_refused_unopened(tmp_path):
    """``unroll/int8.pt`` used to hold a pickled module in bytes: such a file is refused, its pickle never read."""
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save(Evil(marker), buf)
    path = tmp_path / "int8.pt"
    torch.save({"format": "staa-unrolled/1", "kind": "int8", "module_bytes": buf.getvalue()}, path)
    with pytest.raises(UnrollError, match="re-run the unroll stage") as info:
        load_unrolled(path)
    assert str(path) in str(info.value) and not marker.exists()
    torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert marker.exists()


def test_nncf_config_may_only_name_nncf_quantizers():
    """``load_from_config`` imports and builds the classes a config names: only NNCF's quantisers are allowed."""
    pytest.importorskip("nncf")
    from pipeline.compress.quantize import QAT_FORMAT, restore_qat_model

    # a real NNCF module that NNCF's own check ("nncf.*") would build: not a quantiser, so refused
    cmd = {"hook_names_in_model": ["pre_hooks.fc/linear/0__1.0"],
           "module_path": "nncf.torch.function_hook.pruning.magnitude.modules",
           "module_cls_name": "UnstructuredPruningMask", "module_config": {"shape": (10, 64)}}
    ckpt = {"format": QAT_FORMAT, "model": {}, "model_cfg": MCFG, "data_meta": META, "fold_bn": True,
            "nncf_config": {"compression_state": [cmd]}}
    with pytest.raises(CheckpointError, match="refusing to build it"):
        restore_qat_model(ckpt)


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Row:
    T: int
    top1: np.float32


def test_payloads_are_made_plain_when_saved(tmp_path):
    """numpy scalars/arrays, paths, enums and dataclasses become plain data; anything else is refused at save."""
    model = torch.nn.Linear(2, 2)
    payload = {"model": model.state_dict(), "model_cfg": MCFG, "data_meta": dict(META, root=Path("/data")),
               "row": {"agreement": np.float64(99.5), "n": np.int64(7), "preds": np.arange(3), "kind": Color.RED,
                       "pair": (np.float32(1.5), Path("x.pt")), "best": Row(2, np.float32(0.25))}}
    save_atomic(payload, tmp_path / "ck.pt")
    raw = torch.load(tmp_path / "ck.pt", weights_only=True)
    row = raw["row"]
    assert type(row["agreement"]) is float and row["agreement"] == 99.5 and type(row["n"]) is int
    assert torch.equal(row["preds"], torch.arange(3)) and row["kind"] == "red"
    assert row["pair"] == (1.5, "x.pt") and row["best"] == {"T": 2, "top1": 0.25}
    assert raw["data_meta"]["root"] == "/data"
    assert hasattr(raw["model"], "_metadata")  # module versions kept for load_state_dict
    assert payload["row"]["n"].dtype == np.int64  # the caller's dict is not modified

    with pytest.raises(CheckpointError, match=r"bad\.pt\['row'\]\['hook'\].*object"):
        save_atomic({"row": {"hook": object()}}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError):
        save_atomic({"model": Evil(tmp_path / "m")}, tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()


def test_training_checkpoints_load_weights_only_and_resume(tmp_path):
    """best.pt/last.pt (optimiser, scheduler, GradScaler state, history) load weights-only; a resume uses them."""
    from pipeline.models import build_model
    from pipeline.training.loop import Checkpoints, FitConfig, fit
    from pipeline.training.optim import warmup_cosine

    cfg = dict(MCFG, T=1)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(8, 1, 8, 8, generator=g), torch.arange(8) % 10)
    loader = DataLoader(data, batch_size=4)

    def step_loss(m, x, y):
        logits = m(x)
        return torch.nn.functional.cross_entropy(logits, y), logits

    def run(epochs: int):
        torch.manual_seed(0)
        model = build_model(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return fit(model, loader, loader, opt, warmup_cosine(opt, 4, 1), step_loss,
                   FitConfig(epochs=epochs, progress=False), Checkpoints(tmp_path, "best.pt", "last.pt"),
                   payload=lambda m: model_payload(m, cfg, META, reduce_t={"agreement": np.float64(1.0)}))

    run(1)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["optimizer"]["state"] and last["scheduler"]["last_epoch"] == 2 and "scaler" in last
    assert last["history"][0]["epoch"] == 1 and "val_top1" in last["history"][0]
    assert type(last["reduce_t"]["agreement"]) is float
    model, ck = load_model(tmp_path / "best.pt")
    assert ck["epoch"] == 1 and model.T == 1
    state = run(2)
    assert state.resumed_from == 1 and len(state.history) == 2


@pytest.fixture(scope="module")
def qat_file(tmp_path_factory):
    """A real NNCF-quantised model's qat.pt (PTQ only: the file format is what matters here)."""
    pytest.importorskip("nncf")
    from pipeline.compress.quantize import qat_payload, quantize_model
    from pipeline.models import build_model

    torch.manual_seed(0)
    model = build_model(MCFG).eval()
    with torch.no_grad():  # livelier than the init, so neurons fire and the outputs depend on the input
        for name, p in model.named_parameters():
            if name.endswith("bn.weight"):
                p.fill_(2.0)
    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2
    qmodel = quantize_model(model, [(images, torch.zeros(16, dtype=torch.long))], n_batches=1)
    path = tmp_path_factory.mktemp("qat") / "qat.pt"
    save_atomic(qat_payload(qmodel, MCFG, META, fold_bn=True, ptq={"top1": np.float64(50.0)}), path)
    return path, images


@pytest.mark.slow
def test_nncf_int8_unrolled_is_state_plus_recipe_and_rebuilds_bit_identical(qat_file, tmp_path):
    from pipeline.compress.quantize import load_qat_model
    from pipeline.deploy.graphs.unroll import save_unrolled, unroll_qat

    path, images = qat_file
    raw = torch.load(path, weights_only=True)  # qat.pt itself: plain data
    assert raw["nncf_config"]["compression_state"][0]["module_config"]["mode"] == "symmetric"
    exportable, ckpt = load_qat_model(path)
    q = unroll_qat(exportable)
    save_unrolled(tmp_path / "int8.pt", q, UnrolledInfo("int8", 2, ckpt["model_cfg"], ckpt["data_meta"], True,
                                                        INT8_RECIPE, "qat/qat.pt", extra={"qat_checkpoint": ckpt}))
    stored = torch.load(tmp_path / "int8.pt", weights_only=True)
    assert "module_bytes" not in stored and stored["rebuild"]["from"] == "qat_checkpoint"
    assert set(stored["rebuild"]["qat"]) == {"format", "model", "model_cfg", "data_meta", "nncf_config", "fold_bn"}
    rebuilt, info = load_unrolled(tmp_path / "int8.pt")
    assert info.kind == "int8" and info.T == 2 and not rebuilt.training
    with torch.no_grad():
        expected, got = q(images), rebuilt(images)
    assert expected.std(0).max() > 1e-3  # the outputs depend on the input: the comparison is not vacuous
    assert torch.equal(got, expected)
