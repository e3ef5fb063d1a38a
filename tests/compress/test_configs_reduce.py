"""Every shipped config survives reduce_t: its model, carried to each T of its reduce_t.steps,
saves and reloads strictly through the same path as the pipeline (train -> reduce_t -> load_model).

Width is shrunk for speed; T, arch and the STAA settings are the config's own. The dataset's
class and channel counts come from a table (no data is read).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import load_model, model_payload, save_atomic
from pipeline.compress.timesteps import carry_to_T
from pipeline.config import load_config
from pipeline.models import GlobalContext, StepAttention
from tests.helpers import firing_model

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
# dataset -> (num_classes, in_channels, is_event): what the data bundle would report
DATASETS = {
    "digits": (10, 1, False), "cifar10": (10, 3, False), "cifar100": (100, 3, False),
    "imagenet": (1000, 3, False), "cifar10dvs": (10, 2, True), "dvsgesture": (11, 2, True),
    "nmnist": (10, 2, True),
}
SIZE = 16  # input side: ResNet-34 still ends at 1x1 after its five stride-2 steps


def _cases() -> list:
    out = []
    for path in CONFIGS:
        steps = load_config(path)["reduce_t"]["steps"]
        out += [pytest.param(path, T, id=f"{path.stem}-T{T}") for T in steps]
    return out


def _inputs(T: int, channels: int, is_event: bool, n: int = 4) -> torch.Tensor:
    """Binary event frames ``[n, T, C, H, W]`` or normalised images ``[n, C, H, W]``."""
    g = torch.Generator().manual_seed(T)
    if is_event:
        return (torch.rand(n, T, channels, SIZE, SIZE, generator=g) < 0.3).float()
    return torch.randn(n, channels, SIZE, SIZE, generator=g)


@torch.no_grad()
def _open_gates(model: torch.nn.Module) -> None:
    """Give the identity-initialised gates random weights, so a wrongly carried SA or GC layer shows."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        last = m.fc2 if isinstance(m, StepAttention) else m.transform[-1] if isinstance(m, GlobalContext) else None
        if last is not None:
            last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 0.5)
            last.bias.copy_(torch.randn(last.bias.shape, generator=g) * 0.5)


def test_every_config_has_reduce_t_steps():
    assert len(_cases()) >= len(CONFIGS), "a config without reduce_t.steps would be tested by nothing here"


@pytest.mark.parametrize("sa_mode", ["full", "causal"])
@pytest.mark.parametrize("path, T_new", _cases())
def test_config_carries_to_reduced_T_and_reloads_strictly(path: Path, T_new: int, sa_mode: str, tmp_path: Path):
    """With both step-attention forms, whatever the config sets (the event configs and the default: causal)."""
    cfg = load_config(path, ["model.width=0.0625", f"model.staa.sa_mode={sa_mode}"])
    classes, channels, is_event = DATASETS[cfg["data"]["dataset"]]
    mcfg = dict(cfg["model"], num_classes=classes, in_channels=channels)
    meta = {"dataset": cfg["data"]["dataset"], "num_classes": classes, "in_channels": channels}
    T0 = mcfg["T"]
    teacher = firing_model(mcfg, _inputs(T0, channels, is_event, n=8))
    _open_gates(teacher)
    save_atomic(model_payload(teacher, mcfg, meta), tmp_path / "best.pt")  # what train writes

    teacher, ckpt = load_model(tmp_path / "best.pt")  # what reduce_t reads
    student = carry_to_T(teacher, T_new, cfg["reduce_t"]["pe_mode"]).eval()
    save_atomic(model_payload(student, ckpt["model_cfg"], ckpt["data_meta"]), tmp_path / f"t{T_new}.pt")
    reloaded, _ = load_model(tmp_path / f"t{T_new}.pt")  # strict: every key and shape must fit

    assert reloaded.T == T_new == student.T
    x = _inputs(T_new, channels, is_event)
    with torch.no_grad():
        want, got = student(x), reloaded(x)
    assert not torch.allclose(want, want[:1].expand_as(want)), "outputs do not depend on the input"
    torch.testing.assert_close(got, want, rtol=0, atol=0)
